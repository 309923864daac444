"""TensorRT constraints checker, the ONNX precision cast, and build planning: all without TensorRT.

Engine builds and TensorRT-vs-onnxruntime parity are marked `trt` and skip where TensorRT is absent.
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper

from graphopt.errors import GraphoptError
from graphopt.exporters.specs import Segment
from graphopt.exporters.ort_runner import OrtRunner
from graphopt.exporters.tensorrt import (
    BuildOptions,
    build_engines,
    cast_float_precision,
    plan_builds,
    profile_shapes,
    tensorrt_onnx,
)
from graphopt.exporters.trt_check import check_onnx, restore_bool_where


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def if_model(cond_type, cond_shape, else_width=4, opset=17, then_nodes=None, then_inputs=()):
    """x [batch, 4] -> If(cond): then Relu(x) (or `then_nodes`), else Neg(x) widened to `else_width`."""
    then_nodes = then_nodes or [helper.make_node("Relu", ["x"], ["then_y"])]
    then_graph = helper.make_graph(then_nodes, "then", [], [value("then_y", TensorProto.FLOAT, ["batch", 4])])
    else_nodes = [helper.make_node("Neg", ["x"], ["neg_x"])]
    if else_width != 4:
        else_nodes.append(helper.make_node("Concat", ["neg_x", "neg_x"], ["else_y"], axis=1))
    else:
        else_nodes[0] = helper.make_node("Neg", ["x"], ["else_y"])
    else_graph = helper.make_graph(else_nodes, "else", [], [value("else_y", TensorProto.FLOAT, ["batch", else_width])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="route_block_1")
    graph = helper.make_graph(
        [node], "g",
        [value("x", TensorProto.FLOAT, ["batch", 4]), value("cond", cond_type, cond_shape), *then_inputs],
        [value("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def branch(model, name):
    return next(a.g for a in model.graph.node[0].attribute if a.name == name)


def test_clean_if_graph_passes_and_runs():
    model = if_model(TensorProto.BOOL, [])
    onnx.checker.check_model(model)
    report = check_onnx(model, profile_dims={"batch"})
    assert report.ok and report.findings == [], report.render()
    assert "0 error(s), 0 warning(s)" in report.render()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x, "cond": np.array(False)})[0], -x)


def test_planted_bad_graph_is_flagged():
    model = if_model(TensorProto.FLOAT, [1], else_width=8)
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].Clear()  # dynamic and unnamed
    graph.node.extend([
        helper.make_node("Unique", ["x"], ["uniq"], name="dedup"),
        helper.make_node("FusedGelu", ["x"], ["fg"], domain="com.example", name="custom_gelu"),
        helper.make_node("Cast", ["x"], ["x64"], to=TensorProto.DOUBLE, name="to_double"),
    ])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    report = check_onnx(model, profile_dims={"batch"})
    by_code = {}
    for finding in report.findings:
        by_code.setdefault(finding.code, []).append(finding)
    assert not report.ok
    assert [f.node for f in by_code["if-condition"]] == ["route_block_1"]
    assert "float32 with rank 1" in by_code["if-condition"][0].message
    assert any("shapes differ" in f.message for f in by_code["if-branches"])
    assert {f.node for f in by_code["unsupported-op"]} == {"dedup", "custom_gelu"}
    assert any(f.severity == "error" and "unnamed" in f.message for f in by_code["dynamic-dim"])
    assert any(f.severity == "warning" and "float64" in f.message for f in by_code["dtype"])
    text = report.render()
    for fragment in ("[if-condition] route_block_1", "[unsupported-op] dedup", "0-d bool", "com.example::FusedGelu"):
        assert fragment in text


def test_branch_rank_dtype_and_name_mismatches():
    model = if_model(TensorProto.BOOL, [])
    else_branch = branch(model, "else_branch")
    else_branch.output[0].name = "then_y"  # same name as the then-branch output
    else_branch.node[0].output[0] = "then_y"
    else_branch.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    messages = [f.message for f in check_onnx(model).findings if f.code == "if-branches"]
    assert any("distinct names" in m for m in messages) and any("dtypes differ" in m for m in messages)


def test_dynamic_dim_without_profile_range_and_derived_dims():
    model = if_model(TensorProto.BOOL, [])
    report = check_onnx(model, profile_dims={"frames"})
    assert [f.code for f in report.errors] == ["dynamic-dim"] and "'batch'" in report.errors[0].message
    assert check_onnx(model).ok  # without ranges to check against, a named dim is fine
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "2*s0"
    assert [f.code for f in check_onnx(model).warnings] == ["dynamic-dim"]


def test_layer_norm_statistics_outputs_and_opset_range():
    nodes = [helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"], name="ln"),
             helper.make_node("Add", ["y", "mean"], ["out"])]
    graph = helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, ["batch", 4])],
                              [value("out", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [4], [1.0] * 4)])
    report = check_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(f.code, f.node) for f in report.findings] == [("layernorm-outputs", "ln")]
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [value("x", TensorProto.FLOAT, [2])],
                             [value("y", TensorProto.FLOAT, [2])])
    (finding,) = check_onnx(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 8)])).findings
    assert finding.code == "opset" and "opset_version=9" in finding.message


def _attention_if(opset, fused):
    """If whose then-branch is attention over q/k/v [1, 2, 8, 16]: the opset-23 Attention op or a
    MatMul-Softmax-MatMul chain."""
    qkv = [value(n, TensorProto.FLOAT, [1, 2, 8, 16]) for n in ("q", "k", "v")]
    if fused:
        nodes = [helper.make_node("Attention", ["q", "k", "v"], ["att"], name="sdpa")]
    else:
        nodes = [
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["scores"]),
            helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
            helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1, name="attn_softmax"),
            helper.make_node("MatMul", ["probs", "v"], ["att"]),
        ]
    then_graph = helper.make_graph(nodes, "then", [], [value("att", TensorProto.FLOAT, [1, 2, 8, 16])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["v"], ["skip"])], "else", [],
                                   [value("skip", TensorProto.FLOAT, [1, 2, 8, 16])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=then_graph, else_branch=else_graph, name="gate")],
        "g", [*qkv, value("cond", TensorProto.BOOL, [])], [value("out", TensorProto.FLOAT, [1, 2, 8, 16])],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [0.25])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_attention_inside_if_at_opset_23():
    fused = check_onnx(_attention_if(23, fused=True))
    found = [(f.severity, f.code, f.node) for f in fused.findings]
    assert found == [("error", "attention-in-if", "gate/then_branch/sdpa")]
    chain = check_onnx(_attention_if(23, fused=False))
    assert [(f.severity, f.node) for f in chain.findings] == [("warning", "gate/then_branch/attn_softmax")]
    assert check_onnx(_attention_if(17, fused=False)).findings == []


def test_int64_data_is_warned_but_shape_arithmetic_is_not():
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "zero_axis"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus_one"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"]),
    ]
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("zero_axis", TensorProto.INT64, [1], [0]),
        helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
    ]
    shape_only = helper.make_model(
        helper.make_graph(nodes, "g", [value("x", TensorProto.FLOAT, ["batch", 4, 4])],
                          [value("flat", TensorProto.FLOAT, ["batch", 16])], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    assert check_onnx(shape_only).findings == []
    data = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0)], "g",
            [value("ids", TensorProto.INT64, ["batch"])], [value("emb", TensorProto.FLOAT, ["batch", 4])],
            initializer=[helper.make_tensor("table", TensorProto.FLOAT, [10, 4], np.zeros(40).tolist())],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    (finding,) = check_onnx(data).findings
    assert (finding.severity, finding.code, finding.node) == ("warning", "dtype", "ids")


class _Block(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(F.layer_norm(x, (64,))).unflatten(2, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.ff(F.layer_norm(x, (64,)))


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("block") / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Block().eval(), (torch.randn(2, 32, 64),), str(path), input_names=["x"],
                          output_names=["x_next"], dynamic_axes={"x": {0: "batch"}, "x_next": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


def test_exported_torch_block_is_clean(block_onnx):
    report = check_onnx(block_onnx, profile_dims={"batch"})
    assert report.findings == [], report.render()


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_fp16_cast_keeps_io_types_and_onnxruntime_still_runs_it(block_onnx):
    model = onnx.load(str(block_onnx))
    x = np.random.default_rng(1).standard_normal((3, 32, 64)).astype(np.float32)
    reference = _run(model, x)
    cast = cast_float_precision(model, "float16")
    onnx.checker.check_model(cast)
    assert {init.data_type for init in cast.graph.initializer if init.data_type in (1, 10)} == {TensorProto.FLOAT16}
    assert [v.type.tensor_type.elem_type for v in list(cast.graph.input) + list(cast.graph.output)] == [1, 1]
    got = _run(cast, x)
    assert got.dtype == np.float32
    assert 1e-5 < rel_err(got, reference) < 1e-2  # really computed in half precision, and close
    bare = cast_float_precision(model, "float16", keep_io_types=False)
    assert bare.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert rel_err(_run(bare, x.astype(np.float16)), reference) < 1e-2
    assert model.graph.initializer[0].data_type == TensorProto.FLOAT, "the input model is not modified"


def test_cast_reaches_if_subgraphs_and_bf16_weights():
    model = if_model(TensorProto.BOOL, [])
    then_graph = branch(model, "then_branch")
    then_graph.node.insert(0, helper.make_node("Constant", [], ["half"], value_float=0.5))
    then_graph.node[1].CopyFrom(helper.make_node("Relu", ["x"], ["relu"]))
    then_graph.node.append(helper.make_node("Mul", ["relu", "half"], ["then_y"]))
    cast = cast_float_precision(model, "float16")
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    session = ort.InferenceSession(cast.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = np.maximum(x, 0) * 0.5
    assert rel_err(session.run(None, {"x": x, "cond": np.array(True)})[0], expected) < 1e-3
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.5, -3.0])
    model.graph.initializer.append(weights)
    bf16 = cast_float_precision(model, "bfloat16")
    w = next(i for i in bf16.graph.initializer if i.name == "w")
    assert w.data_type == TensorProto.BFLOAT16
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(w).astype(np.float32), [1.0, 2.5, -3.0])
    with pytest.raises(GraphoptError, match="'float16' or 'bfloat16'"):
        cast_float_precision(model, "float8")


def test_profile_shapes_and_build_plan(block_onnx, tmp_path):
    plans = plan_builds(block_onnx, tmp_path, BuildOptions(precision="fp16", dim_ranges={"batch": (1, 2, 8)}))
    (plan,) = plans
    assert plan.engine_path == tmp_path / "block.engine" and plan.precision == "fp16"
    assert plan.profile == {"x": ((1, 32, 64), (2, 32, 64), (8, 32, 64))}
    with pytest.raises(GraphoptError, match="dynamic dim\\(s\\) \\['batch'\\] without a min/opt/max range"):
        plan_builds(block_onnx, tmp_path, BuildOptions())
    spec = Segment.from_onnx(block_onnx).inputs
    ranges = BuildOptions(dim_ranges={"batch": (1, 3, 5)}).dim_ranges
    assert profile_shapes(spec, ranges, "x") == {"x": ((1, 32, 64), (3, 32, 64), (5, 32, 64))}
    with pytest.raises(GraphoptError, match=r"^x: input 'x' \['batch', 32, 64\] has dynamic dim\(s\) \['batch'\]"):
        profile_shapes(spec, {"frames": ranges["batch"]}, "x")         # a range, but not for batch
    with pytest.raises(GraphoptError, match="min <= opt <= max"):   # a bad range fails where it is given
        BuildOptions(dim_ranges={"batch": (4, 2, 8)})
    with pytest.raises(GraphoptError, match="precision must be one of"):
        BuildOptions(precision="int8")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_build_without_tensorrt_says_what_to_install(block_onnx, tmp_path):
    with pytest.raises(GraphoptError, match="pip install tensorrt"):
        build_engines(block_onnx, tmp_path, BuildOptions(dim_ranges={"batch": (1, 2, 4)}))
    assert not list(tmp_path.iterdir()), "nothing is written when TensorRT is missing"


@pytest.mark.trt
@pytest.mark.parametrize("precision, tolerance", [("fp32", 5e-3), ("fp16", 2e-2)])
def test_single_file_engine_matches_onnxruntime(block_onnx, tmp_path, precision, tolerance):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt on an NVIDIA machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from graphopt.exporters.tensorrt import TrtRunner, parity_check

    cache = tmp_path / "timing.cache"
    (build,) = build_engines(block_onnx, tmp_path, BuildOptions(precision, {"batch": (1, 2, 4)}, timing_cache=cache))
    assert build.engine_path.is_file() and cache.is_file()
    x = torch.randn(3, 32, 64)
    report = parity_check(block_onnx, build.engine_path, {"x": x}, tolerance=tolerance)
    assert report.ok, report.render()
    runner = TrtRunner.from_file(build.engine_path, Segment.from_onnx(block_onnx))
    expected = OrtRunner(block_onnx, Segment.from_onnx(block_onnx))({"x": x})["x_next"]
    assert rel_err(runner({"x": x})["x_next"].cpu(), expected) < tolerance


def bool_where_model(source=TensorProto.BOOL):
    """out = Where(c, x, y) on bool x, y (from a float input), as a bool mask's masked_fill exports;
    with a float `source`, a lookalike on uint8 that is no bool Where and must stay."""
    if source == TensorProto.BOOL:
        nodes = [helper.make_node("Greater", ["a", "zero"], ["x"]), helper.make_node("Not", ["x"], ["y"]),
                 helper.make_node("Where", ["c", "x", "y"], ["out"], name="masked")]
    else:
        nodes = [helper.make_node("Cast", ["a"], ["x8"], to=TensorProto.UINT8),
                 helper.make_node("Cast", ["a"], ["y8"], to=TensorProto.UINT8),
                 helper.make_node("Where", ["c", "x8", "y8"], ["w8"]),
                 helper.make_node("Cast", ["w8"], ["out"], to=TensorProto.BOOL)]
    graph = helper.make_graph(nodes, "g", [value("c", TensorProto.BOOL, [4]), value("a", TensorProto.FLOAT, [4])],
                              [value("out", TensorProto.BOOL, [4])],
                              initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def uint8_where_model():
    """bool_where_model as graphopt's ONNX export writes it for onnxruntime (Where on uint8)."""
    from graphopt.exporters.onnx import _bool_where_to_uint8

    model = bool_where_model()
    assert _bool_where_to_uint8(model) == 1
    return model


def test_tensorrt_gets_the_bool_where_back():
    """onnxruntime's uint8 Where (the exporter's rewrite) is undone for TensorRT, exactly."""
    from onnx.reference import ReferenceEvaluator

    rewritten = uint8_where_model()
    onnx.checker.check_model(rewritten)
    report = check_onnx(rewritten, source="x")   # checks what TensorRT gets: no uint8 inside
    assert report.ok and "uint8" not in report.render(), report.render()
    assert len(rewritten.graph.node) == 6       # check_onnx restored a copy, not the caller's model
    restored = onnx.ModelProto()
    restored.CopyFrom(rewritten)
    assert restore_bool_where(restored) == 1
    assert [n.op_type for n in restored.graph.node] == ["Greater", "Not", "Where"]
    assert list(restored.graph.node[2].input) == ["c", "x", "y"] and restored.graph.node[2].name == "masked"
    onnx.checker.check_model(restored)
    feeds = {"c": np.array([True, False, True, False]), "a": np.array([1.0, 2.0, -1.0, -2.0], np.float32)}
    expected = ReferenceEvaluator(bool_where_model()).run(None, feeds)[0]
    np.testing.assert_array_equal(ReferenceEvaluator(restored).run(None, feeds)[0], expected)
    np.testing.assert_array_equal(ReferenceEvaluator(rewritten).run(None, feeds)[0], expected)
    lookalike = bool_where_model(TensorProto.FLOAT)
    assert restore_bool_where(lookalike) == 0 and len(lookalike.graph.node) == 4


def test_the_copy_tensorrt_parses_is_removed_even_when_the_build_fails(tmp_path, block_onnx):
    onnx.save(uint8_where_model(), str(tmp_path / "seg.onnx"))
    out = tmp_path / "engines"
    out.mkdir()
    with tensorrt_onnx(block_onnx, out, None) as path:
        assert path == block_onnx                  # nothing to change: parsed where it is
    for source, dtype, name in ((tmp_path / "seg.onnx", None, "seg.float32.onnx"),
                                (block_onnx, "float16", "block.float16.onnx")):
        with pytest.raises(RuntimeError, match="build failed"):
            with tensorrt_onnx(source, out, dtype) as path:
                assert path == out / name and path.is_file()
                assert restore_bool_where(onnx.load(str(path))) == 0
                raise RuntimeError("build failed")
        assert list(out.iterdir()) == []
