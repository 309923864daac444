"""AOTInductor: a compressed DiTGraph compiled ahead of time into one `.pt2` package, and loaded back.

`export_aoti(graph, path)` re-exports the graph's module with torch.export at its example inputs and
compiles it with `torch._inductor.aoti_compile_and_package` for the device its weights are on (CPU
or CUDA). Routed blocks stay `torch.cond`s, which Inductor compiles to an if/else in the generated
code: a block whose conditional does not run costs nothing. What the package runs is the module as
it stands: the router's budget and any `force_gates` are baked in (the metadata records both). Its
outputs are the model's and, for a routed model, the router's hard gates, so the loaded model can
say which blocks ran. Shapes are those of the capture (a dynamic-batch capture keeps its symbolic
batch). The package is compiled in a marked temporary folder next to it (one a killed run left
is deleted by the next) and renamed into place.

`load_aoti(path)` returns an `AOTIModel`, called like the diffusers transformer
(`graphopt.dropin.FacadeModel`): it can replace `pipe.transformer`.

Inductor fixes applied during compilation (torch 2.13), both silent wrong results in AOTInductor
(`_inductor_cond_fixes`):
- operand strides: Inductor lowers a cond's branches for the strides its operands had when traced,
  but passes the operands in whatever layout their producers were given later (e.g. a pointwise
  result stored transposed for the matmul that reads it); the branch then reads the wrong elements.
  Each operand is pinned to its traced strides (a copy only where the layouts differ).
- predicates: the C++ wrapper reads a cond's predicate into a C++ bool named after the predicate's
  buffer and reads it once per buffer (`used_cond_predicate`), but a view's name is its base
  buffer's: the routed blocks' predicates `run[0]`, `run[1]`, … are views of one `run` buffer, so
  every cond took block 0's decision (block 0 skipped → every block skipped). Each predicate is
  copied into a buffer of its own (one bool).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import fx

from graphopt import reuse
from graphopt.dropin import FacadeModel, fixed_inputs, input_specs, spec_of
from graphopt.errors import GraphoptError
from graphopt.exporters.specs import TensorSpec
from graphopt.io import scratch_dir

META = "graphopt"    # metadata keys: graphopt.config, .inputs, .fixed, .blocks, .router


def export_aoti(graph, path: str | os.PathLike) -> Path:
    """Compile `graph` (plain or compressed, routed included) into the AOTInductor package `path`."""
    from tqdm.auto import tqdm

    from graphopt.router import add_gates_output, add_output, block_table, for_export, gates_node, units

    path = Path(path)
    if path.suffix != ".pt2":
        raise GraphoptError(f"an AOTInductor package is a .pt2 file; got '{path}' (name it e.g. "
                            f"{path.with_suffix('.pt2').name})")
    if path.is_dir():
        raise GraphoptError(f"'{path}' is a folder: give the package's file path, e.g. "
                            f"{path / 'model.pt2'}")
    if graph.is_meta:
        raise GraphoptError("this graph has no weights (meta device): AOTInductor compiles the "
                            "weights into the package. Load the compressed folder with "
                            "graphopt.load, or stream the weights in first")
    source = graph.copy()
    router = for_export(source)
    gm = source.gm
    if router is not None:
        add_gates_output(gm, gates_node(source))
    # The cache pass's decision (did its blocks compute?) as an output, for the per-call records.
    decision = next((u.first.args[0] for u in units(source) if u.cached), None)
    if decision is not None:
        add_output(gm, decision)
    inputs = {k: v for k, v in source.example_inputs.items()}
    state = None
    if reuse.reuses(source):
        # The cache slots become inputs and outputs (graphopt.reuse.lift_state) that the loaded
        # model threads from call to call, as the single-file ONNX model does.
        slots = reuse.slot_examples(source)
        gm, keys = reuse.lift_state(gm)
        inputs.update({reuse.VALID_INPUT: torch.tensor(False), **{f"cache_{k}": slots[k] for k in keys}})
        lifted = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
        state = {"slots": keys, "timestep": source.timestep_input, "latent": source.latent_input,
                 "specs": [spec_of(f"cache_{k}", lifted[f"cache_{k}"]).to_json() for k in keys]}
    metadata = {
        f"{META}.config": json.dumps(source.recipe.model.get("config") or {}),
        f"{META}.inputs": json.dumps([s.to_json() for s in input_specs(source)]),
        f"{META}.fixed": json.dumps(fixed_inputs(source), default=str),   # only keys matter: the
        # package takes tensors; the call still names every captured argument
        f"{META}.blocks": json.dumps(block_table(source)),
        f"{META}.router": json.dumps(None if router is None else {
            "budget": router.budget,
            "force_gates": None if router.force_gates is None else router.force_gates.tolist()}),
        f"{META}.reuse": json.dumps(state),
    }
    with scratch_dir(path, what="graphopt export_aoti") as tmp:
        with tqdm(total=2, desc="AOTInductor", unit="stage", leave=False) as bar:
            bar.set_postfix_str("torch.export")
            try:
                program = torch.export.export(gm, (), inputs, strict=False,
                                              dynamic_shapes=_batch_shapes(gm, inputs))
            except Exception as e:  # torch.export reports failures in many exception types
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise GraphoptError(f"torch.export of the compressed graph failed: {first}") from e
            bar.update()
            bar.set_postfix_str("compile")
            with _inductor_cond_fixes():
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(tmp / path.name),
                    inductor_configs={"aot_inductor.metadata": metadata})
            bar.update()
        os.replace(tmp / path.name, path)
    return path


def _batch_shapes(gm, inputs: dict) -> dict | None:
    """torch.export's dynamic_shapes keeping a dynamic-batch capture's symbolic batch (axis 0 of
    every input, cache slots included, whose traced value has a symbolic axis 0). Without them
    export specializes to the example batch, yet the package's input specs, read from the
    graph, declare the batch dynamic: a call at another batch ran on the example's and returned
    wrong numbers without an error."""
    vals = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = {k: {0: batch} if isinstance(vals.get(k), torch.Tensor) and vals[k].dim() > 0
              and isinstance(vals[k].shape[0], torch.SymInt) else None for k in inputs}
    return shapes if any(shapes.values()) else None


def load_aoti(path: str | os.PathLike, *, device: str | torch.device | None = None) -> "AOTIModel":
    """The package at `path` as a diffusers-style transformer (see `AOTIModel`)."""
    return AOTIModel(path, device=device)


class AOTIModel(FacadeModel):
    """An AOTInductor package written by `export_aoti`, called like the diffusers transformer.

    It runs on the device it was compiled for (`device` picks the CUDA index). Inputs must have
    the shapes it was compiled with; `records` holds, per call, the blocks that ran and the time.
    """

    what = "AOTInductor package"

    def __init__(self, path: str | os.PathLike, *, device: str | torch.device | None = None):
        path = Path(path)
        if not path.is_file():
            raise GraphoptError(f"AOTInductor package not found: {path}")
        index = torch.device(device).index if device is not None else None
        try:
            self.package = torch._inductor.aoti_load_package(
                str(path), device_index=-1 if index is None else index)
        except Exception as e:  # the loader raises RuntimeError for foreign or corrupt archives
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphoptError(f"cannot load AOTInductor package '{path}': {first}. Is it a .pt2 "
                                f"written by export_aoti with this torch version?") from None
        meta = self.package.get_metadata()
        if f"{META}.inputs" not in meta:
            raise GraphoptError(f"'{path}' was not written by graphopt's export_aoti (no "
                                f"'{META}.inputs' metadata): re-export it with export_aoti")
        specs = [TensorSpec.from_json(s) for s in json.loads(meta[f"{META}.inputs"])]
        super().__init__(json.loads(meta[f"{META}.config"]), specs,
                         json.loads(meta[f"{META}.blocks"]))
        self.fixed = json.loads(meta[f"{META}.fixed"])
        self.router = json.loads(meta[f"{META}.router"])
        state = json.loads(meta.get(f"{META}.reuse", "null"))
        self.thread_state(state, [TensorSpec.from_json(s) for s in state["specs"]] if state else [])
        compiled_for = meta.get("AOTI_DEVICE_KEY", "cpu")
        self.device = torch.device(compiled_for if index is None else f"{compiled_for}:{index}")
        self.path = path

    def _run(self, feeds):
        if self.reuse is not None:
            feeds = {**feeds, **self.state_feeds(feeds)}
        out = tuple(self.package(**feeds, **self.fixed))
        if self.reuse is not None:
            self.keep_state(out[len(out) - len(self.state["slots"]):])
            out = out[:len(out) - len(self.state["slots"])]
        computed = None
        if any(cached for _, _, cached in self.blocks):
            computed, out = bool(out[-1]), out[:-1]
        if self.router is None:
            return out, None, computed
        return out[:-1], out[-1].cpu().numpy().astype(np.bool_), computed


@contextlib.contextmanager
def _inductor_cond_fixes():
    """While compiling: every torch.cond reads its own predicate and gets its operands in the
    strides its branches were compiled for (see the module docstring)."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    original = ir.Conditional.__dict__["create"]

    def create(cls, predicate, true_fn, false_fn, operands):
        if isinstance(predicate, ir.TensorBox):     # not a SymBool / Python bool
            predicate = ir.ExternKernel.copy_input(predicate)
        traced = V.graph.current_node.args[-1]
        pinned = []
        for op, node in zip(operands, traced):
            val = node.meta.get("val") if isinstance(node, fx.Node) else None
            if isinstance(val, torch.Tensor) and isinstance(op, ir.IRNode):
                op = ir.ExternKernel.require_exact_strides(op, val.stride(), allow_padding=False)
            pinned.append(op)
        return original.__func__(cls, predicate, true_fn, false_fn, pinned)

    ir.Conditional.create = classmethod(create)
    try:
        yield
    finally:
        ir.Conditional.create = original
