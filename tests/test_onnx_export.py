"""ONNX export (single file with If, segmented) + onnxruntime vs PyTorch, float32, rel. error < 1e-4.

Fast: the tiny Wan family config (2 blocks) routed, both layouts, forced and router-decided gates;
HunyuanVideo and LTX-Video routed (segmented); LTX-Video plain (single file); `graphopt export --format trt`
end to end on the shipped teacher compressed with prune,route. Slow: the shipped teacher routed, both layouts.
"""
import numpy as np
import pytest
import torch

from graphopt import GraphoptError, PassManager, capture, rel_error
from graphopt.exporters.manifest import SegmentedManifest
from graphopt.exporters.onnx import export_onnx, load_onnx
from graphopt.exporters.trt_check import check_onnx, check_segmented
from graphopt.families import build_model
from graphopt.passes.route import Route

TOL = 1e-4


def _batch2(graph, seed):
    """A batch of 2 random samples shaped like the graph's example inputs (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in graph.example_inputs.items():
        if k == "return_dict":
            continue
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif k == graph.family.timestep_input:
            out[k] = torch.rand((2,) + v.shape[1:], generator=g) * 1000
        elif v.is_floating_point():
            out[k] = torch.randn((2,) + v.shape[1:], generator=g, dtype=v.dtype)
        else:
            out[k] = torch.cat([v, v])
    return out


def _reference(graph, inputs, force=None):
    """PyTorch, one sample at a time (the captured graph has batch 1): blocks act per sample."""
    router = getattr(graph.gm, "router", None)
    outs = []
    for s in range(2):
        if router is not None:
            router.force_gates = None if force is None else force[s]
        one = {k: v[s:s + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with torch.no_grad():
            outs.append(graph(**one, return_dict=False)[0])
    if router is not None:
        router.force_gates = None
    return torch.cat(outs)


def _router_gates(graph, inputs):
    """The gates the torch router picks per sample (batch 2, one sample at a time)."""
    router = graph.gm.router
    router.clear_history()
    _reference(graph, inputs)
    gates = torch.cat([rec["gates"] for rec in router.history]).numpy()
    router.clear_history()
    return gates


@pytest.fixture(scope="module")
def routed_wan(tmp_path_factory):
    """Tiny Wan (2 blocks) routed at budget 0.6, the router's output layer randomized so that the
    gates differ between samples; exported in both layouts."""
    graph = capture(build_model("wan"))
    PassManager([Route(budget=0.6)]).run(graph)
    with torch.no_grad():
        torch.manual_seed(0)
        graph.gm.router.net[2].weight.normal_(0, 3.0)
    root = tmp_path_factory.mktemp("onnx")
    single = export_onnx(graph, root / "single", layout="single")
    segmented = export_onnx(graph, root / "segmented", layout="segmented")
    return graph, single, segmented


def test_files_are_valid_onnx_and_pass_the_tensorrt_check(routed_wan):
    import onnx

    graph, single, segmented = routed_wan
    onnx.checker.check_model(str(single))
    model = onnx.load(str(single))
    assert sum(n.op_type == "If" for n in model.graph.node) == 2          # one If per routed block
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    assert check_onnx(single).ok, check_onnx(single).render()
    manifest = SegmentedManifest.load(segmented)
    manifest.verify_onnx()
    assert [s.kind for s in manifest.segments] == ["prologue", "block", "block", "epilogue"]
    assert manifest.gates == "gates" and manifest.n_routed == 2
    assert manifest.config["num_layers"] == graph.config["num_layers"]
    for report in check_segmented(manifest):
        assert report.ok, report.render()


@pytest.mark.parametrize("force", ["all", "none", "mixed"])
def test_segmented_forced_gates_match_pytorch(routed_wan, force):
    graph, _, segmented = routed_wan
    masks = {"all": np.ones((2, 2), bool), "none": np.zeros((2, 2), bool),
             "mixed": np.array([[True, False], [False, True]])}
    mask = masks[force]
    model = load_onnx(segmented)
    model.force_gates = mask
    inputs = _batch2(graph, seed=3)
    got = model(**inputs, return_dict=False)[0]
    assert rel_error(got, _reference(graph, inputs, torch.from_numpy(mask))) < TOL
    record = model.records[-1]
    assert record.executed == tuple(j for j in range(2) if mask[:, j].any())


@pytest.mark.parametrize("layout", ["single", "segmented"])
def test_router_decided_gates_match_pytorch(routed_wan, layout):
    """Over a few random batches the router's decisions include blocks run by both samples, by
    one of them, and by none: each If / per-sample select path is compared with PyTorch."""
    graph, single, segmented = routed_wan
    model = load_onnx(single if layout == "single" else segmented)
    seen = set()
    for seed in range(6):
        inputs = _batch2(graph, seed)
        got = model(**inputs, return_dict=False)[0]
        assert rel_error(got, _reference(graph, inputs)) < TOL
        gates = _router_gates(graph, inputs)
        np.testing.assert_array_equal(model.records[-1].gates, gates)
        seen |= {int(c.sum()) for c in gates.T}
    assert seen == {0, 1, 2}, f"router decisions did not cover all-off/mixed/all-on columns: {seen}"


def test_segmented_hunyuan_video_routed_matches_pytorch(tmp_path):
    """HunyuanVideo: double-stream blocks carry video and text tokens, its last single-stream block
    writes only the video tokens (the text stream passes through its segment), and a bool attention
    mask is built with a bool Where (rewritten to uint8 for onnxruntime)."""
    graph = capture(build_model("hunyuan-video"))
    PassManager([Route(budget=0.6)]).run(graph)
    path = export_onnx(graph, tmp_path / "hunyuan", layout="segmented")
    manifest = SegmentedManifest.load(path)
    assert manifest.stream == ("stream_0", "stream_1") and manifest.n_routed == 4
    for report in check_segmented(manifest):
        assert report.ok, report.render()
    model = load_onnx(path)
    inputs = _batch2(graph, seed=3)
    mask = np.array([[True, False, True, False], [False, True, False, True]])
    for force in (mask, None):
        model.force_gates = force
        expected = _reference(graph, inputs, None if force is None else torch.from_numpy(force))
        assert rel_error(model(**inputs, return_dict=False)[0], expected) < TOL


def test_segmented_ltx_video_routed_matches_pytorch(tmp_path):
    """LTX-Video: its rotary coordinates are scaled in place (copy_ into slices, a write nothing
    reads), which the prologue must replay; non-tensor inputs (num_frames, ...) are baked in and
    recorded in the manifest."""
    graph = capture(build_model("ltx-video"))
    PassManager([Route(budget=0.6)]).run(graph)
    path = export_onnx(graph, tmp_path / "ltx", layout="segmented")
    manifest = SegmentedManifest.load(path)
    assert manifest.fixed_inputs["num_frames"] == graph.example_inputs["num_frames"]
    model = load_onnx(path)
    inputs = _batch2(graph, seed=5)
    for force in (np.array([[True, False], [False, True]]), None):
        model.force_gates = force
        expected = _reference(graph, inputs, None if force is None else torch.from_numpy(force))
        assert rel_error(model(**inputs, return_dict=False)[0], expected) < TOL
    with pytest.raises(GraphoptError, match="exported for num_frames"):
        model(**{**inputs, "num_frames": inputs["num_frames"] + 1})


def test_single_file_ltx_plain_matches_pytorch(tmp_path):
    """LTX-Video (packed tokens, bool text mask, non-tensor size inputs) unrouted, single file."""
    graph = capture(build_model("ltx-video"))
    model = load_onnx(export_onnx(graph, tmp_path / "ltx", layout="single"))
    inputs = _batch2(graph, seed=5)
    assert rel_error(model(**inputs, return_dict=False)[0], _reference(graph, inputs)) < TOL
    assert model.records[-1].executed == (0, 1)
    with pytest.raises(GraphoptError, match="exported for num_frames"):
        model(**{**inputs, "num_frames": 7})


def test_bad_requests_are_refused(routed_wan, tmp_path):
    graph, _, _ = routed_wan
    with pytest.raises(GraphoptError, match="layout"):
        export_onnx(graph, tmp_path / "x", layout="pieces")
    with pytest.raises(GraphoptError, match="dynamic batch"):
        export_onnx(graph, tmp_path / "x", layout="segmented", dynamic=False)
    meta = capture(build_model("wan", device="meta"))
    with pytest.raises(GraphoptError, match="meta"):
        export_onnx(meta, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(GraphoptError, match="neither"):
        load_onnx(tmp_path)


@pytest.mark.slow
def test_cli_export_trt_on_compressed_teacher(tmp_path, capsys):
    """compress tiny-wan with prune,route; `export --format trt` writes the segmented ONNX, checks it
    for TensorRT, and (TensorRT absent) says what to install, exit 0; the ONNX matches PyTorch."""
    from graphopt.cli import main
    from graphopt.serialize import load

    assert main(["compress", "tiny-wan", "--passes", "prune,route", "--prune-ratio", "0.25",
                 "--route-budget", "0.6", "-o", str(tmp_path / "c")]) == 0
    assert main(["export", str(tmp_path / "c"), "-o", str(tmp_path / "trt"), "--format", "trt"]) == 0
    out = capsys.readouterr().out
    assert "static TensorRT check" in out and "without TensorRT): no errors in" in out
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "pip install tensorrt" in out
    graph = load(tmp_path / "c")
    model = load_onnx(tmp_path / "trt")
    assert model.manifest.n_routed == 8
    inputs = _batch2(graph, seed=7)
    assert rel_error(model(**inputs, return_dict=False)[0], _reference(graph, inputs)) < TOL
    model.force_gates = "all"
    assert rel_error(model(**inputs, return_dict=False)[0],
                     _reference(graph, inputs, torch.ones(2, 8, dtype=torch.bool))) < TOL
    assert model.records[-1].executed == tuple(range(8))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["single", "segmented"])
def test_shipped_teacher_routed_both_layouts(tmp_path, layout):
    graph = capture("tiny-wan")
    PassManager([Route(budget=0.5)]).run(graph)
    model = load_onnx(export_onnx(graph, tmp_path / layout, layout=layout))
    for seed in range(2):
        inputs = _batch2(graph, seed)
        assert rel_error(model(**inputs, return_dict=False)[0], _reference(graph, inputs)) < TOL
    executed = sum(len(r.executed) for r in model.records) / len(model.records)
    assert executed < 8


def test_a_read_before_an_in_place_write_is_refused():
    """A segment replays a write where it computes the tensor; a reader of the tensor before the
    write would then see the written value, so such a graph is refused with a clear error."""
    from graphopt.exporters.segments import _inplace_writes

    class ReadThenWrite(torch.nn.Module):
        def forward(self, x):
            t = x * 1.0
            before = t.sum()
            t[:, 0].copy_(x[:, 1])
            return t * before

    gm = torch.export.export(ReadThenWrite(), (torch.randn(2, 3),), strict=False).module()
    with pytest.raises(GraphoptError, match="reads 'mul' before the in-place write 'copy_'"):
        _inplace_writes(gm)
