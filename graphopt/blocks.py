"""Blocks of a DiTGraph as the block passes, block importance and distillation rewire and watch them.

- `bypass_blocks` / `skip_blocks`: blocks made the identity on their stream (what `drop` erases,
  and the reference it must equal);
- `refuse_routed`: drop and route both work on plain blocks, before any of them became a conditional;
- taps: `insert_tap` puts a `ValueTap` after a node (the value flows on unchanged and is kept), and
  `frames_view` views a tapped stream per video frame.
"""
from __future__ import annotations

import copy

import torch
from torch import fx

from graphopt.errors import GraphoptError


def skip_blocks(graph, indices) -> fx.GraphModule:
    """The graph's module with blocks `indices` bypassed, nothing erased (weights shared).

    Every user outside a skipped block that read one of its stream outputs reads the paired stream
    input instead; the block's own nodes stay (and still run). This is the reference `drop` must
    equal.
    """
    gm = fx.GraphModule(graph.gm, copy.deepcopy(graph.gm.graph))
    bypass_blocks(graph, gm.graph, indices)
    gm.recompile()
    return gm


def bypass_blocks(graph, fx_graph: fx.Graph, indices) -> dict[str, fx.Node]:
    """Rewire, in `fx_graph` (the graph's own or a copy), every user outside blocks `indices` that
    reads one of their stream outputs to the paired stream input; return fx_graph's nodes by name."""
    nodes = {n.name: n for n in fx_graph.nodes}
    passes_on = {}                      # bypassed output -> the input it now stands for
    for i in sorted(set(indices)):
        if not 0 <= i < len(graph.blocks):
            raise GraphoptError(f"block {i} does not exist; the model has {len(graph.blocks)} "
                                f"blocks")
        block = graph.blocks[i]
        inside = {nodes[m] for m in block.nodes}
        for s_in, s_out in zip(block.stream_in, block.stream_out):
            source = passes_on.get(s_in, nodes[s_in])
            nodes[s_out].replace_all_uses_with(source, delete_user_cb=lambda u: u not in inside)
            passes_on[s_out] = source   # consecutive bypassed blocks chain through
    return nodes


def refuse_routed(graph) -> None:
    """Refuse a graph whose blocks already run under torch.cond (drop and route rewire plain blocks)."""
    from graphopt.router import cond_block

    if any(n.target in (cond_block, torch.ops.higher_order.cond) for n in graph.gm.graph.nodes):
        raise GraphoptError("this graph is already routed (its blocks run under torch.cond): "
                            "drop or route blocks before routing, not after")


class ValueTap(torch.nn.Module):
    """Keeps the last value it saw (e.g. a block's residual stream) and passes it on unchanged."""

    def forward(self, x):
        self.value = x
        return x


def insert_tap(gm: fx.GraphModule, node: fx.Node, name: str) -> ValueTap:
    """Add a `ValueTap` submodule `name` to `gm` reading `node`; every other user of `node` reads
    the tap's output (the same value), so the tap sees each value the graph computes there."""
    gm.add_submodule(name, ValueTap())
    with gm.graph.inserting_after(node):
        call = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(call, delete_user_cb=lambda u: u is not call)
    return gm.get_submodule(name)


def frames_view(graph, block: str | None = None, shape: tuple | None = None):
    """A function viewing a block's stream (its first output) as (samples, frames, tokens,
    channels), or None where the layout is unknown or there is a single frame.

    `block` is a block's module path with `shape` its stream's shape (a routed block is no longer
    in `graph.blocks`); by default the last block of `graph.blocks`."""
    if graph.token_layout is None:
        return None
    frames, h, w = graph.token_layout
    if frames < 2:
        return None
    if block is None:
        block = graph.blocks[-1].name
        shape = tuple(graph.node(graph.blocks[-1].stream_out[0]).meta["val"].shape)
    layout = None
    if graph.family is not None and graph.spec is not None:
        layout = graph.family.block_stream(block, graph.config, graph.spec)
    if layout is None:
        if len(shape) != 3 or shape[1] != frames * h * w:
            return None
        kind, before = "video", 0
    else:
        kind, before = layout.kind, layout.text_before
    if kind == "text":
        return None
    tokens = frames * h * w

    def view(s: torch.Tensor) -> torch.Tensor:
        d = s.shape[-1]
        if kind == "video":
            return s[:, before:before + tokens].reshape(s.shape[0], frames, h * w, d)
        if kind == "frame":
            return s.reshape(-1, frames, h * w, d)
        return s.reshape(-1, h * w, frames, d).transpose(1, 2)     # "temporal"

    return view
