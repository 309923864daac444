"""save / load a compressed model: recipe.json + model.safetensors + config.json in one folder.

`load` needs no pickle: it rebuilds the architecture from config.json on the meta device, captures
it at the recorded input shape, replays the recipe (structure only), then assigns the saved
weights. The folder is assembled next to its destination and renamed into place.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from graphopt.errors import GraphoptError
from graphopt.io import atomic_dir, atomic_write_text, save_safetensors

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"    # sharded weights (written by `graphopt apply`)
RECIPE = "recipe.json"
CONFIG = "config.json"


def state_dict(graph) -> dict[str, torch.Tensor]:
    sd = dict(graph.gm.named_parameters())
    sd.update(dict(graph.gm.named_buffers()))
    return sd


def save(graph, out, extra_files: dict[str, str] | None = None) -> Path:
    """Write graph's recipe, weights and source config to folder `out` (replaced whole)."""
    if graph.is_meta:
        raise GraphoptError("this graph has no weights (meta device): save its recipe with "
                            "graph.recipe.save(path) and stream weights with `graphopt apply`")
    out = Path(out)
    with atomic_dir(out) as tmp:
        graph.recipe.save(tmp / RECIPE)
        save_safetensors(state_dict(graph), tmp / WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG, json.dumps(graph.recipe.model["config"], indent=2))
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
    return out


def load(folder, *, device: str = "cpu"):
    """Rebuild the compressed DiTGraph saved by `save` (or written by `graphopt compress` or, in
    graphopt's layout, by `graphopt apply`)."""
    from graphopt import families
    from graphopt.capture import capture
    from graphopt.recipe import Recipe

    folder = Path(folder)
    if not (folder / RECIPE).exists() or not any((folder / n).exists()
                                                  for n in (WEIGHTS, WEIGHTS_INDEX)):
        raise GraphoptError(f"'{folder}' has no {RECIPE} and {WEIGHTS} (or {WEIGHTS_INDEX}): "
                            f"point at a folder written by `graphopt compress`, graphopt.save "
                            f"or `graphopt apply`")
    recipe = Recipe.load(folder / RECIPE)
    spec = families.spec_from_recipe(recipe.model, device)
    # Uninitialised storage on the target device: every tensor is overwritten from the file, and
    # a meta capture would bake the meta device into the graph.
    model = families.build_from_recipe(recipe.model, device="meta").to_empty(device=device)
    graph = capture(model, spec=spec)
    # Still the model the recipe was made from (`graphopt distill` finds its teacher there).
    source = _source_next_to(folder, recipe.model.get("source", graph.source))
    graph.source = graph.recipe.model["source"] = source
    recipe.replay(graph)
    weights, made_by_recipe = _read_weights(folder, device)
    expected = state_dict(graph)
    missing = set(expected) - set(weights) - made_by_recipe
    unexpected = set(weights) - set(expected)
    if missing or unexpected:
        raise GraphoptError(f"weights in '{folder}' do not match the recipe "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for name, value in weights.items():
        if tuple(expected[name].shape) != tuple(value.shape):
            raise GraphoptError(f"weight '{name}' has shape {tuple(value.shape)}, the recipe "
                                f"gives {tuple(expected[name].shape)}: files from different runs?")
        graph.set_param(name, value)
    graph.example_inputs = graph.family.example_inputs(recipe.model["config"], spec)
    graph.refresh()
    return graph


def _source_next_to(folder: Path, source):
    """A relative path in a recipe is relative to the recipe's folder, never to the working
    directory; shipped names and absolute paths stay as they are."""
    from graphopt.capture import shipped_names

    if not isinstance(source, str) or source in shipped_names() or Path(source).is_absolute():
        return source
    return str((folder / source).resolve())


def _read_weights(folder: Path, device) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The saved tensors, and the names the index says replaying the recipe creates."""
    from safetensors.torch import load_file

    if (folder / WEIGHTS).exists():
        return load_file(str(folder / WEIGHTS), device=device), set()
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    weights = {}
    for shard in sorted(set(index["weight_map"].values())):
        if not (folder / shard).exists():
            raise GraphoptError(f"shard '{shard}' listed in '{folder / WEIGHTS_INDEX}' is missing")
        weights.update(load_file(str(folder / shard), device=device))
    return weights, set(index.get("metadata", {}).get("made_by_recipe", []))
