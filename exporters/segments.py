"""The segmented layout's graph cutter, pure fx: `plan_segments(graph)` cuts a DiTGraph's top-level
graph into a prologue (everything up to the first block, the router's hard gates included), one fx
module per block (a routed block's conditional branch, inlined) and an epilogue, each with the
named inputs it reads and the names of its outputs. The cut rules are in exporters/onnx.py's
docstring; the ONNX export of each piece is there too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import fx

from graphopt import reuse, router
from graphopt.errors import GraphoptError
from graphopt.exporters.manifest import next_name
from graphopt.fxutil import recomputed_where_used

OUTPUT_NAME = "sample"
GATES_NAME = "gates"

aten = torch.ops.aten


class _Cut:
    """Builds one segment's fx graph: copies `compute` nodes; what they read from outside becomes a
    named input, except weights (copied as attributes), sizes and no-op casts (recomputed inside)."""

    def __init__(self, gm: fx.GraphModule, writes: Mapping[fx.Node, list[fx.Node]]):
        self.gm = gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[tuple[str, fx.Node]] = []      # (name, source node in the parent graph)
        self.writes = writes                             # _inplace_writes(gm)

    def bind(self, node: fx.Node, name: str) -> None:
        """Make parent value `node` an input of this segment called `name`."""
        ph = self.graph.placeholder(name)
        ph.meta.update({k: node.meta[k] for k in ("val", "tensor_meta") if k in node.meta})
        self.env[node] = ph
        self.inputs.append((name, node))

    def pull(self, node: fx.Node, boundary) -> fx.Node:
        """The segment's value of parent node `node`; `boundary(node)` names it when it is an input."""
        if node in self.env:
            return self.env[node]
        if node.op == "get_attr":
            self.env[node] = self.graph.get_attr(node.target)
        elif node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor):
            return node.meta.get("val")      # a non-tensor input torch.export specialized
        else:
            name = None if recomputed_where_used(node) else boundary(node)
            if name is not None:
                self.bind(node, name)
            else:
                self.copy(node, boundary)
        return self.env[node]

    def copy(self, node: fx.Node, boundary) -> fx.Node:
        for a in node.all_input_nodes:
            self.pull(a, boundary)
        self.env[node] = self.graph.node_copy(node, lambda a: self.pull(a, boundary))
        # In-place writes into `node` through views (LTX-Video scales its rotary coordinates with
        # copy_ into slices) have no users, so nothing pulls them: replay them now, in graph order,
        # before any reader of `node` is copied.
        for write in self.writes.get(node, ()):
            for view in reversed(_view_chain(write.args[0], node)):
                if view not in self.env:
                    self.env[view] = self.graph.node_copy(view, lambda a: self.pull(a, boundary))
            self.copy(write, boundary)
        return self.env[node]

    def module(self, outputs: Sequence[fx.Node]) -> fx.GraphModule:
        """The segment as a module returning `outputs` (nodes of this segment's graph)."""
        self.graph.output(tuple(outputs))
        module = fx.GraphModule(self.gm, self.graph)
        module.graph.eliminate_dead_code()
        module.recompile()
        return module


def _view_chain(node: fx.Node, base: fx.Node) -> list[fx.Node]:
    """The view ops from `node` back to `base` (node first), e.g. [slice_2] for slice(base)."""
    chain = []
    while node is not base:
        chain.append(node)
        node = node.args[0]
    return chain


def _inplace_writes(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """In-place ops whose result nobody reads, by the tensor they write (through views), in graph
    order. Refuses a graph where that tensor is read, other than to compute the writes, before the
    last of them: a segment could not replay the writes at one point."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    writes: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.users or not isinstance(n.target, torch._ops.OpOverload) \
                or not n.target._schema.is_mutable:
            continue
        base = n.args[0]
        while base.op == "call_function" and isinstance(base.target, torch._ops.OpOverload) \
                and base.target.is_view:
            base = base.args[0]
        writes.setdefault(base, []).append(n)
    for base, ws in writes.items():
        feeding = set()                                  # what the writes compute from
        todo = list(ws)
        while todo:
            n = todo.pop()
            if n not in feeding:
                feeding.add(n)
                todo.extend(n.all_input_nodes)
        views, todo = {base}, [base]
        while todo:
            n = todo.pop()
            for u in n.users:
                if isinstance(u.target, torch._ops.OpOverload) and u.target.is_view and u not in views:
                    views.add(u)
                    todo.append(u)
        last = max(order[w] for w in ws)
        early = [u for v in views for u in v.users    # (a reader nobody uses, e.g. an assert, is harmless)
                 if u not in feeding and u not in views and u.users and order[u] < last]
        if early:
            raise GraphoptError(
                f"'{early[0].name}' reads '{base.name}' before the in-place write "
                f"'{ws[-1].name}' to it: the segmented layout cannot cut this graph; export with "
                f"layout='single'")
    return writes


@dataclass
class _SegmentPlan:
    """One segment to export: its fx module, its inputs (name, parent node whose value feeds it), and
    the names of its outputs in the module's output order."""

    kind: str
    file: str
    module: fx.GraphModule
    inputs: list[tuple[str, fx.Node]]
    outputs: list[str]
    block: int | None = None
    gate: int | None = None
    reuse: dict | None = None


def plan_segments(graph) -> tuple[list[_SegmentPlan], list[str], str | None]:
    """Cut the graph into prologue, blocks, epilogue; returns (plans, stream names, gates name)."""
    gm = graph.gm
    units = router.units(graph)
    if not units:
        raise GraphoptError("the graph has no blocks: nothing to segment (export it with layout='single')")
    taken = {n.name for n in gm.graph.nodes}
    width = len(units[0].stream_in)
    stream = [_free_name("stream" if width == 1 else f"stream_{j}", taken) for j in range(width)]
    gates = _free_name(GATES_NAME, taken) if any(u.gate is not None for u in units) else None
    writer = {o: u for u in units for o in u.stream_out}
    writes = _inplace_writes(gm)
    model_inputs = [p for p in graph.placeholders() if isinstance(p.meta.get("val"), torch.Tensor)]

    # Stream names follow each block's in -> out pairing; each block reads what the last wrote. A
    # block may carry fewer streams than the one before (HunyuanVideo's last single-stream block
    # writes only the video tokens): the others pass through its segment unchanged.
    stream_of = {n: stream[j] for j, n in enumerate(units[0].stream_in)}
    current = list(units[0].stream_in)                 # the node holding each stream, in order
    passthrough: dict[str, list[fx.Node]] = {}
    for prev, unit in zip([None, *units], units):
        if not set(unit.stream_in) <= set(current):     # (the first unit reads `current` itself)
            raise GraphoptError(
                f"block '{unit.name}' reads {[n.name for n in unit.stream_in]} but '{prev.name}' writes "
                f"{[n.name for n in prev.stream_out]}: something runs on the stream between them, which the "
                "segmented contract has no place for; export with layout='single'")
        passthrough[unit.name] = [n for n in current if n not in unit.stream_in]
        for n_in, n_out in zip(unit.stream_in, unit.stream_out):
            stream_of[n_out] = stream_of[n_in]
            current[current.index(n_in)] = n_out

    side: dict[fx.Node, None] = {}       # values the prologue hands to blocks and epilogue (ordered set)

    def needs_prologue(reader: str, allow_stream: bool = False):
        def boundary(node: fx.Node) -> str | None:
            if node.op == "placeholder":
                return node.name
            if node in writer:
                raise GraphoptError(
                    f"{reader} reads '{node.name}', computed from the stream by block '{writer[node].name}'; "
                    "the segmented contract feeds a segment the stream plus values computed before the first "
                    "block: export with layout='single'")
            if allow_stream and not _before_blocks(node, writer):
                return None         # the epilogue computes what depends on the final stream itself
            side[node] = None
            return _side_name(node)
        return boundary

    plans: list[_SegmentPlan] = []
    for prev, unit in zip([None, *units], units):
        cut = _Cut(gm, writes)
        for node in [*unit.stream_in, *passthrough[unit.name]]:
            cut.bind(node, stream_of[node])
        boundary = needs_prologue(f"block '{unit.name}'")
        if unit.body is not None:
            outputs = _inline_branch(cut, unit, boundary)
        else:
            for m in unit.members:
                if m not in cut.env:
                    cut.copy(m, boundary)
            outputs = [cut.env[o] for o in unit.stream_out]
        by_name = {stream_of[o]: v for o, v in zip(unit.stream_out, outputs)}
        for n in passthrough[unit.name]:        # a copy: the ONNX exporter renames an input returned as is
            copy = cut.graph.call_function(aten.clone.default, (cut.env[n],))
            copy.meta.update(cut.env[n].meta)
            by_name[stream_of[n]] = copy
        plans.append(_SegmentPlan("block", f"block_{unit.index:02d}.onnx", cut.module([by_name[s] for s in stream]),
                                  cut.inputs, [next_name(s) for s in stream], unit.index, unit.gate,
                                  _reuse_entry(gm, prev, unit, stream_of)))

    epi = _Cut(gm, writes)
    for node in current:
        epi.bind(node, stream_of[node])
    boundary = needs_prologue("the model's output", allow_stream=True)
    results = list(gm.graph.output_node().args[0])
    values = [epi.pull(r, boundary) for r in results]
    names = [OUTPUT_NAME] + [f"output_{k}" for k in range(1, len(results))]
    epilogue = _SegmentPlan("epilogue", "epilogue.onnx", epi.module(values), epi.inputs, names)

    pro = _Cut(gm, writes)
    for node in model_inputs:
        pro.bind(node, node.name)
    begin = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == reuse.STATE_MODULE
                  and n.args[0] == "begin"), None)
    if begin is not None:           # the runtime holds the caches and says whether they are valid
        pro.bind(begin, reuse.VALID_INPUT)

    def inside_prologue(node: fx.Node) -> None:
        return None     # everything the prologue needs it computes from the model inputs

    soft_gates = router.gates_node(graph) if gates is not None else None
    if soft_gates is not None and not _before_blocks(soft_gates, writer):
        raise GraphoptError(
            "the router reads the stream after the first block (the first routed block is not the "
            "first block); the segmented layout decides every gate in the prologue: route from the "
            "first block, or export with layout='single'")
    values = [pro.pull(n, inside_prologue) for n in units[0].stream_in]
    names = list(stream)
    if gates is not None:
        soft = pro.pull(soft_gates, inside_prologue)
        values.append(pro.graph.call_function(aten.gt.Scalar, (soft, 0.5)))
        names.append(gates)
    for node in side:
        values.append(pro.pull(node, inside_prologue))
        names.append(_side_name(node))
    prologue = _SegmentPlan("prologue", "prologue.onnx", pro.module(values), pro.inputs, names)
    return [prologue, *plans, epilogue], stream, gates


def _reuse_entry(gm: fx.GraphModule, prev: router.Unit | None, unit: router.Unit,
                 stream_of: Mapping[fx.Node, str]) -> dict | None:
    """The manifest's `reuse` entry of a block segment (exporters/manifest.py), or None."""
    from graphopt.passes.cache import cache_rule

    if unit.cached:
        rule = {**cache_rule(gm, unit.first), "streams": [stream_of[n] for n in unit.stream_in]}
        if rule["method"] == "first-block":
            if prev is None or prev.gate is not None or prev.cached:
                raise GraphoptError(f"cached blocks '{unit.name}' follow no plain first block: "
                                    "export with layout='single'")
        return {"cache": rule}
    if any(unit.slots):
        entry = {"slots": {stream_of[n]: slot for n, slot in zip(unit.stream_in, unit.slots)}}
        if unit.time is not None:
            entry["forecast"] = {"slopes": {stream_of[n]: slope for n, slope in zip(unit.stream_in, unit.slopes)},
                                 "time": unit.time}
        return entry
    return None


def _before_blocks(node: fx.Node, writer: Mapping[fx.Node, router.Unit]) -> bool:
    """True when `node` does not depend on any block's output (the prologue can compute it)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in writer:
            return False
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return True


def _inline_branch(cut: _Cut, unit: router.Unit, boundary) -> list[fx.Node]:
    """Copy a routed block's run branch into `cut`, its placeholders bound to the cond's operands."""
    env: dict[fx.Node, Any] = {}
    placeholders = [n for n in unit.body.graph.nodes if n.op == "placeholder"]
    for ph, operand in zip(placeholders, unit.operands):
        env[ph] = cut.pull(operand, boundary)
    for n in unit.body.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            return [env[o] for o in n.args[0]]
        env[n] = cut.graph.node_copy(n, lambda a: env[a])
    raise GraphoptError(f"routed block '{unit.name}': its branch has no output")


def _side_name(node: fx.Node) -> str:
    """A side tensor's name: prefixed, so it never meets a value name the ONNX exporter makes up."""
    return f"side_{node.name}"


def _free_name(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    taken.add(name)
    return name
