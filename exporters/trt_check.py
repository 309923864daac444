"""Check an ONNX graph against TensorRT's documented constraints, without TensorRT.

What is checked (each finding names the node or tensor and says how to fix it):

- opset outside the parser's range, and ops the parser does not support. The op table is the
  "Supported ONNX Operators" matrix of onnx-tensorrt (docs/operators.md, TensorRT 10.15: opset 9 to 24),
  https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md . Ops of other domains need a plugin.
- `If`: the condition must be a 0-d bool (TensorRT's IIfConditional takes "a 0D boolean tensor",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-conditionals.html);
  both branches must yield the same number of outputs with equal dtypes and ranks ("Output tensors of the
  two conditional branches must have the same rank and must have different names", operators.md); we
  also refuse differing fixed dims, since a routed block's skip branch must reproduce the stream's shape.
- attention inside an `If` at opset >= 23: the fused `Attention` op fails to build inside an If subgraph
  (NVIDIA/TensorRT issues #4739 and #4757, open on 10.16): error. A MatMul-Softmax-MatMul chain inside an
  If may be fused into the same attention kernel: warning (issue #4739 reports that variant building).
- dtypes: float64 (the parser casts it down to float32, clamping), string/complex/int16/uint16/uint32/uint64
  (unsupported), uint8 off the graph's I/O (only supported as network I/O), int64 outside shape
  arithmetic (works since TensorRT 10, but as data it is slower and is narrowed where kernels lack it).
- dynamic input dims: an unnamed dynamic dim cannot be given an optimization-profile range; a derived
  one ("2*s0") cannot get its own; a named one without a range (when ranges are given) cannot be built.
- LayerNormalization: only its first output is supported.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from graphopt.errors import GraphoptError

PARSER_TABLE = "onnx-tensorrt docs/operators.md, TensorRT 10.15"
OPSET_RANGE = (9, 24)

# The 'Y' rows of the support matrix (default ONNX domain).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

# The 'N' rows: documented as unsupported.
UNSUPPORTED_OPS = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement
QLinearConv QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase
SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat
StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

_BOOL, _INT64, _FLOAT64, _UINT8 = 9, 7, 11, 2
_UNSUPPORTED_DTYPES = {
    8: "string", 14: "complex64", 15: "complex128", 5: "int16", 4: "uint16", 12: "uint32", 13: "uint64",
}
_DTYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 3: "int8", 9: "bool", 7: "int64",
                11: "float64", 2: "uint8", **_UNSUPPORTED_DTYPES}

# Input slots that carry shapes/axes/indices-of-dims: an int64 tensor feeding only these is shape arithmetic.
_SHAPE_SLOTS = {
    "Reshape": {1}, "Expand": {1}, "Tile": {1}, "Slice": {1, 2, 3, 4}, "ConstantOfShape": {0}, "Range": {0, 1, 2},
    "Unsqueeze": {1}, "Squeeze": {1}, "Pad": {1, 3}, "Resize": {3}, "Split": {1}, "TopK": {1}, "OneHot": {1},
    "CumSum": {1}, "Trilu": {1}, "ReduceSum": {1}, "ReduceMean": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL1": {1}, "ReduceL2": {1}, "ReduceLogSum": {1}, "ReduceLogSumExp": {1},
    "ReduceSumSquare": {1},
}
# Ops through which shape arithmetic flows (Shape -> Gather -> Concat -> Reshape...).
_SHAPE_ARITHMETIC = {
    "Shape", "Size", "Concat", "Gather", "Slice", "Squeeze", "Unsqueeze", "Cast", "Add", "Sub", "Mul", "Div",
    "Mod", "Max", "Min", "Neg", "Abs", "Identity", "Equal", "Where", "ReduceProd", "Range", "Constant",
    "ConstantOfShape", "Expand", "Reshape",
}
# Between the two MatMuls of an attention: scaling, masking, dtype casts.
_ATTENTION_GLUE = {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Dropout", "Identity", "Reshape"}


@dataclass(frozen=True)
class Finding:
    """One problem: `node` is the node (or tensor) path, e.g. "If_3/then_branch/Attention_1"."""

    severity: str  # "error" (TensorRT rejects or mis-builds it) or "warning" (builds, but badly or lossy)
    code: str
    node: str
    message: str


@dataclass
class CheckReport:
    source: str
    opset: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing TensorRT is documented to reject was found."""
        return not self.errors

    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def render(self) -> str:
        head = (
            f"static TensorRT check of {self.source} (opset {self.opset}; op table: {PARSER_TABLE}): "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )
        lines = [head]
        for f in sorted(self.findings, key=lambda f: (f.severity != "error", f.code, f.node)):
            lines.append(f"  {f.severity:<7} [{f.code}] {f.node}: {f.message}")
        return "\n".join(lines)


def check_onnx(
    model: Any, profile_dims: Iterable[str] | None = None, source: str | None = None
) -> CheckReport:
    """Check an ONNX model (ModelProto or path) for TensorRT; weights are not needed and not loaded.

    What is checked is what TensorRT is given: the model with its uint8 `Where`s, onnxruntime's
    workaround, restored to bool ones (`restore_bool_where`, as `build_engines` does).
    `profile_dims`: the symbolic dims that have a min/opt/max range; when given, a dynamic input dim
    outside this set is an error.
    """
    import onnx

    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise GraphoptError(f"ONNX file not found: {path}")
        source = source or path.name
        model = onnx.load(str(path), load_external_data=False)
    else:
        given, model = model, onnx.ModelProto()
        model.CopyFrom(given)                           # the caller's model stays as it is
    restore_bool_where(model)
    source = source or (model.graph.name or "model")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    checker = _Checker(model, opset, set(profile_dims) if profile_dims is not None else None)
    checker.run()
    return CheckReport(source=source, opset=opset, findings=checker.findings)


def check_segmented(manifest: Any, dim_ranges: Mapping[str, Any] | None = None) -> list[CheckReport]:
    """check_onnx on every segment of a segmented manifest; the manifest's dims (+ dim_ranges) have ranges."""
    from graphopt.exporters.manifest import SegmentedManifest

    if not isinstance(manifest, SegmentedManifest):
        manifest = SegmentedManifest.load(manifest)
    profile_dims = set(manifest.dims) | set(dim_ranges or {})
    return [check_onnx(manifest.path_of(seg), profile_dims, source=seg.file) for seg in manifest.segments]


class _Checker:
    def __init__(self, model: Any, opset: int, profile_dims: set[str] | None):
        import onnx

        self.opset = opset
        self.profile_dims = profile_dims
        self.findings: list[Finding] = []
        self.functions = {(f.domain, f.name): f for f in model.functions}
        inferred = model
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
        except Exception as exc:  # onnx raises several types; a check without inferred types still helps
            self.add("warning", "shape-inference", "model",
                     f"ONNX shape inference failed ({exc}); dtype and If checks use declared types only")
        self.graph = inferred.graph
        self.types: dict[str, tuple[int, tuple | None]] = {}
        self.constants: set[str] = set()  # initializers and Constant outputs
        self.consumed: set[str] = {o.name for o in self.graph.output}  # names some node or the graph reads
        for graph in all_graphs(self.graph):
            for value in list(graph.input) + list(graph.output) + list(graph.value_info):
                self.types.setdefault(value.name, _type_of(value))
            for init in graph.initializer:
                self.constants.add(init.name)
                self.types.setdefault(init.name, (init.data_type, tuple(init.dims)))
            for node in graph.node:
                self.consumed.update(node.input)
                if node.op_type == "Constant" and node.output:
                    self.constants.add(node.output[0])
                    for attr in node.attribute:
                        if attr.name == "value":
                            self.types.setdefault(node.output[0], (attr.t.data_type, tuple(attr.t.dims)))

    def add(self, severity: str, code: str, node: str, message: str) -> None:
        self.findings.append(Finding(severity, code, node, message))

    def run(self) -> None:
        lo, hi = OPSET_RANGE
        if not lo <= self.opset <= hi:
            self.add("error", "opset", "model",
                     f"opset {self.opset} is outside the parser's range {lo}..{hi}; re-export with "
                     f"opset_version={min(max(self.opset, lo), hi)}")
        for node, path, if_depth in _walk(self.graph, "", 0, self.functions):
            self.check_op(node, path)
            if node.op_type == "If" and node.domain in ("", "ai.onnx"):
                self.check_if(node, path)
            if node.op_type == "LayerNormalization":
                self.check_layer_norm(node, path)
            if if_depth and self.opset >= 23 and node.op_type == "Attention":
                self.add("error", "attention-in-if", path,
                         "an ONNX Attention op inside an If fails to build on TensorRT 10.16 (NVIDIA/TensorRT "
                         "#4739, #4757); use the segmented layout (skip decided on the host), or export this "
                         "block's attention decomposed (opset < 23)")
        if self.opset >= 23:
            for _, path in self.if_attention_chains():
                self.add("warning", "attention-in-if", path,
                         "MatMul-Softmax-MatMul inside an If: TensorRT may fuse it into the attention kernel "
                         "that fails inside conditionals (NVIDIA/TensorRT #4739); prefer the segmented layout")
        self.check_dtypes()
        self.check_input_dims()

    def check_op(self, node: Any, path: str) -> None:
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) not in self.functions:
                self.add("error", "unsupported-op", path,
                         f"op {node.domain}::{node.op_type} is outside the ONNX standard domain; TensorRT needs "
                         "a plugin registered under that name, or export with standard ops")
            return
        if node.op_type in UNSUPPORTED_OPS:
            self.add("error", "unsupported-op", path,
                     f"{node.op_type} is documented as unsupported by TensorRT's ONNX parser ({PARSER_TABLE}); "
                     "rewrite it with supported ops before export")
        elif node.op_type not in SUPPORTED_OPS and ("", node.op_type) not in self.functions:
            self.add("error", "unsupported-op", path,
                     f"{node.op_type} is not in TensorRT's ONNX operator table ({PARSER_TABLE}); rewrite it "
                     "with supported ops or provide a plugin")

    def check_if(self, node: Any, path: str) -> None:
        cond = node.input[0]
        elem, shape = self.types.get(cond, (0, None))
        if elem == 0:
            self.add("warning", "if-condition", path,
                     f"cannot tell the type of condition '{cond}'; TensorRT needs a 0-d bool")
        elif elem != _BOOL or (shape is not None and len(shape) != 0):
            rank = "unknown rank" if shape is None else f"rank {len(shape)}"
            self.add("error", "if-condition", path,
                     f"condition '{cond}' is {_DTYPE_NAMES.get(elem, elem)} with {rank}; TensorRT's "
                     "IIfConditional needs a 0-d bool: reduce it to a scalar (e.g. ReduceMax, Squeeze) and "
                     "Cast to bool before the If")
        elif shape is None:
            self.add("warning", "if-condition", path,
                     f"cannot tell the rank of condition '{cond}'; TensorRT needs a 0-d bool")
        branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
        then_out, else_out = list(branches["then_branch"].output), list(branches["else_branch"].output)
        if len(then_out) != len(else_out):
            self.add("error", "if-branches", path,
                     f"then_branch yields {len(then_out)} outputs, else_branch {len(else_out)}; both must match")
            return
        for index, (a, b) in enumerate(zip(then_out, else_out)):
            (ta, sa), (tb, sb) = self._value_type(a), self._value_type(b)
            where = f"output {index} ('{a.name}' vs '{b.name}')"
            if a.name == b.name:
                self.add("error", "if-branches", path,
                         f"{where}: both branches name it '{a.name}'; TensorRT's parser needs distinct names "
                         "(end one branch with an Identity)")
            if ta and tb and ta != tb:
                self.add("error", "if-branches", path,
                         f"{where}: dtypes differ ({_DTYPE_NAMES.get(ta, ta)} vs {_DTYPE_NAMES.get(tb, tb)}); "
                         "cast one branch so both yield the same dtype")
            if sa is not None and sb is not None:
                if len(sa) != len(sb):
                    self.add("error", "if-branches", path,
                             f"{where}: ranks differ ({len(sa)} vs {len(sb)}); TensorRT needs equal ranks")
                elif any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(sa, sb)):
                    self.add("error", "if-branches", path,
                             f"{where}: shapes differ ({list(sa)} vs {list(sb)}); a skip branch must "
                             "return the stream unchanged in shape")

    def check_layer_norm(self, node: Any, path: str) -> None:
        if any(o and o in self.consumed for o in node.output[1:]):
            self.add("error", "layernorm-outputs", path,
                     "LayerNormalization's Mean/InvStdDev outputs are used; TensorRT supports only output Y: "
                     "compute the statistics with ReduceMean instead")

    def _value_type(self, value: Any) -> tuple[int, tuple | None]:
        elem, shape = _type_of(value)
        if elem:
            return elem, shape
        return self.types.get(value.name, (0, None))

    def if_attention_chains(self) -> Iterator[tuple[Any, str]]:
        for node, path, _ in _walk(self.graph, "", 0, self.functions):
            if node.op_type != "If":
                continue
            for attr in node.attribute:
                if attr.name in ("then_branch", "else_branch"):  # nested Ifs are visited in their turn
                    yield from _softmax_chains(attr.g, f"{path}/{attr.name}")

    def check_dtypes(self) -> None:
        by_dtype: dict[int, list[str]] = defaultdict(list)
        for name, (elem, _) in self.types.items():
            by_dtype[elem].append(name)
        for graph in all_graphs(self.graph):
            for node in graph.node:
                if node.op_type == "Cast":
                    to = next((a.i for a in node.attribute if a.name == "to"), 0)
                    if to in _UNSUPPORTED_DTYPES or to == _FLOAT64:
                        by_dtype[to].extend(o for o in node.output if o not in by_dtype[to])
        for elem, what in _UNSUPPORTED_DTYPES.items():
            if by_dtype.get(elem):
                self.add("error", "dtype", by_dtype[elem][0],
                         f"{len(by_dtype[elem])} tensor(s) are {what} ({_sample(by_dtype[elem], 5)}); TensorRT has "
                         "no such type: compute in float32/float16/int32/bool instead")
        if by_dtype.get(_FLOAT64):
            self.add("warning", "dtype", by_dtype[_FLOAT64][0],
                     f"{len(by_dtype[_FLOAT64])} tensor(s) are float64 ({_sample(by_dtype[_FLOAT64], 5)}); the parser "
                     "casts DOUBLE down to float32, clamping to +-FLT_MAX: cast to float32 in the model before export")
        io_names = {v.name for v in list(self.graph.input) + list(self.graph.output)}
        internal_u8 = [n for n in by_dtype.get(_UINT8, []) if n not in io_names]
        if internal_u8:
            self.add("warning", "dtype", internal_u8[0],
                     f"uint8 tensors inside the graph ({_sample(internal_u8, 5)}); TensorRT supports uint8 only "
                     "as network input/output: cast right after the input")
        shape_like = self._shape_like()
        data_int64 = [n for n in by_dtype.get(_INT64, []) if n not in shape_like]
        if data_int64:
            self.add("warning", "dtype", data_int64[0],
                     f"{len(data_int64)} int64 tensor(s) are data, not shape arithmetic ({_sample(data_int64, 5)}); "
                     "TensorRT runs them, but int32 is faster and better supported: export indices/timesteps as int32")

    def _shape_like(self) -> set[str]:
        """int64 values that only carry shapes: produced by Shape/Size or consumed in shape slots, closed
        over shape-arithmetic ops (forward and backward)."""
        nodes = [n for g in all_graphs(self.graph) for n in g.node]
        shape_like: set[str] = set()
        for node in nodes:
            if node.op_type in ("Shape", "Size"):
                shape_like.update(node.output)
            for slot in _SHAPE_SLOTS.get(node.op_type, ()):
                if slot < len(node.input) and node.input[slot]:
                    shape_like.add(node.input[slot])
        consumers: dict[str, list[Any]] = defaultdict(list)
        for node in nodes:
            for name in node.input:
                consumers[name].append(node)
        changed = True
        while changed:
            changed = False
            for node in nodes:
                if node.op_type not in _SHAPE_ARITHMETIC:
                    continue
                outs = [o for o in node.output if o]
                ins = [i for i in node.input if i and self.types.get(i, (0,))[0] == _INT64]
                if outs and all(o in shape_like for o in outs) and not set(ins) <= shape_like:
                    shape_like.update(ins)  # everything feeding a shape is a shape
                    changed = True
                ins_all = [i for i in node.input if i]
                from_shapes = ins_all and all(i in shape_like or i in self.constants for i in ins_all)
                # Expand/Reshape/ConstantOfShape turn shapes into data; everything else stays a shape.
                if from_shapes and node.op_type not in ("Expand", "Reshape", "ConstantOfShape"):
                    if not set(outs) <= shape_like:
                        shape_like.update(outs)
                        changed = True
        return shape_like

    def check_input_dims(self) -> None:
        for value in self.graph.input:
            if value.name in self.constants:
                continue
            for axis, dim in enumerate(value.type.tensor_type.shape.dim):
                where = f"input '{value.name}' axis {axis}"
                if dim.HasField("dim_value"):
                    continue
                if not dim.HasField("dim_param"):
                    self.add("error", "dynamic-dim", value.name,
                             f"{where} is dynamic but unnamed: an optimization profile needs a name to give it "
                             "min/opt/max; name it at export (torch.export.Dim('batch') or dynamic_axes)")
                elif not dim.dim_param.isidentifier():
                    self.add("warning", "dynamic-dim", value.name,
                             f"{where} is the derived dim '{dim.dim_param}'; a profile range applies to whole "
                             "dims: make it a named dim of its own at export")
                elif self.profile_dims is not None and dim.dim_param not in self.profile_dims:
                    self.add("error", "dynamic-dim", value.name,
                             f"{where} is the dynamic dim '{dim.dim_param}', which has no min/opt/max range: add "
                             "it to the manifest's 'dims' or pass dim_ranges")


def _walk(graph: Any, prefix: str, if_depth: int, functions: Mapping) -> Iterator[tuple[Any, str, int]]:
    """Every node, depth-first into subgraphs and local functions, with its path and If nesting depth."""
    for index, node in enumerate(graph.node):
        path = f"{prefix}{node.name or f'{node.op_type}#{index}'}"
        yield node, path, if_depth
        for attr in node.attribute:
            inner = if_depth + (node.op_type == "If")
            subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
            for sub in subgraphs:
                yield from _walk(sub, f"{path}/{attr.name}/", inner, functions)
        function = functions.get((node.domain, node.op_type))
        if function is not None:
            yield from _walk(function, f"{path}/{function.name}/", if_depth, functions)


def restore_bool_where(model: Any) -> int:
    """Undo, in place, the exporter's onnxruntime workaround for a bool `Where`: onnxruntime's CPU
    kernel has none, so graphopt.exporters.onnx computes it on uint8 between Casts, but TensorRT takes
    uint8 only as network I/O and has a bool Where. Matches Where(c, Cast(x, UINT8), Cast(y, UINT8))
    read only by a Cast to BOOL, with x and y bool, and makes it Where(c, x, y). Returns how many."""
    from onnx import TensorProto, helper

    types = elem_types(model)
    graphs = list(all_graphs(model.graph))
    readers: dict[str, list[Any]] = defaultdict(list)
    for graph in graphs:
        for node in graph.node:
            for name in node.input:
                readers[name].append(node)
    count = 0
    for graph in graphs:
        producer = {o: node for node in graph.node for o in node.output}
        kept_out = {v.name for v in graph.output}

        def only_into(name: str, node: Any) -> bool:
            return name not in kept_out and readers[name] == [node]

        restored, gone = {}, set()
        for node in graph.node:
            after = readers[node.output[0]] if node.op_type == "Where" else []
            if len(after) != 1 or not _casts_to(after[0], TensorProto.BOOL) or not only_into(node.output[0], after[0]):
                continue
            casts = [producer.get(name) for name in node.input[1:]]
            if casts[0] is casts[1] or not all(
                c is not None and _casts_to(c, TensorProto.UINT8) and types.get(c.input[0]) == TensorProto.BOOL
                and only_into(c.output[0], node) for c in casts
            ):
                continue
            restored[id(node)] = helper.make_node(
                "Where", [node.input[0], casts[0].input[0], casts[1].input[0]], [after[0].output[0]], name=node.name
            )
            gone |= {id(casts[0]), id(casts[1]), id(after[0])}
        if restored:
            nodes = [restored.get(id(n), n) for n in graph.node if id(n) not in gone]
            del graph.node[:]
            graph.node.extend(nodes)
            count += len(restored)
    return count


def _casts_to(node: Any, elem_type: int) -> bool:
    return node.op_type == "Cast" and any(a.name == "to" and a.i == elem_type for a in node.attribute)


def elem_types(model: Any) -> dict[str, int]:
    """The ONNX element type of every value of `model` and its subgraphs, after shape inference
    (inputs, outputs, intermediate values, initializers, Constant outputs)."""
    import onnx

    types: dict[str, int] = {}
    for graph in all_graphs(onnx.shape_inference.infer_shapes(model).graph):
        for value in [*graph.input, *graph.output, *graph.value_info]:
            types[value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant":
                types.update({o: a.t.data_type for o in node.output for a in node.attribute if a.name == "value"})
    return types


def all_graphs(graph: Any) -> Iterator[Any]:
    """`graph` and every subgraph nested in it (If branches, Loop/Scan bodies), depth-first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_graphs(attr.g)
            for sub in attr.graphs:
                yield from all_graphs(sub)


def _softmax_chains(graph: Any, prefix: str) -> Iterator[tuple[Any, str]]:
    """Softmax nodes with a MatMul upstream and a MatMul downstream (through scale/mask/cast glue)."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)

    def reaches_up(name: str, depth: int) -> bool:
        node = producer.get(name)
        if node is None or depth > 4:
            return False
        if node.op_type == "MatMul":
            return True
        return node.op_type in _ATTENTION_GLUE and any(reaches_up(i, depth + 1) for i in node.input if i)

    def reaches_down(name: str, depth: int) -> bool:
        for node in consumers.get(name, []):
            if node.op_type == "MatMul" and node.input[0] == name:
                return True
            if depth < 4 and node.op_type in _ATTENTION_GLUE and any(reaches_down(o, depth + 1) for o in node.output):
                return True
        return False

    for index, node in enumerate(graph.node):
        if node.op_type == "Softmax" and reaches_up(node.input[0], 0) and reaches_down(node.output[0], 0):
            yield node, f"{prefix}/{node.name or f'Softmax#{index}'}"


def _type_of(value: Any) -> tuple[int, tuple | None]:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return 0, None
    if not tensor_type.HasField("shape"):
        return tensor_type.elem_type, None
    dims = tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    )
    return tensor_type.elem_type, dims


def _sample(names: list[str], count: int) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")
