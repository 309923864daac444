"""ONNX export of a (compressed) DiTGraph, in two layouts, and loading it back into onnxruntime.

`export_onnx(graph, out_dir, layout="single")` writes `out_dir/model.onnx`: the whole model, router
included, each routed block an ONNX `If` (from its `torch.cond`), so a block whose gate is off for
every sample of the batch costs nothing; per-sample gates are applied with `Where`, as in PyTorch.
Outputs: `sample` and, for a routed model, `gates` (bool [batch, n_routed], what the router chose),
so a runtime can report which blocks ran. The file's metadata holds the source config
(`graphopt.config`) and which gate column each block reads (`graphopt.blocks`).

`export_onnx(graph, out_dir, layout="segmented")` writes the layout of `manifest.py` (read its
docstring): the top-level graph is cut into a prologue (everything up to the first block, the router
-> `gates` included), one file per block (a routed block's conditional branch) and an epilogue. Cut
rules, checked with a GraphoptError naming the node where they fail:
- every block reads the stream the previous block wrote, nothing computed in between (glue between
  blocks that depends on the stream, as in a model that re-projects its stream halfway, has no
  place in the contract: use the single layout);
- a block's other inputs (timestep projections, rotary tables, text states) do not depend on the
  stream, so the prologue computes them once; the router reads the stream entering the first block;
- a size read from a tensor (dynamic batch) is recomputed inside the segment that needs it, from
  a tensor it receives, so only tensors cross the boundaries.

Shapes: the batch axis is dynamic ("batch"); frames, height, width and text length stay those of
the capture (Wan's rotary table and unpatchify constants are specialized by torch.export at capture
time, so the files are valid for that latent size). A graph captured with a static batch is
re-captured with a symbolic one (architecture from its recipe, weights and router copied) at batch 2:
torch.export specializes a batch of 1. Opset 20 by default: from opset 23 the exporter emits the
fused `Attention` op, which TensorRT fails to build inside an `If` (see trt_check).

`load_onnx(path)` returns a callable with the diffusers transformer's call signature for either
layout (`SegmentedModel` or `SingleFileModel`), recording per call the blocks that ran and the time.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from graphopt import router
from graphopt.dropin import fixed_inputs
from graphopt.errors import GraphoptError
from graphopt.io import atomic_dir, check_output_dir
from graphopt.exporters.manifest import DimRange, SegmentedManifest
from graphopt.exporters.specs import Segment
from graphopt.exporters.segments import GATES_NAME, OUTPUT_NAME, plan_segments

LAYOUTS = ("single", "segmented")
DEFAULT_OPSET = 20
SINGLE_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
BATCH = "batch"
# TensorRT optimization-profile range written for the batch axis: min 1, opt 2 (one CFG pair), max 8.
BATCH_RANGE = DimRange(1, 2, 8)
META_CONFIG, META_BLOCKS, META_FIXED = "graphopt.config", "graphopt.blocks", "graphopt.fixed_inputs"
COMPUTED_NAME = "cache_computed"     # single file: whether the cache pass's blocks computed
META_REUSE = "graphopt.reuse"      # the cache slots a reusing model threads from step to step
_EXPORT_BATCH = 2

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64", torch.int64: "int64", torch.int32: "int32", torch.int8: "int8",
                torch.uint8: "uint8", torch.bool: "bool"}


# -- export ---------------------------------------------------------------------------------------


def export_onnx(graph, out_dir: str | os.PathLike, *, layout: str = "single", dynamic: bool = True,
                opset: int | None = None, overwrite: bool = False, protect=()) -> Path:
    """Export `graph` (a DiTGraph: plain, pruned, dropped and/or routed) to ONNX under `out_dir`.

    Returns the path to load: `out_dir/model.onnx` (single) or `out_dir/manifest.json` (segmented).
    `out_dir` is written whole or not at all (assembled in a temporary folder next to it, then
    renamed over it). It is refused if it holds files graphopt did not write (unless `overwrite`),
    or is or contains the graph's source or a path in `protect` (graphopt.io.check_output_dir),
    checked before the export starts. The router is exported as AOTInductor exports it
    (`graphopt.router.for_export`): its inference gates, or a `force_gates` set on it baked in.
    `dynamic=False` keeps the captured batch
    (single layout only: the segmented contract selects samples along a named batch axis).
    """
    if layout not in LAYOUTS:
        raise GraphoptError(f"ONNX layout '{layout}' unknown; choose one of {LAYOUTS}")
    if layout == "segmented" and not dynamic:
        raise GraphoptError("the segmented layout needs a dynamic batch axis (its gates select samples "
                            "along it): use dynamic=True, or layout='single' for a fixed batch")
    if graph.is_meta:
        raise GraphoptError(
            "this graph has no weights (meta device): ONNX export runs the graph on example inputs to "
            "trace every segment, which meta tensors cannot do. Export a graph with weights (graphopt.load "
            "the compressed folder, or stream the weights in first)")
    _import_onnx_exporter()
    protect = [graph.source, *protect]
    check_output_dir(out_dir, protect=protect, overwrite=overwrite)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    source = _exportable(graph, dynamic)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, protect=protect, overwrite=overwrite, what="graphopt export_onnx") as tmp:
        if layout == "single":
            _export_single(source, tmp / SINGLE_FILE, dynamic, opset)
            result = SINGLE_FILE
        else:
            _export_segmented(source, tmp, opset)
            result = MANIFEST_FILE
    return out_dir / result


def _import_onnx_exporter() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise GraphoptError("ONNX export needs onnx and onnxscript: pip install 'graphopt[onnx]'") from exc


def _exportable(graph, dynamic: bool):
    """A copy of `graph` ready to trace: router as every exporter has it; symbolic batch if `dynamic`."""
    if dynamic and not _has_symbolic_batch(graph):
        graph = _recapture_dynamic(graph)
    else:
        graph = graph.copy()
    router.for_export(graph)
    return graph


def _has_symbolic_batch(graph) -> bool:
    latent = graph.latent_input
    node = next((p for p in graph.placeholders() if p.name == latent), None)
    val = node.meta.get("val") if node is not None else None
    return isinstance(val, torch.Tensor) and isinstance(val.shape[0], torch.SymInt)


def _recapture_dynamic(graph):
    """Re-capture `graph`'s architecture with a symbolic batch, replay its recipe, copy its weights."""
    from graphopt.serialize import state_dict

    if graph.family is None or not graph.recipe.model.get("config"):
        raise GraphoptError(
            f"cannot make the batch of '{graph.source}' dynamic: it was not captured from a known model "
            "family (e.g. a .pt2 archive). Capture it with graphopt.capture(..., dynamic_batch=True) at a "
            "batch of 2, or export with dynamic=False")
    # float32 whatever the graph's dtype (rebuilt from its config without dtypes, the model is): ONNX's
    # Conv has no bfloat16 before opset 22, onnxruntime's CPU kernels none at all. Upcasting is exact;
    # TensorRT picks its precision when it builds.
    device = next((p.device for p in graph.gm.parameters()), torch.device("cpu"))
    new = graph.recipe.rebuild(device, batch=_EXPORT_BATCH, dynamic_batch=True)
    weights = state_dict(graph)
    expected = state_dict(new)
    if set(weights) != set(expected):
        raise GraphoptError(
            "replaying the recipe on a dynamic-batch capture gave other weights than the graph holds "
            f"(e.g. {sorted(set(weights) ^ set(expected))[:3]}); export with dynamic=False")
    for name, value in weights.items():
        new.set_param(name, value.detach().float() if value.is_floating_point() else value.detach())
    if hasattr(graph.gm, "router"):
        import copy

        new.gm.router = copy.deepcopy(graph.gm.router).float()    # budget, mode and weights as trained
    new.example_inputs = graph.family.example_inputs(graph.recipe.model["config"], new.spec)
    new.refresh()
    return new


def _tensor_inputs(graph) -> dict[str, torch.Tensor]:
    """The example inputs that become graph inputs (tensors), in placeholder order."""
    names = [p.name for p in graph.placeholders()]
    inputs = {k: v for k, v in graph.example_inputs.items() if isinstance(v, torch.Tensor)}
    return {k: inputs[k] for k in names if k in inputs}


class _Named(torch.nn.Module):
    """A positional forward whose parameters carry the input names (ONNX names its inputs after them).

    keyword: `module(name_0=t_0, ..., **fixed)` (a captured model); else `module(t_0, ...)` (a segment).
    Returns `pick(result)`.
    """

    def __init__(self, module, names: Sequence[str], fixed: Mapping[str, Any], pick, keyword: bool):
        super().__init__()
        self.module = module
        self.names = list(names)
        self.fixed = dict(fixed)
        self.pick = pick
        self.keyword = keyword

    def forward(self, *tensors):
        if self.keyword:
            return self.pick(self.module(**dict(zip(self.names, tensors)), **self.fixed))
        return self.pick(self.module(*tensors))


def _named(module, names: Sequence[str], *, fixed: Mapping[str, Any] | None = None, pick=None,
           keyword: bool = False) -> torch.nn.Module:
    import types

    # torch.export binds inputs through inspect.signature(forward): one parameter per name, on a
    # per-call subclass so the signatures of two exports never mix.
    forward = types.FunctionType(_Named.forward.__code__, _Named.forward.__globals__, "forward")
    p = inspect.Parameter
    forward.__signature__ = inspect.Signature(
        [p("self", p.POSITIONAL_OR_KEYWORD)] + [p(n, p.POSITIONAL_OR_KEYWORD) for n in names])
    cls = type("Forward", (_Named,), {"forward": forward})
    return cls(module, names, fixed or {}, pick or (lambda out: out), keyword)


def _onnx_export(module: torch.nn.Module, args: tuple, names: Sequence[str], batch_axes: Sequence[Sequence[int]],
                 output_names: Sequence[str], opset: int, where: str):
    """torch.onnx.export (dynamo) with the batch axis of each input named BATCH; returns the ONNXProgram."""
    dynamic_shapes = None
    if any(batch_axes):
        batch = torch.export.Dim(BATCH, min=1, max=1024)
        dynamic_shapes = tuple({axis: batch for axis in axes} or None for axes in batch_axes)
    quiet = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._export")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # torch.export first, non-strict: the ONNX exporter's own tracing of LTX-Video's block
            # segments failed to relate a view's size to the symbolic batch; this one does not.
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            return torch.onnx.export(
                program, args, dynamo=True, opset_version=opset, output_names=list(output_names),
                optimize=True, verbose=False, report=False)
    except GraphoptError:
        raise
    except Exception as exc:  # the exporter raises many types; name the segment and the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphoptError(f"torch.onnx.export failed on {where}: {first}") from exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def _save(program, path: Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write an ONNXProgram (external data beside it when the weights pass 2 GB) and check it."""
    import onnx

    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value
    program.save(str(path))          # onnxscript moves weights to `<name>.data` above 2 GB
    model = onnx.load(str(path), load_external_data=False)
    if _name_batch_dims(model) + _bool_where_to_uint8(model):
        onnx.save(model, str(path))  # weights stay where they are: only names and nodes changed
    onnx.checker.check_model(str(path))


def _name_batch_dims(model) -> int:
    """Call the batch axis BATCH in every declared shape (inputs, outputs, value_info, subgraphs
    included). torch.export names it after its symbol (s0, s31, ...); the batch is the one dynamic
    axis of an export, so every such symbol is the batch. Returns how many dims were renamed."""
    import re

    import onnx

    symbol = re.compile(r"\bs\d+\b")
    count = 0

    def rename(graph):
        nonlocal count
        for v in [*graph.input, *graph.output, *graph.value_info]:
            for d in v.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and symbol.search(d.dim_param):
                    d.dim_param = symbol.sub(BATCH, d.dim_param)
                    count += 1
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    rename(a.g)

    rename(model.graph)
    return count


def _bool_where_to_uint8(model) -> int:
    """Rewrite every Where on bool values (e.g. a bool mask's masked_fill) as Where on uint8
    between Casts: onnxruntime's CPU kernel has no bool Where. Returns how many were rewritten."""
    import onnx
    from onnx import TensorProto, helper

    from graphopt.exporters.trt_check import elem_types

    types = elem_types(model)
    count = 0

    def rewrite(graph):
        nonlocal count
        nodes = []
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    rewrite(a.g)
            if node.op_type != "Where" or types.get(node.output[0]) != TensorProto.BOOL:
                nodes.append(node)
                continue
            cond, x, y = node.input
            tag = f"{node.name or node.output[0]}_u8"
            nodes += [helper.make_node("Cast", [x], [f"{tag}_x"], to=TensorProto.UINT8),
                      helper.make_node("Cast", [y], [f"{tag}_y"], to=TensorProto.UINT8),
                      helper.make_node("Where", [cond, f"{tag}_x", f"{tag}_y"], [tag], name=node.name),
                      helper.make_node("Cast", [tag], [node.output[0]], to=TensorProto.BOOL)]
            count += 1
        del graph.node[:]
        graph.node.extend(nodes)

    rewrite(model.graph)
    return count


def _export_single(graph, path: Path, dynamic: bool, opset: int) -> None:
    """One file. A graph that reuses residuals gets its state lifted (graphopt.reuse.lift_state):
    inputs `cache_valid` and `cache_<slot>`, outputs `next_<slot>` after `sample` (and `gates`)."""
    from tqdm.auto import tqdm

    from graphopt import reuse

    inputs = _tensor_inputs(graph)
    names = list(inputs)
    routed = hasattr(graph.gm, "router")
    gm = graph.gm
    if routed:
        router.add_gates_output(gm, router.gates_node(graph))
    # The cache pass's decision (did its blocks compute?) as an output, for the per-call records.
    decision = next((u.first.args[0] for u in router.units(graph) if u.cached), None)
    if decision is not None:
        router.add_output(gm, decision)
    extra = [GATES_NAME] * routed + [COMPUTED_NAME] * (decision is not None)
    output_names = [OUTPUT_NAME] + extra
    pick = (lambda out: (out[0], *out[len(out) - len(extra):])) if extra else (lambda out: out[0])
    batch_axes = [[0] if dynamic and v.dim() > 0 else [] for v in inputs.values()]
    metadata = {}
    if reuse.reuses(graph):
        slots = reuse.slot_examples(graph)
        gm, keys = reuse.lift_state(gm)
        state_names = [reuse.VALID_INPUT] + [f"cache_{k}" for k in keys]
        inputs.update(zip(state_names, [torch.tensor(False)] + [slots[k] for k in keys]))
        names += state_names
        batch_axes += [[]] + [[0] if dynamic and _batch_major(gm, f"cache_{k}") else []
                              for k in keys]
        output_names += [f"next_{k}" for k in keys]
        flat = len(gm.graph.output_node().args[0]) - len(keys)     # the model's own outputs
        pick = lambda out: (out[0], *out[flat - len(extra):flat], *out[flat:])  # noqa: E731
        metadata[META_REUSE] = json.dumps({"slots": keys, "timestep": graph.timestep_input,
                                           "latent": graph.latent_input})
    module = _named(gm, names, fixed=fixed_inputs(graph), pick=pick, keyword=True)
    with tqdm(total=1, desc="ONNX export (single file)", unit="file", leave=False) as bar:
        program = _onnx_export(module, tuple(inputs.values()), names, batch_axes, output_names, opset,
                               "the whole model")
        _save(program, path, {META_CONFIG: _config_json(graph), META_BLOCKS: json.dumps(router.block_table(graph)),
                              META_FIXED: json.dumps(_fixed_json(graph)), **metadata})
        bar.update()


def _batch_major(gm, name: str) -> bool:
    """Whether the lifted input `name` is laid out batch first (its first size is the symbol)."""
    node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name)
    val = node.meta.get("val")
    if val is None or val.dim() == 0:
        return False
    if not isinstance(val.shape[0], torch.SymInt):
        return False
    if len(val.shape[0].node.expr.free_symbols) != 1 or not val.shape[0].node.expr.is_Symbol:
        raise GraphoptError(f"cache slot '{name}' has {val.shape[0]} rows, not one per sample: "
                            f"reuse exports support streams laid out batch first")
    return True


def _fixed_json(graph) -> dict[str, Any]:
    """The non-tensor forward arguments the export bakes in (sizes, flags), as JSON values."""
    fixed = {k: v for k, v in fixed_inputs(graph).items() if k != "return_dict"}
    return json.loads(json.dumps(fixed, default=list))


def _config_json(graph) -> str:
    return json.dumps(_jsonable_config(graph.config))


def _jsonable_config(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in json.loads(json.dumps(dict(config), default=lambda _: None)).items()}


# -- the segmented layout -------------------------------------------------------------------------


def _example_values(graph, wanted: set[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of `wanted` parent nodes on the graph's example inputs."""

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    values: dict[fx.Node, torch.Tensor] = {}
    with torch.no_grad():
        Recorder(graph.gm).run(*graph.flat_inputs(graph.example_inputs))
    return values


def _batch_axes(node: fx.Node, batch: Any) -> list[int]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return []
    return [a for a, d in enumerate(val.shape) if isinstance(d, torch.SymInt) and d.node.expr == batch]


def _export_segmented(graph, out: Path, opset: int) -> None:
    from tqdm.auto import tqdm

    from graphopt import reuse

    plans, stream, gates = plan_segments(graph)
    latent = next(p for p in graph.placeholders() if p.name == graph.latent_input)
    batch = latent.meta["val"].shape[0].node.expr
    values = _example_values(graph, {node for plan in plans for _, node in plan.inputs})
    reuse.reset_cache(graph)            # the example call is no step of a user's run
    segments = []
    for plan in tqdm(plans, desc="ONNX export (segments)", unit="file", leave=False):
        names = [name for name, _ in plan.inputs]
        args = tuple(values[node] for _, node in plan.inputs)
        axes = [_batch_axes(node, batch) for _, node in plan.inputs]
        module = _named(plan.module, names)
        program = _onnx_export(module, args, names, axes, plan.outputs, opset, f"segment {plan.file}")
        _save(program, out / plan.file)
        declared = Segment.from_onnx(out / plan.file)
        segments.append(Segment(plan.kind, plan.file, declared.inputs, declared.outputs, plan.block, plan.gate,
                                plan.reuse))
    readers = {spec.name: spec for seg in segments for spec in seg.inputs}
    model_inputs = [readers[p.name] for p in graph.placeholders() if p.name in readers]
    manifest = SegmentedManifest(
        inputs=tuple(model_inputs), outputs=segments[-1].outputs, stream=tuple(stream), gates=gates,
        segments=tuple(segments), dims={BATCH: BATCH_RANGE}, batch_dim=BATCH,
        config=_jsonable_config(graph.config), fixed_inputs=_fixed_json(graph),
        reuse={"valid": reuse.VALID_INPUT, "timestep": graph.timestep_input, "latent": graph.latent_input}
        if reuse.reuses(graph) else None)
    manifest.save(out / MANIFEST_FILE)


# -- loading --------------------------------------------------------------------------------------


def load_onnx(path: str | os.PathLike, *, providers: Sequence[Any] | None = None, device: str | torch.device = "cpu",
              session_options: Any = None):
    """A diffusers-transformer stand-in over an export: `model(hidden_states=..., timestep=...,
    encoder_hidden_states=..., return_dict=False)[0]`, with `.config`, `.dtype`, `.cache_context` and
    `.records` (one StepRecord per call: blocks executed and skipped, gates, seconds).

    `path`: a folder written by `export_onnx` (manifest.json → segmented, model.onnx → single file),
    a manifest.json, or a .onnx file. `providers`: onnxruntime execution providers (default: CPU, or
    the CUDA EP on the device's index when `device` is cuda); `session_options`: an
    onnxruntime.SessionOptions for every session (threads, graph optimization level).
    """
    from graphopt.exporters.ort_runner import OrtBackend, SingleFileModel
    from graphopt.exporters.runtime import SegmentedModel

    path = Path(path)
    if path.is_dir():
        candidates = [path / MANIFEST_FILE, path / SINGLE_FILE]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise GraphoptError(f"'{path}' holds neither {MANIFEST_FILE} nor {SINGLE_FILE}: point at a folder "
                                "written by graphopt.exporters.onnx.export_onnx (or `graphopt export`)")
        path = found
    if not path.is_file():
        raise GraphoptError(f"ONNX export not found: {path}")
    if path.suffix == ".json":
        return SegmentedModel(path, backend=OrtBackend(providers, session_options), device=device)
    if path.suffix != ".onnx":
        raise GraphoptError(f"'{path}' is neither a manifest.json nor a .onnx file")
    return SingleFileModel(path, providers=providers, device=device, session_options=session_options)
