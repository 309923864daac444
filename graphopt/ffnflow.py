"""FFN channel dataflow: which rows and columns one hidden channel of a feed-forward network owns.

An FFN is an up projection whose output reaches exactly one down projection through elementwise
ops, chunks/splits along the channel axis and at most a concatenation with other features
(parallel attention + MLP blocks feed `cat([attention, mlp])` to one fused out-projection), and
whose down projection writes the width the up projection read. It is found on the graph, never
by module name. Tracing labels the last dim of every tensor on the way as segments
`(size, offsets)`: position p of a segment comes from the up projection's output rows
`o + p` for o in offsets (None: not from the up projection). A gated unit (GEGLU, SwiGLU: the up
output chunked in two, `a * act(b)`) merges two segments of equal size, so channel c owns rows
c and hidden + c. At the down projection one segment must cover every up row exactly once: its
size is the hidden width, and channel c owns down column `start + c`.

An op that is not understood while carrying channels ends the trace: that linear is then not an
FFN this module can prune (a guess here would corrupt weights).
"""
from __future__ import annotations

import heapq
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt import fxutil, headflow

aten = torch.ops.aten
Segment = tuple[int, tuple[int, ...] | None]     # (size, up-row offsets) or (size, None)
Label = tuple[Segment, ...]                      # the last dim, concatenated segments
_CHUNKS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}


@dataclass
class ChannelFlow:
    name: str               # common module path of the up and down projections
    up: fx.Node             # linear
    down: fx.Node           # linear
    hidden: int             # channels
    offsets: tuple[int, ...]  # up rows of channel c: o + c for o in offsets
    start: int              # down column of channel c: start + c
    # split/split_with_sizes nodes on the way, with the label of each piece: their sizes change
    splits: list[tuple[fx.Node, list[Label]]] = field(default_factory=list)

    def up_rows(self, kept: list[int]) -> torch.Tensor:
        k = torch.tensor(kept, dtype=torch.long)
        return torch.cat([k + o for o in self.offsets])

    def down_columns(self, kept: list[int]) -> torch.Tensor:
        """All columns of the down projection that survive (other features' columns included)."""
        cols = torch.arange(fxutil.shape(self.down.args[1])[1])
        k = torch.tensor(kept, dtype=torch.long) + self.start
        return torch.cat([cols[:self.start], k, cols[self.start + self.hidden:]])

    def piece_size(self, label: Label, kept: list[int]) -> int:
        """Width of a tensor labelled `label` once only `kept` channels stay."""
        rows = set(self.up_rows(kept).tolist())
        return sum(s if offs is None else sum(1 for r in range(offs[0], offs[0] + s) if r in rows)
                   for s, offs in label)


def _common_path(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def find(graph) -> dict[str, ChannelFlow]:
    """The prunable FFNs inside the graph's blocks, by name, in graph order."""
    producers = {p for f in graph.flows.values() for p, _ in f.producers}
    in_block = {n for b in graph.blocks for n in b.nodes}
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    out = {}
    for up in graph.gm.graph.nodes:
        if up.target not in headflow.LINEAR or up in producers or up.name not in in_block:
            continue
        flow = trace(up, order)
        if flow is not None and flow.name not in out:
            out[flow.name] = flow
    return out


def trace(up: fx.Node, order: dict[fx.Node, int] | None = None) -> ChannelFlow | None:
    """The channel flow from linear `up`, or None when `up` does not start a prunable FFN.

    `order`: each node's position in the graph (computed when not given)."""
    rows = fxutil.shape(up)[-1]
    d_in = fxutil.shape(up.args[0])[-1]
    labels: dict[fx.Node, Label | list[Label]] = {up: ((rows, (0,)),)}
    order = order or {n: i for i, n in enumerate(up.graph.nodes)}
    # Visit in graph (topological) order, so every labelled operand of a node is labelled first.
    splits, downs, heap, queued = [], [], [(order[u], u) for u in up.users], set(up.users)
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        if u.target in headflow.LINEAR:
            if u.args[0] not in labels or any(a in labels for a in u.args[1:]):
                return None
            downs.append(u)
            continue
        label = _propagate(u, labels)
        if label is None:
            return None
        labels[u] = label
        if u.target in _CHUNKS and u.target is not aten.chunk.default:
            splits.append((u, label))
        for w in u.users:
            if w not in queued:
                queued.add(w)
                heapq.heappush(heap, (order[w], w))
    if len(downs) != 1:
        return None
    down = downs[0]
    if fxutil.shape(down)[-1] != d_in:
        return None
    segs = labels[down.args[0]]
    carrying = [(i, s) for i, s in enumerate(segs) if s[1] is not None]
    if len(carrying) != 1:
        return None
    i, (hidden, offsets) = carrying[0]
    covered = sorted(o + p for o in offsets for p in range(hidden))
    if covered != list(range(rows)) or hidden <= 1:
        return None
    start = sum(s for s, _ in segs[:i])
    name = _common_path(fxutil.module_path(up), fxutil.module_path(down))
    return ChannelFlow(name, up, down, hidden, tuple(offsets), start, splits)


def _propagate(n: fx.Node, labels) -> Label | list[Label] | None:
    """The label of n's last dim, or None where n is not an op channels can pass through."""
    t = n.target
    val = n.meta.get("val")
    if t is operator.getitem:
        parts = labels.get(n.args[0])
        return parts[n.args[1]] if isinstance(parts, list) else None
    if t in _CHUNKS:
        x = n.args[0]
        ndim = len(fxutil.shape(x))
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % ndim
        if dim != ndim - 1:
            return None
        width = fxutil.shape(x)[-1]
        if t is aten.chunk.default:
            size = -(-width // n.args[1])
            sizes = [min(size, width - i) for i in range(0, width, size)]
        elif t is aten.split.Tensor:
            sizes = [min(n.args[1], width - i) for i in range(0, width, n.args[1])]
        else:
            sizes = list(n.args[1])
        return _split(labels[x], sizes)
    if t is aten.cat.default:
        ndim = len(fxutil.shape(n))
        dim = (n.args[1] if len(n.args) > 1 else 0) % ndim
        if dim != ndim - 1:
            return None
        out: list[Segment] = []
        for a in n.args[0]:
            out.extend(labels[a] if a in labels else ((fxutil.shape(a)[-1], None),))
        return tuple(out)
    if t not in headflow.ELEMENTWISE or not isinstance(val, torch.Tensor) or val.ndim == 0:
        return None
    operands = [n.args[0]] if t in headflow.LIKE_FIRST else \
        [a for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, fx.Node)]
    width = val.shape[-1]
    merged: Label | None = None
    for a in operands:
        if a in labels:
            lab = labels[a]
            if isinstance(lab, list):
                return None
            merged = lab if merged is None else _merge(merged, lab)
            if merged is None:
                return None
        else:
            shape = a.meta.get("val").shape if isinstance(a.meta.get("val"), torch.Tensor) else ()
            if len(shape) and shape[-1] != 1 and width != 1:
                return None         # a full-width operand from elsewhere: not channel-separable
    return merged


def _split(label: Label, sizes: list[int]) -> list[Label]:
    """Cut the segments of `label` into consecutive pieces of `sizes`."""
    segs = list(label)
    out = []
    for size in sizes:
        piece: list[Segment] = []
        while size:
            s, offs = segs.pop(0)
            take = min(s, size)
            piece.append((take, offs))
            if take < s:
                segs.insert(0, (s - take, None if offs is None else tuple(o + take for o in offs)))
            size -= take
        out.append(tuple(piece))
    return out


def _merge(a: Label, b: Label) -> Label | None:
    """Elementwise combination of two labelled tensors: same segmentation, offsets joined."""
    if [s for s, _ in a] != [s for s, _ in b]:
        return None
    out = []
    for (s, oa), (_, ob) in zip(a, b):
        if oa is None or ob is None:
            if oa is not ob:
                return None
            out.append((s, None))
        else:
            out.append((s, tuple(sorted(set(oa) | set(ob)))))
    return tuple(out)
