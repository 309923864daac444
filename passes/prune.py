"""prune: remove attention heads and FFN hidden channels physically (PARE's width half).

Guarantee: the pruned graph computes exactly what the original computes with the same heads
masked (`mask_heads`): their contribution to every output projection zeroed, and any normalisation
whose statistic spans heads (qk-norm "across heads") taken over the kept heads only; and with the
same FFN hidden channels masked (`mask_channels`): their input to the FFN's down projection zeroed.
Pruning nothing is the identity. Weights shrink (q/k/v rows, output-projection columns,
head-spanning norm weights; FFN up-projection rows, both halves of a gated unit, and
down-projection columns) and every reshape or split constant that carries the head or channel
count is rewritten, so FLOPs and parameters drop by exactly what `cost.attention_cost` says per
head and `cost.ffn_cost` per channel.

FFN channels are kept in multiples of `ffn_multiple` (PARE: 128, for the hardware). An FFN too
narrow for it uses the largest power-of-two fraction of it at which the FFN holds at least 8
multiples (e.g. 8 for a 96-wide tiny FFN), so a ratio stays representable to within 1/16.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from graphopt import ffnflow, fxutil, headflow
from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, register, rel_error

aten = torch.ops.aten
KINDS = ("self", "cross", "joint")


@dataclass
class PruneOptions:
    ratio: float = 0.3                 # fraction of heads removed, over the selected attentions
    per_layer: bool = False            # same ratio in every attention, else one global ranking
    min_heads: int = 1                 # never leave an attention with fewer heads
    kinds: tuple[str, ...] = ("self", "cross", "joint")   # which attentions may lose heads
    criterion: str = "role-aware"      # "magnitude", "sensitivity" or "role-aware"
    temporal_factor: float = 1.5       # role-aware: temporal heads' importance is multiplied by this
    roles: dict | None = None          # role-aware: head-roles options, e.g. {"statistic": "output-error"}
    # Kept heads per attention, given (e.g. ranked on a GPU elsewhere): no ranking is computed,
    # so this is how a meta-device graph (no weights) is pruned. The options above are then unused.
    heads: dict[str, list[int]] | None = None
    ffn_ratio: float = 0.0             # fraction of FFN hidden channels removed (same sense as ratio)
    ffn_multiple: int = 128            # channels kept per FFN in multiples of this (see docstring)
    ffn_criterion: str | None = None   # "magnitude" or "sensitivity"; None: magnitude if criterion
                                       # is, else sensitivity (channels have no roles)
    # Kept channels per FFN, given (the FFN analogue of `heads`); ffn_ratio etc. are then unused.
    channels: dict[str, list[int]] | None = None

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise GraphoptError(f"prune ratio must be in [0, 1), got {self.ratio}")
        if self.min_heads < 1:
            raise GraphoptError(f"prune min_heads must be >= 1, got {self.min_heads}")
        self.kinds = tuple(self.kinds)
        bad = set(self.kinds) - set(KINDS)
        if bad:
            raise GraphoptError(f"prune kinds {sorted(bad)} unknown; choose from {KINDS}")
        if self.criterion not in ("magnitude", "sensitivity", "role-aware"):
            raise GraphoptError(f"prune criterion '{self.criterion}' unknown; choose magnitude, "
                                f"sensitivity or role-aware")
        if self.temporal_factor <= 0:
            raise GraphoptError(f"temporal_factor must be > 0, got {self.temporal_factor}")
        from graphopt.passes.importance import role_options
        self.roles = role_options(self.roles)
        if self.heads is not None:
            if not isinstance(self.heads, dict) or not all(
                    isinstance(v, (list, tuple)) and all(isinstance(h, int) for h in v)
                    for v in self.heads.values()):
                raise GraphoptError("prune heads must map attention names to lists of kept head "
                                    "indices, e.g. {\"blocks.0.attn1\": [0, 2, 3]}")
            self.heads = {k: sorted(set(v)) for k, v in self.heads.items()}
        if not 0.0 <= self.ffn_ratio < 1.0:
            raise GraphoptError(f"prune ffn_ratio must be in [0, 1), got {self.ffn_ratio}")
        if not isinstance(self.ffn_multiple, int) or self.ffn_multiple < 1:
            raise GraphoptError(f"prune ffn_multiple must be an int >= 1, got {self.ffn_multiple!r}")
        if self.ffn_criterion is None:
            self.ffn_criterion = "magnitude" if self.criterion == "magnitude" else "sensitivity"
        if self.ffn_criterion not in ("magnitude", "sensitivity"):
            raise GraphoptError(f"prune ffn_criterion '{self.ffn_criterion}' unknown; choose "
                                f"magnitude or sensitivity")
        if self.channels is not None:
            if not isinstance(self.channels, dict) or not all(
                    isinstance(v, (list, tuple)) and all(isinstance(c, int) for c in v)
                    for v in self.channels.values()):
                raise GraphoptError("prune channels must map FFN names to lists of kept channel "
                                    "indices, e.g. {\"blocks.0.ffn.net\": [0, 1, 5]}")
            self.channels = {k: sorted(set(v)) for k, v in self.channels.items()}


@register
class Prune(Pass):
    name = "prune"
    Options = PruneOptions

    def decide(self, graph) -> dict:
        decisions = self._decide_heads(graph)
        ffn = self._decide_channels(graph)
        if ffn is not None:
            decisions.update(ffn)
        return decisions

    def _decide_heads(self, graph) -> dict:
        from graphopt.passes.importance import HeadImportance, head_importance

        o = self.options
        if o.heads is not None:
            unknown = sorted(set(o.heads) - set(graph.flows))
            if unknown:
                raise GraphoptError(f"prune heads names attention(s) {unknown[:3]} that this graph "
                                    f"cannot prune; prunable ones: {sorted(graph.flows)[:4]}, ...")
            return {"heads": dict(o.heads),
                    "original_heads": {n: graph.attentions[n].heads for n in o.heads}}
        if o.ratio == 0.0 and (o.ffn_ratio > 0.0 or o.channels is not None):
            return {"heads": {}, "original_heads": {}}     # FFN only: no head ranking to pay for
        if graph.is_meta:
            raise GraphoptError(
                f"ranking heads by {o.criterion} needs weights, and this graph is on the meta "
                f"device: give the kept heads (prune option heads={{attention: [kept head "
                f"indices]}}), or replay a recipe computed where the weights are "
                f"(graphopt.Recipe.load(path).replay(graph))")
        candidates = [a for a in graph.attentions.values()
                      if a.prunable and a.kind in o.kinds and a.block is not None]
        if not candidates:
            raise GraphoptError("no prunable attention matches prune kinds "
                                f"{list(o.kinds)}; see `graphopt inspect` for what was found")
        scores = head_importance(graph, o.criterion, temporal_factor=o.temporal_factor,
                                 attentions=[a.name for a in candidates], role_options=o.roles)
        graph.reports["head-importance"] = HeadImportance(o.criterion, scores)
        return {"heads": select_heads(candidates, scores, o.ratio, o.min_heads, o.per_layer),
                "original_heads": {a.name: a.heads for a in candidates}}

    def _decide_channels(self, graph) -> dict | None:
        from graphopt.passes.importance import channel_importance

        o = self.options
        flows = ffnflow.find(graph)
        if o.channels is not None:
            unknown = sorted(set(o.channels) - set(flows))
            if unknown:
                raise GraphoptError(f"prune channels names FFN(s) {unknown[:3]} that this graph "
                                    f"cannot prune; prunable ones: {sorted(flows)[:4]}, ...")
            return {"ffn": dict(o.channels),
                    "original_ffn": {n: flows[n].hidden for n in o.channels}}
        if o.ffn_ratio == 0.0:
            return None
        if not flows:
            raise GraphoptError("prune ffn_ratio > 0 but no prunable FFN was found in the blocks "
                                "(up projection → elementwise/gated activation → down projection)")
        if graph.is_meta:
            raise GraphoptError(
                f"ranking FFN channels by {o.ffn_criterion} needs weights, and this graph is on "
                f"the meta device: give the kept channels (prune option channels={{ffn: [kept "
                f"channel indices]}}), or replay a recipe computed where the weights are")
        scores = channel_importance(graph, o.ffn_criterion, ffns=list(flows))
        return {"ffn": select_channels(flows, scores, o.ffn_ratio, o.ffn_multiple, o.per_layer),
                "original_ffn": {n: f.hidden for n, f in flows.items()}}

    def apply(self, graph, decisions: dict) -> None:
        for name, heads in decisions["original_heads"].items():
            found = graph.attentions.get(name)
            if found is None or found.heads != heads:
                raise GraphoptError(
                    f"recipe expects attention '{name}' with {heads} heads, the model has "
                    f"{'none' if found is None else found.heads}: the recipe was made for another "
                    f"architecture or config")
        flows = ffnflow.find(graph)
        for name, hidden in decisions.get("original_ffn", {}).items():
            found = flows.get(name)
            if found is None or found.hidden != hidden:
                raise GraphoptError(
                    f"recipe expects FFN '{name}' with {hidden} hidden channels, the model has "
                    f"{'none' if found is None else found.hidden}: the recipe was made for another "
                    f"architecture or config")
        prune_heads(graph, {k: list(v) for k, v in decisions["heads"].items()})
        prune_channels(graph, {k: list(v) for k, v in decisions.get("ffn", {}).items()})

    def weight_slices(self, graph, decisions: dict) -> list[tuple[str, int, torch.Tensor]]:
        # Both lists index the same unpruned tensors; a tensor in both (a fused out-projection
        # over cat([attention, mlp])) keeps the columns both keep.
        merged: dict[tuple[str, int], torch.Tensor] = {}
        for name, dim, idx in (
                weight_slices(graph, {k: list(v) for k, v in decisions["heads"].items()})
                + channel_slices(graph, {k: list(v) for k, v in decisions.get("ffn", {}).items()})):
            prev = merged.get((name, dim))
            merged[(name, dim)] = idx if prev is None else prev[torch.isin(prev, idx)]
        return [(name, dim, idx) for (name, dim), idx in merged.items()]

    def summarize(self, graph, decisions) -> dict:
        return {"heads_removed": sum(decisions["original_heads"][n] - len(k)
                                     for n, k in decisions["heads"].items()),
                "ffn_channels_removed": sum(decisions["original_ffn"][n] - len(k)
                                            for n, k in decisions.get("ffn", {}).items())}

    def describe(self, decisions: dict) -> list[str]:
        lines = []
        for name, kept in decisions["heads"].items():
            n = decisions["original_heads"][name]
            removed = sorted(set(range(n)) - set(kept))
            if removed:
                lines.append(f"- `{name}`: removed heads {', '.join(map(str, removed))} "
                             f"({len(kept)} of {n} kept)")
        for name, kept in decisions.get("ffn", {}).items():
            n = decisions["original_ffn"][name]
            if len(kept) < n:
                lines.append(f"- `{name}`: {len(kept)} of {n} FFN hidden channels kept")
        return lines or ["- nothing removed"]

    def ensures(self, before, after, inputs) -> float:
        decisions = after.recipe.steps[-1]["decisions"]
        reference = mask_heads(before, {n: _mask_from_kept(before.attentions[n].heads, k)
                                        for n, k in decisions["heads"].items()})
        ffn = decisions.get("ffn", {})
        if ffn:
            flows = ffnflow.find(before)
            reference = mask_channels(before, {n: _mask_from_kept(flows[n].hidden, k)
                                               for n, k in ffn.items()}, gm=reference)
        return rel_error(after.gm(**inputs)[0], reference(**inputs)[0])


def select_heads(candidates, scores: dict[str, torch.Tensor], ratio: float, min_heads: int,
                 per_layer: bool) -> dict[str, list[int]]:
    """Kept head indices per attention: drop the lowest-scoring heads, ties broken by index."""
    kept = {a.name: set(range(a.heads)) for a in candidates}
    if per_layer:
        for a in candidates:
            n_remove = min(int(round(ratio * a.heads)), a.heads - min_heads)
            order = sorted(range(a.heads), key=lambda h: (float(scores[a.name][h]), h))
            kept[a.name] -= set(order[:n_remove])
    else:
        total = sum(a.heads for a in candidates)
        n_remove = int(round(ratio * total))
        ranked = sorted(((float(scores[a.name][h]), a.name, h) for a in candidates
                         for h in range(a.heads)))
        for _, name, h in ranked:
            if n_remove == 0:
                break
            if len(kept[name]) > min_heads:
                kept[name].discard(h)
                n_remove -= 1
    return {name: sorted(k) for name, k in kept.items()}


def effective_multiple(hidden: int, multiple: int) -> int:
    """`multiple`, halved until an FFN of `hidden` channels holds at least 8 of it (module doc)."""
    while multiple > 1 and hidden < 8 * multiple:
        multiple //= 2
    return multiple


def select_channels(flows: dict[str, ffnflow.ChannelFlow], scores: dict[str, torch.Tensor],
                    ratio: float, multiple: int, per_layer: bool) -> dict[str, list[int]]:
    """Kept channels per FFN: how many from the ratio (one global ranking unless per_layer),
    rounded to the FFN's multiple; which ones by score within the FFN, ties broken by index."""
    if per_layer:
        removed = {n: int(round(ratio * f.hidden)) for n, f in flows.items()}
    else:
        ranked = sorted((float(scores[n][c]), i, c) for i, n in enumerate(flows)
                        for c in range(flows[n].hidden))
        names = list(flows)
        removed = dict.fromkeys(flows, 0)
        for _, i, _ in ranked[:int(round(ratio * sum(f.hidden for f in flows.values())))]:
            removed[names[i]] += 1
    kept = {}
    for name, f in flows.items():
        n_keep = f.hidden
        if removed[name]:
            m = effective_multiple(f.hidden, multiple)
            n_keep = min(max(m, int(round((f.hidden - removed[name]) / m)) * m), f.hidden)
        order = sorted(range(f.hidden), key=lambda c: (-float(scores[name][c]), c))
        kept[name] = sorted(order[:n_keep])
    return kept


def prune_channels(graph, kept: dict[str, list[int]]) -> None:
    """Physically keep only `kept[ffn]` hidden channels; rewrite weights and split sizes."""
    changed = _changed_ffns(graph, kept)
    for flow, channels in changed:
        for target, dim, idx in _ffn_slices(flow, channels):
            value = graph.param(target)
            graph.set_param(target, value.index_select(dim, idx.to(value.device)).contiguous())
        for split, pieces in flow.splits:
            sizes = [flow.piece_size(p, channels) for p in pieces]
            split.update_arg(1, sizes if split.target is aten.split_with_sizes.default
                             else sizes[0])
    if changed:
        graph.refresh()


def channel_slices(graph, kept: dict[str, list[int]]) -> list[tuple[str, int, torch.Tensor]]:
    """Every stored weight `prune_channels(graph, kept)` shrinks: (path, dim, indices kept)."""
    return [s for flow, ch in _changed_ffns(graph, kept) for s in _ffn_slices(flow, ch)]


def _changed_ffns(graph, kept: dict[str, list[int]]) -> list[tuple[ffnflow.ChannelFlow, list[int]]]:
    flows = ffnflow.find(graph) if kept else {}
    out = []
    for name, channels in kept.items():
        if name not in flows:
            raise GraphoptError(f"FFN '{name}' is not prunable in this graph; prunable ones: "
                                f"{sorted(flows)[:4]}")
        flow = flows[name]
        channels = sorted(set(channels))
        if not channels or channels[0] < 0 or channels[-1] >= flow.hidden:
            raise GraphoptError(f"FFN '{name}' has {flow.hidden} hidden channels; cannot keep "
                                f"{len(channels)} of them up to index {channels[-1] if channels else None}")
        if len(channels) < flow.hidden:
            out.append((flow, channels))
    return out


def _ffn_slices(flow: ffnflow.ChannelFlow, channels: list[int]) -> list[tuple[str, int, torch.Tensor]]:
    rows = flow.up_rows(channels)
    out = [(_stored(flow.up.args[1]), 0, rows)]
    if len(flow.up.args) > 2 and isinstance(flow.up.args[2], fx.Node):
        out.append((_stored(flow.up.args[2]), 0, rows))
    out.append((_stored(flow.down.args[1]), 1, flow.down_columns(channels)))
    return out


def _mask_from_kept(heads: int, kept: list[int]) -> torch.Tensor:
    m = torch.zeros(heads)
    m[list(kept)] = 1.0
    return m


def prune_heads(graph, kept: dict[str, list[int]]) -> None:
    """Physically keep only `kept[attention]` heads; rewrite weights and shape constants."""
    for flow, heads in _changed_flows(graph, kept):
        _prune_one(graph, flow, heads)
    graph.refresh()


def weight_slices(graph, kept: dict[str, list[int]]) -> list[tuple[str, int, torch.Tensor]]:
    """Every stored weight `prune_heads(graph, kept)` shrinks: (path, dim, indices kept along dim).

    The one description of which rows/columns a head owns: `prune_heads` slices the graph's
    weights with it, and `graphopt apply` the same tensors in a checkpoint on disk.
    """
    return [s for flow, heads in _changed_flows(graph, kept) for s in _flow_slices(flow, heads)]


def _changed_flows(graph, kept: dict[str, list[int]]) -> list[tuple[headflow.HeadFlow, list[int]]]:
    out = []
    for name, heads in kept.items():
        if name not in graph.flows:
            raise GraphoptError(f"attention '{name}' is not prunable in this graph "
                                f"({graph.attentions[name].why_not if name in graph.attentions else 'not found'})")
        flow = graph.flows[name]
        heads = sorted(set(heads))
        if not heads or heads[0] < 0 or heads[-1] >= flow.heads:
            raise GraphoptError(f"attention '{name}' has {flow.heads} heads; cannot keep {heads}")
        if len(heads) < flow.heads:
            out.append((flow, heads))
    return out


def _flow_slices(flow: headflow.HeadFlow, heads: list[int]) -> list[tuple[str, int, torch.Tensor]]:
    out = []
    for lin, dim in flow.producers:
        idx = headflow.kept_indices(dim, heads)
        out.append((_stored(lin.args[1]), 0, idx))
        if len(lin.args) > 2 and isinstance(lin.args[2], fx.Node):
            out.append((_stored(lin.args[2]), 0, idx))
    for lin, dim in flow.consumers:
        out.append((_stored(lin.args[1]), 1, headflow.kept_indices(dim, heads)))
    for norm, first in flow.norms:
        idx = headflow.kept_indices(_norm_dim(flow, norm, first), heads)
        for w in norm.args[2:4]:
            if isinstance(w, fx.Node):
                out.append((_stored(w), 0, idx))
    return out


def _norm_dim(flow: headflow.HeadFlow, norm: fx.Node, first: int):
    dims = flow.labels[norm.args[0]][first:]
    if len(dims) != 1:
        raise GraphoptError(f"norm '{norm.name}' normalises several head-carrying dims; "
                            f"not supported by prune")
    return dims[0]


def _prune_one(graph, flow: headflow.HeadFlow, heads: list[int]):
    k = len(heads)
    for target, dim, idx in _flow_slices(flow, heads):
        value = graph.param(target)
        graph.set_param(target, value.index_select(dim, idx.to(value.device)).contiguous())
    for norm, first in flow.norms:
        norm.update_arg(1, [headflow.new_size(_norm_dim(flow, norm, first), k)])
    for j, (user, operand, dim, label) in enumerate(flow.sliced_operands):
        buf = f"graphopt_kept_{flow.attention.replace('.', '_')}_{j}"
        val = operand.meta.get("val")          # on the operand's device (meta for a meta graph)
        graph.gm.register_buffer(buf, headflow.kept_indices(label, heads).to(
            val.device if isinstance(val, torch.Tensor) else "cpu"))
        with graph.gm.graph.inserting_before(user):
            idx = graph.gm.graph.get_attr(buf)
            picked = graph.gm.graph.call_function(aten.index_select.default, (operand, dim, idx))
        user.replace_input_with(operand, picked)
    for node, labels in flow.labels.items():
        if not isinstance(labels, tuple):
            continue
        t = node.target
        if t in headflow.RESHAPES or t is aten.expand.default:
            node.update_arg(1, _rewrite_sizes(node.args[1], labels, k))
        elif t is aten.unflatten.int:
            dim = node.args[1] % len(node.args[0].meta["val"].shape)
            node.update_arg(2, _rewrite_sizes(node.args[2], labels[dim:dim + len(node.args[2])], k))


def _rewrite_sizes(sizes, labels, k):
    out = []
    for s, d in zip(sizes, labels):
        if isinstance(s, int) and s != -1 and headflow.heads_of(d):
            s = headflow.new_size(d, k)
        out.append(s)
    return list(out)


def _stored(get_attr: fx.Node) -> str:
    if get_attr.op != "get_attr":
        raise GraphoptError(f"weight '{get_attr.name}' is computed, not stored; cannot prune it")
    return get_attr.target


def mask_heads(graph, masks: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of the graph's module where head h of attention a is scaled by masks[a][h].

    The mask scales each head's input to the output projections, and head-spanning norms use a
    mask-weighted statistic (mean of x² over the kept heads' channels). With a 0/1 mask this is
    the reference that `prune` must equal; with a trainable all-ones mask its gradient is the
    first-order (Taylor) head importance.
    """
    import copy

    gm = copy.deepcopy(graph.gm)
    names = {n.name: n for n in gm.graph.nodes}
    for i, (attn, mask) in enumerate(masks.items()):
        flow = graph.flows[attn]
        buf = f"graphopt_head_mask_{i}"
        gm.register_buffer(buf, mask.detach().clone().float())
        for j, (lin, dim) in enumerate(flow.consumers):
            lin = names[lin.name]
            x = lin.args[0]
            with gm.graph.inserting_before(lin):
                vec = _mask_vector(gm, buf, f"{buf}_c{j}", dim)
                lin.update_arg(0, gm.graph.call_function(aten.mul.Tensor, (x, vec)))
        for j, (norm, first) in enumerate(flow.norms):
            norm = names[norm.name]
            dims = flow.labels[graph.node(norm.name).args[0]][first:]
            if norm.target is not aten.rms_norm.default or len(dims) != 1:
                raise GraphoptError(f"cannot mask heads through norm '{norm.name}' "
                                    f"({norm.target}); only rms_norm over one dim is supported")
            with gm.graph.inserting_before(norm):
                vec = _mask_vector(gm, buf, f"{buf}_n{j}", dims[0])
                new = _masked_rms_norm(gm.graph, norm, vec)
            norm.replace_all_uses_with(new)
            gm.graph.erase_node(norm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _mask_vector(gm, mask_buf: str, name: str, dim) -> fx.Node:
    """mask (H,) → per-channel vector along a labelled dim: mask @ E + c (E, c constant)."""
    heads = next(s for seg in dim for s, is_h in seg if is_h)
    eye = torch.eye(heads)
    const = headflow.head_mask_along(dim, torch.zeros(heads))   # 1 on channels of no head
    expand = torch.stack([headflow.head_mask_along(dim, eye[h]) - const for h in range(heads)])
    gm.register_buffer(name + "_E", expand)
    gm.register_buffer(name + "_c", const)
    g = gm.graph
    m = g.get_attr(mask_buf)
    e = g.get_attr(name + "_E")
    c = g.get_attr(name + "_c")
    return g.call_function(aten.add.Tensor, (g.call_function(aten.matmul.default, (m, e)), c))


def _masked_rms_norm(g: fx.Graph, norm: fx.Node, vec: fx.Node) -> fx.Node:
    x, _, weight = norm.args[:3]
    eps = norm.args[3] if len(norm.args) > 3 else None
    if eps is None:
        eps = torch.finfo(norm.meta["val"].dtype).eps
    sq = g.call_function(aten.mul.Tensor, (g.call_function(aten.mul.Tensor, (x, x)), vec))
    total = g.call_function(aten.sum.dim_IntList, (sq, [-1], True))
    mean = g.call_function(aten.div.Tensor, (total, g.call_function(aten.sum.default, (vec,))))
    inv = g.call_function(aten.rsqrt.default, (g.call_function(aten.add.Tensor, (mean, eps)),))
    y = g.call_function(aten.mul.Tensor, (x, inv))
    return g.call_function(aten.mul.Tensor, (y, weight)) if weight is not None else y


def mask_channels(graph, masks: dict[str, torch.Tensor], gm: fx.GraphModule | None = None
                  ) -> fx.GraphModule:
    """A copy of `gm` (default: the graph's module) where hidden channel c of FFN f is scaled by
    masks[f][c]: the mask multiplies the channel's input to the down projection.

    With a 0/1 mask this is the reference that `prune` must equal; with a trainable all-ones mask
    its gradient is the first-order channel importance. Mask buffers are named
    graphopt_channel_mask_<i>, in the order of `masks`. `gm` must contain the graph's nodes under
    their names (a `mask_heads` result does).
    """
    import copy

    flows = ffnflow.find(graph)
    gm = copy.deepcopy(graph.gm if gm is None else gm)
    names = {n.name: n for n in gm.graph.nodes}
    g = gm.graph
    for i, (name, mask) in enumerate(masks.items()):
        if name not in flows:
            raise GraphoptError(f"FFN '{name}' is not prunable in this graph; prunable ones: "
                                f"{sorted(flows)[:4]}")
        flow = flows[name]
        buf = f"graphopt_channel_mask_{i}"
        gm.register_buffer(buf, mask.detach().clone().float())
        down = names[flow.down.name]
        cols = fxutil.shape(flow.down.args[1])[1]
        with g.inserting_before(down):
            vec = g.get_attr(buf)
            if cols != flow.hidden:       # other features share the down projection: scale 1
                parts = []
                for j, size in ((0, flow.start), (1, cols - flow.start - flow.hidden)):
                    if size:
                        gm.register_buffer(f"{buf}_ones{j}", torch.ones(size))
                        parts.append((j, g.get_attr(f"{buf}_ones{j}")))
                before = [p for j, p in parts if j == 0]
                after = [p for j, p in parts if j == 1]
                vec = g.call_function(aten.cat.default, (before + [vec] + after,))
            down.update_arg(0, g.call_function(aten.mul.Tensor, (down.args[0], vec)))
    g.lint()
    gm.recompile()
    return gm
