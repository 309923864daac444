"""Helpers shared by analyses, passes and exporters: fx nodes of a captured (ATen) graph (shape,
module path, the op sets below), whether a tensor is being traced, a model's first output, and the
dtype names specs use.

The op sets say what a node's target means to a graph cutter (`graphopt.outline` moving a block into
a conditional branch, `exporters/segments.py` cutting the graph into ONNX segments): both must agree
on which values are recomputed where they are used instead of crossing a boundary, so there is one
set per meaning, here.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

aten = torch.ops.aten

# Integer arithmetic on symbolic sizes (dynamic batch): a conditional's operands and an ONNX
# segment's inputs are tensors, so these are recomputed from the tensor they read.
SIZE_OPS = frozenset({
    aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, operator.add, operator.sub,
    operator.mul, operator.floordiv, operator.mod, operator.neg, operator.truediv, torch.sym_int,
    torch.sym_max, torch.sym_min, torch.sym_float})
# Ops whose result may be their input itself (a cast to the dtype it has, `.contiguous()` of a
# contiguous tensor) or a view of all of it (`x[...]`): recomputed where used, so a boundary never
# carries one tensor twice (torch.export names a branch's inputs after its operands; an ONNX segment
# would output an alias of its input).
MAY_RETURN_INPUT = frozenset({
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.contiguous.default,
    aten.type_as.default, aten.flatten.using_ints, aten.alias.default})

# Tensor dtypes by the names specs and manifests use (numpy's, "bfloat16" included).
TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def is_tensor(node) -> bool:
    """Whether fx node `node` computes a tensor (its fake value says so)."""
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def shape(node) -> tuple | None:
    """The shape of the tensor `node` computes (sizes may be symbolic), None if it is no tensor."""
    return tuple(node.meta["val"].shape) if is_tensor(node) else None


def module_path(node: fx.Node) -> str:
    """The path of the innermost module `node` was traced in ("" at the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def recomputed_where_used(node: fx.Node) -> bool:
    """Whether a graph cutter recomputes `node` on its side of a boundary instead of passing it:
    sizes (boundaries carry tensors only) and tensors that may be their own input."""
    if node.op != "call_function":
        return False
    return node.target in SIZE_OPS or (node.target in MAY_RETURN_INPUT and is_tensor(node))


def tracing(t: torch.Tensor) -> bool:
    """True under torch.export / fake-tensor propagation / torch.compile: no side effects then."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or torch.compiler.is_exporting() or torch.compiler.is_compiling()


def first(out):
    """A model's first output: `out[0]` of a tuple or list, else `out` itself."""
    return out[0] if isinstance(out, (tuple, list)) else out
