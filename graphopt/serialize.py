"""save / load a compressed model: recipe.json + model.safetensors + config.json in one folder.

`load` needs no pickle: it rebuilds the architecture from config.json on the meta device, captures
it at the recorded input shape, replays the recipe (structure only), then assigns the saved
weights. The folder is assembled next to its destination and renamed into place.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from graphopt.errors import GraphoptError
from graphopt.io import atomic_dir, atomic_write_text, read_index, save_safetensors

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"    # sharded weights (written by `graphopt apply`)
RECIPE = "recipe.json"
CONFIG = "config.json"


def state_dict(graph) -> dict[str, torch.Tensor]:
    sd = dict(graph.gm.named_parameters())
    sd.update(dict(graph.gm.named_buffers()))
    return sd


def save(graph, out, extra_files: dict[str, str | Callable[[Path], None]] | None = None, *,
         overwrite: bool = False, protect=()) -> Path:
    """Write graph's recipe, weights and source config to folder `out` (replaced whole), with
    `extra_files`: name -> text, or name -> a function that writes the file at the path it gets
    (a plot), so the folder appears with every file its report links.

    `out` is refused if it holds files graphopt did not write (unless `overwrite`), or is or
    contains the graph's source or a path in `protect` (see graphopt.io.check_output_dir)."""
    if graph.is_meta:
        raise GraphoptError("this graph has no weights (meta device): save its recipe with "
                            "graph.recipe.save(path) and stream weights with `graphopt apply`")
    out = Path(out)
    with atomic_dir(out, protect=[graph.source, *protect], overwrite=overwrite,
                    what="graphopt.save") as tmp:
        graph.recipe.save(tmp / RECIPE)
        save_safetensors(state_dict(graph), tmp / WEIGHTS, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG, json.dumps(graph.recipe.model["config"], indent=2))
        for name, content in (extra_files or {}).items():
            if callable(content):
                content(tmp / name)
            else:
                atomic_write_text(tmp / name, content)
    return out


def load(folder, *, device: str = "cpu"):
    """Rebuild the compressed DiTGraph saved by `save` (or written by `graphopt compress` or, in
    graphopt's layout, by `graphopt apply`)."""
    from graphopt.recipe import Recipe

    folder = Path(folder)
    if not (folder / RECIPE).exists() or not any((folder / n).exists()
                                                  for n in (WEIGHTS, WEIGHTS_INDEX)):
        raise GraphoptError(f"'{folder}' has no {RECIPE} and {WEIGHTS} (or {WEIGHTS_INDEX}): "
                            f"point at a folder written by `graphopt compress`, graphopt.save "
                            f"or `graphopt apply`")
    recipe = Recipe.load(folder / RECIPE)
    weights, made_by_recipe = _read_weights(folder, device)
    # Uninitialised storage on the target device: every tensor is overwritten from the file, and
    # a meta capture would bake the meta device into the graph. The capture also bakes in dtypes:
    # each tensor gets the one it is stored in (a bf16 checkpoint stays bf16) before it.
    graph = recipe.rebuild(device, dtypes={k: v.dtype for k, v in weights.items()})
    # Still the model the recipe was made from (`graphopt distill` finds its teacher there).
    graph.source = graph.recipe.model["source"] = _source_next_to(folder, recipe.model.get("source", graph.source))
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
    graph.example_inputs = graph.family.example_inputs(recipe.model["config"], graph.spec)
    graph.refresh()
    return graph


def cast_like_checkpoint(model: torch.nn.Module, stored: dict[str, torch.dtype]) -> None:
    """Give each floating parameter and buffer of `model` (best on the meta device, where this
    costs nothing) the dtype `stored` names for it. One `stored` lacks (a dropped block's, a
    buffer the constructor computes) gets the dtype diffusers' from_pretrained(torch_dtype=...)
    would give it: float32 in the class's _keep_in_fp32_modules, else the dtype most of the
    stored weights have."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    sizes: dict[torch.dtype, int] = {}
    for name, t in tensors.items():
        dtype = stored.get(name)
        if dtype is not None and t.is_floating_point() != dtype.is_floating_point:
            raise GraphoptError(f"weight '{name}' is stored as {dtype}, the architecture has a "
                                f"{t.dtype} tensor there: files from different models?")
        if dtype is not None and dtype.is_floating_point:
            sizes[dtype] = sizes.get(dtype, 0) + t.numel()
    main = max(sizes, key=sizes.get, default=None)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, t in tensors.items():
        if not t.is_floating_point():
            continue
        parts = name.split(".")
        dtype = stored.get(name) or (torch.float32 if any(k in parts for k in keep) else main)
        if dtype is None or dtype == t.dtype:
            continue
        module = model.get_submodule(".".join(parts[:-1]))
        if parts[-1] in module._parameters:
            module._parameters[parts[-1]] = torch.nn.Parameter(t.to(dtype), t.requires_grad)
        else:
            module._buffers[parts[-1]] = t.to(dtype)


def _source_next_to(folder: Path, source):
    """A relative path in a recipe is relative to the recipe's folder, never to the working
    directory; shipped names and absolute paths stay as they are."""
    from graphopt.capture import shipped_names

    if not isinstance(source, str) or source in shipped_names() or Path(source).is_absolute():
        return source
    return str((folder / source).resolve())


def _read_weights(folder: Path, device) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The saved tensors, and the names the index says replaying the recipe creates."""
    if (folder / WEIGHTS).exists():
        return _load_safetensors(folder / WEIGHTS, device), set()
    weight_map, metadata = read_index(folder / WEIGHTS_INDEX)
    shards = sorted(set(weight_map.values()))
    made = metadata.get("made_by_recipe", [])
    if not (isinstance(made, list) and all(isinstance(n, str) for n in made)):
        raise GraphoptError(f"'{folder / WEIGHTS_INDEX}': metadata 'made_by_recipe' must list "
                            f"tensor names: write the folder again with `graphopt apply`")
    weights = {}
    for shard in shards:
        if not (folder / shard).exists():
            raise GraphoptError(f"shard '{shard}' listed in '{folder / WEIGHTS_INDEX}' is missing")
        for name, value in _load_safetensors(folder / shard, device).items():
            if name in weights:
                raise GraphoptError(f"weight '{name}' is in two shards of '{folder}': write the "
                                    f"folder again with `graphopt apply`")
            weights[name] = value
    return weights, set(made)


def _load_safetensors(path: Path, device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise GraphoptError(f"'{path}' is not a valid safetensors file ({e}): is it complete?"
                            ) from None
