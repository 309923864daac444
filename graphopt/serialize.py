"""save / load a compressed model: recipe.json + model.safetensors + config.json in one folder.

`load` needs no pickle: it rebuilds the architecture from config.json on the meta device, captures
it at the recorded input shape, replays the recipe (structure only), then assigns the saved
weights. The folder is assembled next to its destination and renamed into place.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from graphopt.errors import GraphoptError
from graphopt.io import atomic_write_text, save_safetensors

WEIGHTS = "model.safetensors"
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        graph.recipe.save(tmp / RECIPE)
        save_safetensors(state_dict(graph), tmp / WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG, json.dumps(graph.recipe.model["config"], indent=2))
        for name, text in (extra_files or {}).items():
            atomic_write_text(tmp / name, text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(folder, *, device: str = "cpu"):
    """Rebuild the compressed DiTGraph saved by `save` (or written by `graphopt compress`)."""
    from safetensors.torch import load_file

    from graphopt import families
    from graphopt.capture import capture
    from graphopt.recipe import Recipe

    folder = Path(folder)
    for name in (RECIPE, WEIGHTS):
        if not (folder / name).exists():
            raise GraphoptError(f"'{folder}' has no {name}: point at a folder written by "
                                f"`graphopt compress` or graphopt.save")
    recipe = Recipe.load(folder / RECIPE)
    spec = families.spec_from_recipe(recipe.model, device)
    # Uninitialised storage on the target device: every tensor is overwritten from the file, and
    # a meta capture would bake the meta device into the graph.
    model = families.build_from_recipe(recipe.model, device="meta").to_empty(device=device)
    graph = capture(model, spec=spec)
    recipe.replay(graph)
    weights = load_file(str(folder / WEIGHTS), device=device)
    expected = state_dict(graph)
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        raise GraphoptError(f"weights in '{folder / WEIGHTS}' do not match the recipe "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for name, value in weights.items():
        if tuple(expected[name].shape) != tuple(value.shape):
            raise GraphoptError(f"weight '{name}' has shape {tuple(value.shape)}, the recipe "
                                f"gives {tuple(expected[name].shape)}: files from different runs?")
        graph.set_param(name, value)
    graph.example_inputs = graph.family.example_inputs(recipe.model["config"], spec)
    graph.refresh()
    return graph
