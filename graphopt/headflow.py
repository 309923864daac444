"""Head-axis dataflow: where an attention's heads live in every tensor between its projections.

Removing a head by hand means editing q/k/v rows, out-projection columns, norm weights and every
reshape constant in between. Here that bookkeeping is derived from the graph: starting at the
linears that produce q/k/v, each tensor dimension is labelled with its *factors* (row-major
sub-axes, one of which may be the head axis), the labels are pushed forward op by op, and they end
at the linears that consume the attention output. The result (`HeadFlow`) says, for one attention:

- `producers`: linears whose output rows are head-structured (q/k/v, fused qkv, added-context q/k/v);
- `consumers`: linears whose input columns are head-structured (to_out, or a fused out-projection
  over `cat([attention, mlp])` as in single-stream blocks);
- `norms`: normalisations whose statistic spans heads (qk-norm "across heads");
- `labels`: per node, per output dimension, its factors, so that shape literals can be rewritten.

An op that is not understood while it carries the head axis stops the analysis with a message that
names the op: a silent guess here would corrupt weights.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from graphopt import fxutil
from graphopt.errors import GraphoptError

aten = torch.ops.aten

# A factor is (size, is_heads). A dimension is a tuple of segments (concatenated along that dim),
# each a tuple of factors (row-major). None means the dimension does not involve heads.
Factor = tuple[int, bool]
Segment = tuple[Factor, ...]
Dim = tuple[Segment, ...] | None
Labels = tuple[Dim, ...]

ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.pow.Tensor_Scalar, aten.silu.default, aten.gelu.default, aten.tanh.default,
    aten.sigmoid.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default,
    aten.type_as.default, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default,
    aten.to.device, aten.contiguous.default, aten.clone.default, aten.dropout.default,
    aten.alias.default, aten.detach.default, aten.where.self, aten.add.Scalar, aten.mul.Scalar,
    aten.sub.Scalar, aten.div.Scalar,
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.softmax.int, aten._softmax.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.copy_.default, aten.copy.default, aten.lerp.Scalar, aten.clamp.default,
}
# Ops whose output takes its layout from the first argument alone (the rest give dtype or values).
LIKE_FIRST = {
    aten.type_as.default, aten.copy_.default, aten.copy.default, aten.to.dtype,
    aten.to.dtype_layout, aten._to_copy.default, aten.to.device, aten.empty_like.default,
    aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.contiguous.default, aten.clone.default, aten.dropout.default, aten.alias.default,
    aten.detach.default,
}
LINEAR = {aten.linear.default}
SDPA = {aten.scaled_dot_product_attention.default}
NORMS = {aten.rms_norm.default, aten.layer_norm.default}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
NO_TENSOR_OUT = {aten._assert_tensor_metadata.default, aten.sym_size.int}


def heads_of(dim: Dim) -> bool:
    return dim is not None and any(is_h for seg in dim for _, is_h in seg)


def dim_size(dim: Dim) -> int:
    return sum(math.prod(s for s, _ in seg) for seg in dim)


def kept_indices(dim: Dim, kept_heads: list[int]) -> torch.Tensor:
    """Flat indices along `dim` that survive when only `kept_heads` stay (row-major per segment)."""
    out, offset = [], 0
    for seg in dim:
        sizes = [s for s, _ in seg]
        idx = torch.arange(math.prod(sizes)).reshape(sizes) + offset
        for axis, (_, is_h) in enumerate(seg):
            if is_h:
                idx = idx.index_select(axis, torch.tensor(kept_heads, dtype=torch.long))
        out.append(idx.reshape(-1))
        offset += math.prod(sizes)
    return torch.cat(out)


def new_size(dim: Dim, n_kept: int) -> int:
    return sum(math.prod(n_kept if is_h else s for s, is_h in seg) for seg in dim)


def head_mask_along(dim: Dim, head_mask: torch.Tensor) -> torch.Tensor:
    """A (size of dim,) vector: for each flat index, the mask value of the head it belongs to."""
    parts = []
    for seg in dim:
        sizes = [s for s, _ in seg]
        m = torch.ones(sizes, dtype=head_mask.dtype, device=head_mask.device)
        for axis, (s, is_h) in enumerate(seg):
            if is_h:
                shape = [1] * len(sizes)
                shape[axis] = s
                m = m * head_mask.reshape(shape)
        parts.append(m.reshape(-1))
    return torch.cat(parts)


@dataclass
class HeadFlow:
    attention: str          # module path of the attention (innermost module of the sdpa node)
    sdpa: fx.Node
    heads: int
    head_dim: int
    producers: list[tuple[fx.Node, Dim]] = field(default_factory=list)   # linear, label of its out dim
    consumers: list[tuple[fx.Node, Dim]] = field(default_factory=list)   # linear, label of its in dim
    norms: list[tuple[fx.Node, int]] = field(default_factory=list)       # norm node, first normalised dim
    # Unlabelled full-size operands of ops on labelled tensors (e.g. a rotary table of width
    # heads*head_dim computed outside the attention): (node, operand, its dim, label).
    sliced_operands: list[tuple[fx.Node, fx.Node, int, Dim]] = field(default_factory=list)
    labels: dict[fx.Node, Labels | list[Labels]] = field(default_factory=dict)


def _in_module(node: fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == path for p, _ in stack.values())


def canonical(seg: Segment) -> Segment:
    """Merge adjacent non-head factors: (H)(4)(2) and (H)(8) are the same layout."""
    out: list[Factor] = []
    for size, is_h in seg:
        if size == 1 and not is_h:
            continue
        if out and not is_h and not out[-1][1]:
            out[-1] = (out[-1][0] * size, False)
        else:
            out.append((size, is_h))
    return tuple(out)


def _unlabelled(ndim: int) -> Labels:
    return (None,) * ndim


def _fail(node: fx.Node, attention: str, why: str):
    raise GraphoptError(
        f"cannot follow the heads of attention '{attention}' through node '{node.name}' "
        f"({node.target}): {why}. This op layout is not supported by head pruning yet; "
        f"exclude this attention (prune option `attentions`) or report the model."
    )


def _regroup(in_dims: Labels, in_shape, out_shape, node, attention) -> Labels:
    """Labels after a reshape from in_shape to out_shape (both concrete)."""
    factors: list[Factor] = []
    for d, size in zip(in_dims, in_shape):
        if d is None:
            factors.append((size, False))
        elif len(d) == 1:
            factors.extend(d[0])
        else:
            _fail(node, attention, "a reshape through a concatenated head axis")
    factors = [f for f in factors if f[0] != 1]
    out: list[Dim] = []
    i = 0
    for size in out_shape:
        seg: list[Factor] = []
        remaining = size
        while remaining > 1:
            s, is_h = factors[i]
            if remaining % s == 0:
                seg.append((s, is_h))
                remaining //= s
                i += 1
            elif not is_h and s % remaining == 0:
                seg.append((remaining, False))
                factors[i] = (s // remaining, False)
                remaining = 1
            else:
                _fail(node, attention, "the head axis would be split or merged irregularly")
        out.append((canonical(tuple(seg)),) if any(h for _, h in seg) else None)
    return tuple(out)


def _norm_dims(shape, normalized_shape) -> int:
    return len(shape) - len(normalized_shape)


def trace(gm: fx.GraphModule, sdpa: fx.Node) -> HeadFlow:
    """Find producers, consumers and labels for the attention computed by `sdpa`."""
    attention = fxutil.module_path(sdpa)
    q_shape = fxutil.shape(sdpa.args[0])
    heads, head_dim = q_shape[1], q_shape[-1]
    flow = HeadFlow(attention, sdpa, heads, head_dim)

    # 1. Producers: linears inside the attention module that the q/k/v values come from.
    producers: dict[fx.Node, Dim] = {}
    seen, todo = set(), [a for a in sdpa.args[:3]]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op != "call_function" or not _in_module(n, attention):
            continue
        if n.target in LINEAR:
            out = fxutil.shape(n)[-1]
            if out % (heads * head_dim) == 0:
                m = out // (heads * head_dim)
                seg = ((m, False),) if m > 1 else ()
                producers[n] = ((seg + ((heads, True), (head_dim, False))),)
            continue
        todo.extend(a for a in n.all_input_nodes)
    if not producers:
        _fail(sdpa, attention, "no linear projection found for q/k/v")
    flow.producers = list(producers.items())

    # 2. Forward propagation in graph order.
    labels: dict[fx.Node, object] = {}
    for p, d in producers.items():
        labels[p] = _unlabelled(len(fxutil.shape(p)) - 1) + (d,)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    start = min(order[p] for p in producers)
    consumers: dict[fx.Node, Dim] = {}
    for n in list(gm.graph.nodes)[start:]:
        if n in labels or n.op != "call_function":
            continue
        ins = [a for a in n.all_input_nodes if a in labels]
        if not ins:
            continue
        out = _propagate(n, labels, flow, consumers)
        if out is not None:
            labels[n] = out
    flow.consumers = list(consumers.items())
    flow.labels = labels

    # 3. Every labelled tensor must end at a consumer; none may leave through the graph output.
    for n, lab in labels.items():
        if isinstance(lab, tuple) and any(heads_of(d) for d in lab):
            for user in n.users:
                if user.op == "output":
                    _fail(n, attention, "the head axis reaches the model output")
    sdpa_lab = labels.get(sdpa)
    if sdpa_lab is None or not heads_of(sdpa_lab[1]):
        _fail(sdpa, attention, "q/k/v heads did not arrive at dim 1 of scaled_dot_product_attention")
    if not consumers:
        _fail(sdpa, attention, "no output projection consumes the attention result")
    return flow


def _broadcast(n: fx.Node, labels, flow) -> Labels:
    return _broadcast_inputs(n, n.all_input_nodes, labels, flow, len(fxutil.shape(n)))


def _broadcast_inputs(n: fx.Node, inputs, labels, flow, ndim) -> Labels:
    out: list[Dim] = [None] * ndim
    for a in inputs:
        lab = labels.get(a)
        if not isinstance(lab, tuple):
            continue
        offset = ndim - len(fxutil.shape(a))
        for i, d in enumerate(lab):
            if d is None:
                continue
            j = i + offset
            if out[j] is not None and out[j] != d:
                _fail(n, flow.attention, "inputs carry different head layouts")
            out[j] = d
    # Operands without labels that span a labelled dim at full size must shrink with the heads.
    for a in inputs:
        if isinstance(labels.get(a), tuple) or fxutil.shape(a) is None:
            continue
        offset = ndim - len(fxutil.shape(a))
        for i, size in enumerate(fxutil.shape(a)):
            d = out[i + offset]
            if d is not None and size > 1:
                if size != dim_size(d):
                    _fail(n, flow.attention, "an operand broadcasts against the head axis")
                flow.sliced_operands.append((n, a, i, d))
    return tuple(out)


def _propagate(n: fx.Node, labels, flow: HeadFlow, consumers) -> object:
    t, a = n.target, n.args
    x = a[0] if a else None
    xl = labels.get(x) if isinstance(x, fx.Node) else None
    shape = fxutil.shape(n)

    if t in NO_TENSOR_OUT:
        return None
    if t in LINEAR:
        if xl is None or not heads_of(xl[-1]) or any(heads_of(d) for d in xl[:-1]):
            _fail(n, flow.attention, "a linear reads the head axis in an unexpected position")
        consumers[n] = xl[-1]
        return None
    if t in SDPA:
        ql, vl = labels.get(a[0]), labels.get(a[2])
        kl = labels.get(a[1])
        for lab in (ql, kl, vl):
            if lab is None or lab[1] != (((flow.heads, True),),):
                _fail(n, flow.attention, "q, k and v must all carry the heads at dim 1")
        mask = a[3] if len(a) > 3 else n.kwargs.get("attn_mask")
        mask_shape = fxutil.shape(mask)
        if mask_shape is not None and len(mask_shape) == 4 and mask_shape[1] == flow.heads:
            flow.sliced_operands.append((n, mask, 1, ql[1]))   # a mask repeated per head
        return (None, ql[1], None, None)
    if t in NORMS:
        normalized = a[1]
        first = _norm_dims(fxutil.shape(x), normalized)
        if any(heads_of(d) for d in xl[first:]):
            flow.norms.append((n, first))
        return xl
    if t in LIKE_FIRST:
        return xl if xl is not None else _unlabelled(len(shape))
    if t in ELEMENTWISE:
        return _broadcast(n, labels, flow)
    if t is aten.stack.default:
        dim = (a[1] if len(a) > 1 else 0) % len(shape)
        lab = list(_broadcast_inputs(n, a[0], labels, flow, len(shape) - 1))
        lab.insert(dim, None)
        return tuple(lab)
    if t is operator.getitem:
        lab = labels[x]
        if isinstance(lab, list):
            return lab[a[1]]
        _fail(n, flow.attention, "indexing a head-carrying tensor")
    if t in (aten.unflatten.int,):
        dim = a[1] % len(fxutil.shape(x))
        x_shape = fxutil.shape(x)
        return _regroup(xl, x_shape, x_shape[:dim] + tuple(shape[dim:dim + len(a[2])])
                        + x_shape[dim + 1:], n, flow.attention)
    if t in RESHAPES or t is aten.flatten.using_ints:
        return _regroup(xl, fxutil.shape(x), shape, n, flow.attention)
    if t is aten.permute.default:
        return tuple(xl[d] for d in a[1])
    if t is aten.transpose.int:
        lab = list(xl)
        d0, d1 = a[1] % len(lab), a[2] % len(lab)
        lab[d0], lab[d1] = lab[d1], lab[d0]
        return tuple(lab)
    if t is aten.unsqueeze.default:
        lab = list(xl)
        lab.insert(a[1] % (len(lab) + 1), None)
        return tuple(lab)
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        return _regroup(xl, fxutil.shape(x), shape, n, flow.attention)
    if t is aten.expand.default:
        return tuple([None] * (len(shape) - len(xl)) + list(xl))
    if t in (aten.unbind.int, aten.select.int, aten.slice.Tensor):
        dim = (a[1] if len(a) > 1 else 0) % len(xl)
        if heads_of(xl[dim]):
            _fail(n, flow.attention, "slicing along the head axis")
        if t is aten.slice.Tensor:
            return xl
        rest = xl[:dim] + xl[dim + 1:]
        return [rest] * fxutil.shape(x)[dim] if t is aten.unbind.int else rest
    if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = (a[2] if len(a) > 2 else 0) % len(xl)
        n_out = len(n.meta["val"])
        if not heads_of(xl[dim]):
            return [xl] * n_out
        # A fused qkv: the leading non-head factor splits evenly into the outputs.
        seg = xl[dim][0] if len(xl[dim]) == 1 else None
        if seg is None or seg[0][1] or seg[0][0] != n_out:
            _fail(n, flow.attention, "splitting the head axis unevenly")
        rest = seg[1:]
        return [xl[:dim] + ((rest,),) + xl[dim + 1:]] * n_out
    if t is aten.index.Tensor:
        # x[..., idx, ...] with one 1-D index tensor on a dim that does not carry heads.
        idx = [i for i, v in enumerate(a[1]) if v is not None]
        if len(idx) != 1 or heads_of(xl[idx[0]]) or len(fxutil.shape(a[1][idx[0]])) != 1:
            _fail(n, flow.attention, "advanced indexing across the head axis")
        return xl[:idx[0]] + (None,) + xl[idx[0] + 1:]
    if t is aten.pad.default:
        padded = len(a[1]) // 2
        if any(heads_of(d) for d in xl[len(xl) - padded:]):
            _fail(n, flow.attention, "padding the head axis")
        return xl
    if t is aten.cat.default:
        tensors, dim = a[0], (a[1] if len(a) > 1 else 0)
        dim %= len(shape)
        labs = [labels.get(tn) or _unlabelled(len(fxutil.shape(tn))) for tn in tensors]
        others = {tuple(lab[:dim] + lab[dim + 1:]) for lab in labs}
        if len(others) != 1:
            _fail(n, flow.attention, "concatenating tensors with different head layouts")
        if not any(heads_of(lab[dim]) for lab in labs):
            return labs[0]
        segs: list[Segment] = []
        for tn, lab in zip(tensors, labs):
            segs.extend(lab[dim] if lab[dim] is not None else (((fxutil.shape(tn)[dim], False),),))
        return labs[0][:dim] + (tuple(segs),) + labs[0][dim + 1:]
    if t in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default):
        dims = [d % len(xl) for d in a[1]]
        if any(heads_of(xl[d]) for d in dims):
            _fail(n, flow.attention, "a reduction over the head axis")
        keep = len(a) > 2 and a[2]
        return tuple(None if i in dims else d for i, d in enumerate(xl) if keep or i not in dims)
    if t in (aten.bmm.default, aten.matmul.default, aten.baddbmm.default):
        if any(heads_of(d) for lab in (labels.get(v) for v in n.all_input_nodes)
               if isinstance(lab, tuple) for d in lab[-2:]):
            _fail(n, flow.attention, "a matmul contracting the head axis")
        return _broadcast(n, labels, flow)[:-2] + (None, None)
    _fail(n, flow.attention, "op not understood while it carries the head axis")
