"""Outlining: a run of a graph's nodes becomes one conditional (`torch.cond`, ONNX `If`).

`outline(gm, members, pairs, pred, tag, label)` moves `members` (a block, or several consecutive
blocks) into a sub-GraphModule `<tag>_run` and adds `<tag>_skip`, which returns clones of the
streams that enter it (cond refuses outputs that alias inputs); the call node is
`cond_block(pred, run, skip, operands)`. The caller decides what each stream becomes after it
(`route`: a per-sample gate; `cache`: the cached residual) and calls `replace_outputs`.

operands = the streams entering, the side inputs (timestep projection, rotary tables, text
states), the weights (get_attr in the parent, so state-dict keys stay the checkpoint's) and, for
dynamic-batch graphs, the tensors its symbolic sizes are read from. Operands and get_attr'd branch
modules are how torch.export itself writes torch.cond in an unlifted module.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from graphopt.errors import GraphoptError
from graphopt.fxutil import is_tensor, recomputed_where_used
from graphopt.router import cond_block

aten = torch.ops.aten
LABEL = "graphopt_routed_block"     # node meta: the block (or blocks) a conditional carries


def outline(gm, members: list[fx.Node], pairs, pred: fx.Node, tag: str, label: str) -> list[fx.Node]:
    """Insert cond(pred, <tag>_run, <tag>_skip, operands) before `members`; returns one node per
    pair, the cond's value of that stream (the members' output, or the entering stream)."""
    g = gm.graph
    stream_in = [a for a, _ in pairs]
    stream_out = [b for _, b in pairs]
    ops, recomputed, same = operands(gm, members, stream_in, label)
    run_graph = fx.Graph()
    env = {}
    for a in ops:
        env[a] = run_graph.placeholder(a.name)
        env[a].meta.update({k: a.meta[k] for k in ("val", "tensor_meta") if k in a.meta})
    for a, b in same.items():
        env[a] = env[b]
    for n in recomputed + members:
        env[n] = run_graph.node_copy(n, lambda x: env[x])
    # Both branches return densely packed row-major tensors: cond needs their layouts to agree,
    # and a block's output (a slice, a transpose) and the stream it received need not be alike.
    run_graph.output(tuple(env[o] if row_major(o) else run_graph.call_function(
        aten.clone.default, (env[o],), {"memory_format": torch.contiguous_format})
        for o in stream_out))
    skip_graph = fx.Graph()
    phs = [skip_graph.placeholder(a.name) for a in ops]
    skip_graph.output(tuple(
        skip_graph.call_function(aten.clone.default, (phs[k],),
                                 {"memory_format": torch.contiguous_format})
        for k in range(len(stream_in))))
    gm.add_submodule(f"{tag}_run", fx.GraphModule(torch.nn.Module(), run_graph))
    gm.add_submodule(f"{tag}_skip", fx.GraphModule(torch.nn.Module(), skip_graph))
    with g.inserting_before(members[0]):
        true_fn = g.get_attr(f"{tag}_run")
        false_fn = g.get_attr(f"{tag}_skip")
        cond = g.call_function(cond_block, (pred, true_fn, false_fn, tuple(ops)))
        cond.meta[LABEL] = label
        if "nn_module_stack" in members[0].meta:
            cond.meta["nn_module_stack"] = members[0].meta["nn_module_stack"]
        outs = []
        for k, s_out in enumerate(stream_out):
            outs.append(g.call_function(operator.getitem, (cond, k)))
            outs[-1].meta["val"] = s_out.meta["val"]
    return outs


def replace_outputs(g: fx.Graph, members: list[fx.Node], stream_out: list[fx.Node],
                    new: list[fx.Node]) -> None:
    """Uses of each stream_out outside `members` read `new` instead; the members are erased."""
    inside = set(members)
    for s_out, n in zip(stream_out, new):
        n.meta["val"] = s_out.meta["val"]     # the next block's checks read it
        s_out.replace_all_uses_with(n, delete_user_cb=lambda u: u not in inside)
    for m in reversed(members):
        g.erase_node(m)


def check_outlinable(graph, members: list[fx.Node], pairs, label: str) -> None:
    """Refuse, before anything is changed, nodes that cannot become a conditional branch.
    `pairs`: (stream in, stream out) node pairs the branch carries."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for m in members:
        if m.op != "call_function":
            raise GraphoptError(f"{label} calls {m.op} '{m.target}'; only blocks made of "
                                f"ATen calls (a torch.export capture)")
        if free_unbacked_symbols(m.meta.get("val")):
            raise GraphoptError(
                f"{label} computes a data-dependent size ('{m.name}', {m.target}), "
                f"which torch.cond cannot carry out of a branch (e.g. tokens picked by a mask "
                f"inside the block): this model's blocks cannot be made conditional (routed, cached). Use `drop` "
                f"instead")
    for s_in, s_out in pairs:
        d_in, d_out = val(s_in).dtype, val(s_out).dtype
        if d_in != d_out:
            raise GraphoptError(f"{label} turns its stream from {d_in} into {d_out}: skipping it "
                                f"would change the dtype, so it cannot be made conditional")
    operands(graph.gm, members, [a for a, _ in pairs], label)


def operands(gm, members, stream_in, label: str):
    """(operands, nodes recomputed inside the branch, get_attr → operand holding the same tensor).

    Operands must be distinct tensors at run time: torch.export names the branch's inputs after
    them and fails on a repeat. So values that may *be* another operand are recomputed inside the
    branch from their input instead of passed: no-op casts (`.to`, `.contiguous()`, `type_as`
    return their input when nothing changes) and symbolic sizes (dynamic batch: cond takes
    tensors, not ints); weights shared under two names are passed once.
    """
    inside = set(members)
    operands, recomputed, same, owner, seen = list(stream_in), [], {}, {}, set(stream_in)

    def visit(n):
        if n in seen or n in inside:
            return
        seen.add(n)
        if n.op == "get_attr":
            tensor = _attribute(gm, n)
            if id(tensor) in owner:
                same[n] = owner[id(tensor)]
            else:
                owner[id(tensor)] = n
                operands.append(n)
        elif recomputed_where_used(n):
            for a in n.all_input_nodes:
                visit(a)
            recomputed.append(n)
        elif is_tensor(n):
            operands.append(n)
        else:
            raise GraphoptError(
                f"{label} reads the integer '{n.name}' ({n.op} {n.target}), which "
                f"is not a size read from a tensor: it cannot be moved into a "
                f"conditional branch. Capture the model with static shapes")

    for m in members:
        for a in m.all_input_nodes:
            visit(a)
    return operands, recomputed, same


def rows_per_sample(rows, batch, label: str) -> int:
    """rows / batch as an int (sample-major streams: Latte keeps frames or positions as rows)."""
    import sympy

    def expr(x):
        return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))

    ratio = sympy.simplify(expr(rows) / expr(batch))
    if not (ratio.is_Integer and ratio > 0):
        raise GraphoptError(f"{label}'s stream has {rows} rows for a batch of {batch}: "
                            f"not a whole number of rows per sample, so per-sample gates cannot "
                            f"be applied")
    return int(ratio)


def _attribute(gm, n) -> torch.Tensor:
    value = gm
    for part in n.target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise GraphoptError(f"a conditional block reads '{n.target}', a {type(value).__name__}, "
                            f"not a tensor: conditionals do not nest (route and cache the "
                            f"same blocks only once)")
    return value


def row_major(n) -> bool:
    from torch._prims_common import make_contiguous_strides_for
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    v = val(n)
    return all(statically_known_true(a == b) for a, b in
               zip(v.stride(), make_contiguous_strides_for(v.shape)))


def val(n):
    v = n.meta.get("val")
    if v is None:
        raise GraphoptError(f"node '{n.name}' has no shape information; call graph.refresh() "
                            f"before rewriting")
    return v


def stable_toposort(g: fx.Graph) -> None:
    """Reorder nodes so every value is defined before use, moving as few as possible (ties keep
    the current order). Outlining may place a cond before a side input defined mid-block."""
    import heapq

    order = list(g.nodes)
    index = {n: i for i, n in enumerate(order)}
    waiting = {n: len(set(n.all_input_nodes)) for n in order}
    ready = [index[n] for n in order if waiting[n] == 0]
    heapq.heapify(ready)
    result = []
    while ready:
        n = order[heapq.heappop(ready)]
        result.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, index[u])
    if len(result) != len(order):
        raise GraphoptError("the rewritten graph has a cycle; this is a graphopt bug, please report "
                            "it with the recipe")
    if result == order:
        return
    for prev, n in zip(result, result[1:]):
        prev.append(n)
