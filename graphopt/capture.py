"""capture(): any supported model source → DiTGraph, through torch.export (non-strict).

Sources: an nn.Module (+ optional example kwargs), a `.pt2`/`.pt` archive written by
`torch.export.save`, a diffusers model folder (config.json + safetensors), or a shipped model name
such as `tiny-wan`. A model built on the meta device is captured without weights in memory.
Nothing here unpickles code unless `trust_pickle=True`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from graphopt.errors import GraphoptError
from graphopt.graph import DiTGraph


def capture(source, example_inputs: dict | None = None, *, spec=None, trust_pickle: bool = False,
            dynamic_batch: bool = False) -> DiTGraph:
    """Capture `source` as a DiTGraph.

    `spec` (graphopt.layout.InputSpec) picks the latent shape used to synthesize example inputs when
    `example_inputs` is not given. `dynamic_batch` keeps the batch dimension symbolic.
    """
    if isinstance(source, torch.export.ExportedProgram):
        return _from_exported(source, example_inputs, label="ExportedProgram")
    if isinstance(source, (str, os.PathLike)):
        model = load_model(source, trust_pickle=trust_pickle)
        if isinstance(model, torch.export.ExportedProgram):
            return _from_exported(model, example_inputs, label=str(source))
        return _from_module(model, example_inputs, spec, dynamic_batch, label=str(source))
    if isinstance(source, torch.nn.Module):
        return _from_module(source, example_inputs, spec, dynamic_batch,
                            label=type(source).__name__)
    raise GraphoptError(f"cannot capture a {type(source).__name__}: pass an nn.Module, a "
                        f"diffusers model folder, a .pt2 file or a shipped model name")


TINY_PREFIX = "tiny:"   # tiny:<family> = that family's tiny config with seeded random weights


def shipped_names() -> list[str]:
    from graphopt.families import FAMILIES
    from graphopt.tiny import TEACHERS

    return sorted(TEACHERS) + [TINY_PREFIX + f for f in FAMILIES]


def load_model(source, *, trust_pickle: bool = False, meta: bool = False):
    """Resolve a path or name to an nn.Module (diffusers) or an ExportedProgram.

    With `meta=True` only the architecture is built (from config.json), on the meta device.
    """
    from graphopt import families
    from graphopt.tiny import TEACHERS, load_tiny_teacher

    name = str(source)
    if name in TEACHERS:
        model = load_tiny_teacher(name)[0]
        return families.build_model(model, dict(model.config), "meta") if meta else model
    if name.startswith(TINY_PREFIX):
        return families.build_model(name[len(TINY_PREFIX):], device="meta" if meta else "cpu")
    path = Path(source)
    if not path.exists():
        raise GraphoptError(f"model '{name}' not found: give a diffusers model folder, a .pt2 "
                            f"file from torch.export.save, or one of {shipped_names()}")
    if path.is_dir() and meta:
        config = read_config(path)
        family = families.family_for(config)
        try:
            return families.build_model(family, config, "meta")
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise GraphoptError(f"'{path / 'config.json'}' does not describe a buildable "
                                f"{config.get('_class_name')} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:100]}); fix its values") from None
    if path.is_dir():
        return _load_diffusers_folder(path, trust_pickle)
    if path.suffix in (".pt2", ".pt"):
        if meta:
            raise GraphoptError(f"--meta needs a model folder (config.json), not '{name}'")
        from graphopt.pt2 import load_exported

        return load_exported(path, trust_pickle=trust_pickle)
    raise GraphoptError(f"'{name}' is neither a model folder nor a .pt2/.pt archive "
                        f"(torch.export.save); convert it with torch.export first")


def read_config(path: Path) -> dict:
    """A diffusers model folder's config.json as a dict (one-line errors for a missing or bad file)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise GraphoptError(f"'{path}' has no config.json: point at a diffusers model folder "
                            f"(the one holding config.json and *.safetensors)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GraphoptError(f"'{cfg_file}' is not valid JSON ({e}); write it again with "
                            f"save_pretrained") from None
    if not isinstance(config, dict):
        raise GraphoptError(f"'{cfg_file}' holds {type(config).__name__}, not a JSON object; a "
                            f"diffusers config.json is an object with '_class_name'")
    return config


def _load_diffusers_folder(path: Path, trust_pickle: bool):
    import diffusers

    cfg_file = path / "config.json"
    config = read_config(path)
    cls_name = config.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise GraphoptError(f"'{cfg_file}' names no diffusers model class (_class_name="
                            f"{cls_name!r}); graphopt loads diffusers transformer folders")
    has_safetensors = any(path.glob("*.safetensors"))
    if not trust_pickle:
        _check_no_pickled_weights(path, has_safetensors)
    try:
        return cls.from_pretrained(path, use_safetensors=has_safetensors or None)
    except Exception as e:  # diffusers reports corrupt or mismatched weights in many ways
        raise GraphoptError(f"cannot load weights from '{path}': {str(e).splitlines()[0]}. "
                            f"Check that the files are complete and match config.json") from None


def _check_no_pickled_weights(path: Path, has_safetensors: bool) -> None:
    """Refuse a folder from which diffusers would unpickle weights: one without safetensors, or
    one whose safetensors index (which diffusers follows whatever the shard names) lists others."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME

    if not has_safetensors:
        raise GraphoptError(f"'{path}' holds no *.safetensors weights; loading pickled .bin weights "
                            f"can run code: convert them to safetensors, or pass --trust-pickle")
    index = path / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        from graphopt.io import read_index

        shards = set(read_index(index)[0].values())
        pickled = sorted(str(s) for s in shards if not str(s).endswith(".safetensors"))
        if pickled:
            raise GraphoptError(f"'{index}' lists weights that are not safetensors ({pickled[0]}); "
                                f"loading them can run code: convert them to safetensors, or pass "
                                f"--trust-pickle if you trust the folder")


def _from_module(model: torch.nn.Module, example_inputs, spec, dynamic_batch, label) -> DiTGraph:
    from graphopt import families

    family = families.family_for(model) if example_inputs is None else _try_family(model)
    config = dict(getattr(model, "config", {}) or {})
    if example_inputs is None:
        spec = spec or family.default_spec
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        # The dtype most weights have: a model loaded with torch_dtype keeps a few modules in
        # float32 (diffusers' _keep_in_fp32_modules), and the first parameter may be one of them.
        sizes: dict[torch.dtype, int] = {}
        for p in model.parameters():
            if p.is_floating_point():
                sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
        dtype = max(sizes, key=sizes.get, default=torch.float32)
        spec = spec.__class__(**{**spec.__dict__, "device": device, "dtype": dtype})
        example_inputs = family.example_inputs(config, spec)
    if family is not None:
        model = family.prepare_for_export(model, spec or family.default_spec)
    model.eval()
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1024)
        # Non-tensor inputs (LTX's rope_interpolation_scale tuple) get a spec of their own structure.
        dynamic = {k: {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else
                   torch.utils._pytree.tree_map(lambda _: None, v)
                   for k, v in example_inputs.items()}
    try:
        ep = torch.export.export(model, (), example_inputs, strict=False, dynamic_shapes=dynamic)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphoptError(
            f"torch.export could not capture {label}: {first}. Check that the example inputs "
            f"match the model (shapes divisible by the patch size, text width = config's text "
            f"dim); run with --debug for the full trace") from None
    token_layout = family.token_layout(config, spec) if family is not None and spec else None
    return _finish(ep.module(), example_inputs, family, config, spec, token_layout, label)


def _try_family(model):
    from graphopt import families
    try:
        return families.family_for(model)
    except GraphoptError:
        return None


def _from_exported(ep, example_inputs, label) -> DiTGraph:
    from graphopt import pt2

    if example_inputs is None:
        example_inputs = pt2.example_inputs(ep)
    if not example_inputs:
        raise GraphoptError(f"{label} carries no example inputs; pass example_inputs to capture()")
    # The family, config and input size the program was exported at, read from the program itself,
    # so that role-aware passes know the token layout and graphopt.load can rebuild the result.
    family, config, spec = pt2.identify(ep, example_inputs)
    token_layout = family.token_layout(config, spec) if spec is not None else None
    # Traced again, as a fresh capture is: the graph torch.export.load deserializes gives routed
    # blocks' torch.cond branches strides cond cannot merge (route fails on it).
    try:
        ep = torch.export.export(ep.module(), (), example_inputs, strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphoptError(f"torch.export could not trace {label} again: {first}; run with "
                            f"--debug for the full trace") from None
    return _finish(ep.module(), example_inputs, family, config, spec, token_layout, label)


def _finish(gm, example_inputs, family, config, spec, token_layout, label) -> DiTGraph:
    graph = DiTGraph(gm, example_inputs, family=family, config=config, spec=spec,
                     token_layout=token_layout, source=label)
    if not graph.blocks:
        raise GraphoptError(f"{label} has no transformer blocks with attention: graphopt works on "
                            f"diffusion transformers (DiTs) whose blocks sit in a ModuleList")
    return graph
