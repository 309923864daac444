"""Cost model: FLOPs, parameters and parameter bytes per block, attention, head, FFN channel, step.

FLOPs count what `torch.utils.flop_counter.FlopCounterMode` counts — 2 × multiply-adds of
matmul-class ops (linear, matmul/bmm, convolution, scaled-dot-product attention); elementwise ops
count zero — so the two can be cross-checked exactly. Shapes come from the graph's fake-tensor
metadata, so the model works on meta graphs (no weights). One "step" is one forward call with the
graph's example inputs (one denoising step at that batch size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt import headflow

aten = torch.ops.aten


def concrete(size) -> int:
    """An int for a possibly symbolic size: its hint, else (data-dependent) its upper bound."""
    if isinstance(size, int):
        return size
    node = size.node
    hint = node.shape_env.size_hint(node.expr, allow_none=True)
    if hint is not None:
        return int(hint)
    upper = node.shape_env.bound_sympy(node.expr).upper
    if not upper.is_finite:
        raise ValueError(f"size {size} has no hint and no finite bound")
    return int(upper)


def _shape(node):
    # Ints, not graphopt.fxutil.shape's possibly symbolic sizes: FLOPs of a dynamic-batch graph
    # are counted at its hint.
    return tuple(concrete(s) for s in node.meta["val"].shape)


def _numel(node) -> int:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return math.prod(_shape(node)) if isinstance(val, torch.Tensor) else 0


def node_flops(node: fx.Node) -> int:
    t = node.target
    if node.op != "call_function":
        return 0
    if t is aten.linear.default:
        return 2 * _numel(node) * _shape(node.args[1])[1]
    if t in (aten.mm.default, aten.bmm.default, aten.matmul.default):
        return 2 * _numel(node) * _shape(node.args[0])[-1]
    if t in (aten.addmm.default, aten.baddbmm.default):
        return 2 * _numel(node) * _shape(node.args[1])[-1]
    if t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.convolution.default):
        w = _shape(node.args[1])
        return 2 * _numel(node) * math.prod(w[1:])
    if t is aten.scaled_dot_product_attention.default:
        q, k, v = (_shape(a) for a in node.args[:3])
        batch_heads = math.prod(q[:-2])
        return 2 * batch_heads * q[-2] * k[-2] * q[-1] + 2 * batch_heads * q[-2] * k[-2] * v[-1]
    return 0


@dataclass
class AttentionCost:
    flops: int
    params: int
    flops_per_head: int
    params_per_head: int


@dataclass
class FFNCost:
    flops: int
    params: int
    hidden: int
    flops_per_channel: int
    params_per_channel: int


@dataclass
class Cost:
    flops: int = 0                       # per step
    params: int = 0
    param_bytes: int = 0
    blocks: list[dict] = field(default_factory=list)     # index, name, flops, params, bytes
    attentions: dict[str, AttentionCost] = field(default_factory=dict)
    ffns: dict[str, FFNCost] = field(default_factory=dict)
    outside_blocks_flops: int = 0

    def block_flops(self) -> list[int]:
        return [b["flops"] for b in self.blocks]


def model_cost(graph) -> Cost:
    gm = graph.gm
    params = dict(gm.named_parameters())
    params.update(dict(gm.named_buffers()))
    cost = Cost()
    trainable = {k: v for k, v in gm.named_parameters()}
    cost.params = sum(p.numel() for p in trainable.values())
    cost.param_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    node_block = {}
    for b in graph.blocks:
        for name in b.nodes:
            node_block[name] = b.name
    per_block = {b.name: {"index": b.index, "name": b.name, "flops": 0, "params": 0, "bytes": 0,
                          "routed": False} for b in graph.blocks}
    seen_params: set[str] = set()
    first_seen: dict[str, int] = {}
    for pos, n in enumerate(gm.graph.nodes):
        routed = n.meta.get("graphopt_routed_block")
        first_seen.setdefault(routed or node_block.get(n.name), pos)
        if routed is not None:
            # A routed block (route pass): its cost is its run branch's, paid when it executes.
            branch = getattr(gm, n.args[1].target)
            entry = per_block.setdefault(routed, {"index": None, "name": routed, "flops": 0,
                                                  "params": 0, "bytes": 0, "routed": True})
            entry["flops"] += sum(node_flops(b) for b in branch.graph.nodes)
            cost.flops += entry["flops"]
            _add_params(entry, n.args[3], trainable, seen_params)
            continue
        f = node_flops(n)
        cost.flops += f
        bi = node_block.get(n.name)
        if bi is None:
            cost.outside_blocks_flops += f
            continue
        per_block[bi]["flops"] += f
        _add_params(per_block[bi], n.all_input_nodes, trainable, seen_params)
    per_block = sorted(per_block.values(), key=lambda e: first_seen.get(e["name"], 1 << 30))
    for i, e in enumerate(per_block):
        e["index"] = i
    cost.blocks = per_block
    for name, flow in graph.flows.items():
        cost.attentions[name] = attention_cost(flow, trainable)
    from graphopt import ffnflow

    for name, flow in ffnflow.find(graph).items():
        cost.ffns[name] = ffn_cost(flow)
    return cost


def _add_params(entry, nodes, trainable, seen):
    for a in nodes:
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target in trainable \
                and a.target not in seen:
            seen.add(a.target)
            p = trainable[a.target]
            entry["params"] += p.numel()
            entry["bytes"] += p.numel() * p.element_size()


def attention_cost(flow: headflow.HeadFlow, params: dict) -> AttentionCost:
    """Cost of the head-structured part of one attention, and the share of one head.

    Every term is linear in the number of heads, so removing k heads removes exactly
    k × per-head cost: producer rows, consumer columns, head-spanning norm weights, and the
    attention product itself.
    """
    H = flow.heads
    flops = params_total = per_head_flops = per_head_params = 0
    for lin, dim in flow.producers:
        rows, in_f = _shape(lin.args[1])
        rows_head = (rows - headflow.new_size(dim, 0)) // H
        tokens = _numel(lin) // rows
        f = 2 * tokens * in_f * rows
        flops += f
        per_head_flops += 2 * tokens * in_f * rows_head
        has_bias = len(lin.args) > 2 and lin.args[2] is not None
        params_total += rows * in_f + (rows if has_bias else 0)
        per_head_params += rows_head * in_f + (rows_head if has_bias else 0)
    for lin, dim in flow.consumers:
        out_f, cols = _shape(lin.args[1])
        cols_head = (cols - headflow.new_size(dim, 0)) // H
        flops += 2 * _numel(lin) * cols
        per_head_flops += 2 * _numel(lin) * cols_head
        params_total += out_f * cols
        per_head_params += out_f * cols_head
    for norm, first in flow.norms:
        for w in norm.args[2:4]:
            if isinstance(w, fx.Node) and w.op == "get_attr" and w.target in params:
                n = params[w.target].numel()
                params_total += n
                per_head_params += n // H
    sdpa = node_flops(flow.sdpa)
    flops += sdpa
    per_head_flops += sdpa // H
    return AttentionCost(flops, params_total, per_head_flops, per_head_params)


def ffn_cost(flow) -> FFNCost:
    """Cost of one FFN's channel-structured part, and the share of one hidden channel.

    Linear in the channel count: a channel owns len(offsets) up-projection rows (two in a gated
    unit) with their biases, and one down-projection column. Elementwise work counts zero.
    """
    up_rows, in_f = _shape(flow.up.args[1])
    rows_per_channel = len(flow.offsets)
    tokens = _numel(flow.up) // up_rows
    has_bias = len(flow.up.args) > 2 and flow.up.args[2] is not None
    out_f = _shape(flow.down.args[1])[0]
    per_flops = 2 * tokens * in_f * rows_per_channel + 2 * _numel(flow.down)
    per_params = rows_per_channel * (in_f + (1 if has_bias else 0)) + out_f
    return FFNCost(per_flops * flow.hidden, per_params * flow.hidden, flow.hidden,
                   per_flops, per_params)


def predicted_after_pruning(graph, removed: dict[str, int],
                            removed_channels: dict[str, int] | None = None) -> tuple[int, int]:
    """(FLOPs, params) the cost model predicts after removing `removed[attention]` heads and
    `removed_channels[ffn]` FFN hidden channels."""
    cost = model_cost(graph)
    flops, params = cost.flops, cost.params
    for name, k in removed.items():
        a = cost.attentions[name]
        flops -= k * a.flops_per_head
        params -= k * a.params_per_head
    for name, k in (removed_channels or {}).items():
        f = cost.ffns[name]
        flops -= k * f.flops_per_channel
        params -= k * f.params_per_channel
    return flops, params
