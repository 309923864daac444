"""AOTInductor export: the loaded package computes what the PyTorch module computes.

Routed blocks are torch.conds compiled into the package; gates are forced (baked into the package
with the router's settings) so both branches of the conditional are exercised. Compiling on a
CPU takes ~20 s for the 2-block tiny Wan and ~1 min for the 8-block teacher (slow).
"""
import pytest
import torch

from conftest import random_inputs
from graphopt import GraphoptError, capture, compress, rel_error
from graphopt.dropin import GraphTransformer
from graphopt.exporters.aoti import export_aoti, load_aoti
from graphopt.families import build_model
from graphopt.layout import InputSpec
from graphopt.passes.route import Route


def _tensors(graph, seed=1):
    inputs = random_inputs(graph, seed)
    inputs[graph.family.timestep_input] = torch.tensor([637.0])
    return {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _check(graph, tmp_path):
    model = load_aoti(export_aoti(graph, tmp_path / "model.pt2"))
    reference = GraphTransformer(graph)
    inputs = _tensors(graph)
    out = model(**inputs, return_dict=False)[0]
    expected = reference(**inputs, return_dict=False)[0]
    assert out.shape == expected.shape
    assert rel_error(out, expected) < 1e-4
    assert model.records[-1].executed == reference.records[-1].executed
    return model


def test_routed_package_equals_pytorch(tmp_path):
    graph = capture(build_model("wan"))
    Route(budget=0.6).run(graph)
    graph.gm.router.force_gates = torch.tensor([True, False])     # block 0 runs, block 1 is skipped
    model = _check(graph, tmp_path)
    assert model.records[-1].executed == (0,) and model.records[-1].skipped == (1,)
    assert model.router["force_gates"] == [[True, False]]
    assert model.config["patch_size"] == [1, 2, 2] and model.dtype == torch.float32
    out = model(**_tensors(graph, seed=2)).sample                  # return_dict=True: diffusers output
    assert out.shape == graph.example_inputs["hidden_states"].shape
    wrong = {**_tensors(graph), "hidden_states": torch.randn(1, 4, 5, 8, 12)}
    with pytest.raises(GraphoptError, match="re-export for this resolution"):
        model(**wrong)


def test_later_block_runs_after_a_skipped_one(tmp_path):
    # Every cond's predicate is a view of the router's one `run` tensor; Inductor's C++ wrapper
    # read them all as block 0's (torch 2.13), so block 1 was skipped too (rel. error ~0.16).
    graph = capture(build_model("wan"))
    Route(budget=0.6).run(graph)
    graph.gm.router.force_gates = torch.tensor([False, True])     # block 0 skipped, block 1 runs
    model = _check(graph, tmp_path)
    assert model.records[-1].executed == (1,) and model.records[-1].skipped == (0,)


def test_dynamic_batch_package_runs_at_another_batch(tmp_path):
    # torch.export specialized a dynamic-batch capture to its example batch while the package's
    # specs declared the batch dynamic: at batch 3 the tiny teacher's reuse schedule sampled
    # garbage (PSNR 5 dB vs eager) without an error.
    graph = capture(build_model("wan"), spec=InputSpec(batch=2), dynamic_batch=True)
    compress(graph, ["route"], {"route": {"budget": 1.0, "skip": "reuse"}})
    model = load_aoti(export_aoti(graph, tmp_path / "model.pt2"))
    reference = GraphTransformer(graph)
    example = _tensors(graph)
    captured = example["hidden_states"].shape[0]
    batch = captured + 1
    inputs = {k: torch.cat([v, v[:1]]) if v.dim() and v.shape[0] == captured else v
              for k, v in _tensors(graph, seed=3).items()}
    inputs = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() and k != "timestep" else v
              for k, v in inputs.items()}
    for step, t in enumerate((900.0, 500.0)):              # the second call reuses the first's slots
        feed = {**inputs, "timestep": torch.full((batch,), t)}
        out = model(**feed, return_dict=False)[0]
        expected = reference(**feed, return_dict=False)[0]
        assert out.shape[0] == batch
        assert rel_error(out, expected) < 1e-4, f"call {step}"


def test_bad_input_is_refused(tmp_path):
    graph = capture(build_model("wan", device="meta"))
    with pytest.raises(GraphoptError, match="no weights"):
        export_aoti(graph, tmp_path / "model.pt2")
    with pytest.raises(GraphoptError, match=r"\.pt2 file"):
        export_aoti(graph, tmp_path / "model.so")
    with pytest.raises(GraphoptError, match="not found"):
        load_aoti(tmp_path / "missing.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not a package")
    with pytest.raises(GraphoptError, match="cannot load AOTInductor package"):
        load_aoti(tmp_path / "junk.pt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt2"]


@pytest.mark.slow
@pytest.mark.parametrize("gates", ["all-on", "mixed"])
def test_routed_tiny_teacher_package_equals_pytorch(gates, tmp_path):
    graph = capture("tiny-wan")
    compress(graph, ["prune", "route"], {"prune": {"ratio": 0.25}, "route": {"budget": 0.6}})
    n = graph.gm.router.n_blocks
    graph.gm.router.force_gates = True if gates == "all-on" else torch.arange(n) % 3 != 1
    model = _check(graph, tmp_path)
    expected_run = n if gates == "all-on" else int((torch.arange(n) % 3 != 1).sum())
    assert len(model.records[-1].executed) == expected_run


@pytest.mark.slow
def test_export_cli_writes_a_package(tmp_path):
    from graphopt.cli import main

    assert main(["export", "tiny:wan", "--format", "aoti", "-o", str(tmp_path / "out")]) == 0
    model = load_aoti(tmp_path / "out" / "model.pt2")
    graph = capture(build_model("wan"))
    inputs = _tensors(graph)
    assert rel_error(model(**inputs).sample, GraphTransformer(graph)(**inputs).sample) < 1e-4


def test_force_gates_export_alike_to_aoti_and_onnx(tmp_path):
    """One rule for both exporters (graphopt.router.for_export): a set force_gates is baked in."""
    from graphopt.exporters.onnx import export_onnx, load_onnx

    graph = capture(build_model("wan"))
    Route(budget=1.0).run(graph)                         # the router alone runs every block
    inputs = _tensors(graph)
    decided = GraphTransformer(graph)(**inputs, return_dict=False)[0]
    graph.gm.router.force_gates = torch.tensor([False, True])
    expected = GraphTransformer(graph)(**inputs, return_dict=False)[0]
    assert rel_error(expected, decided) > 1e-3           # forcing changes the output
    aoti = load_aoti(export_aoti(graph, tmp_path / "model.pt2"))
    onnx = load_onnx(export_onnx(graph, tmp_path / "onnx", layout="single"))
    for model in (aoti, onnx):
        assert rel_error(model(**inputs, return_dict=False)[0], expected) < 1e-4
        assert model.records[-1].executed == (1,) and model.records[-1].skipped == (0,)
    # One row per sample cannot be baked into an export of another (or a symbolic) batch.
    graph.gm.router.force_gates = torch.tensor([[False, True], [True, True]])
    for export in (lambda: export_aoti(graph, tmp_path / "two.pt2"),
                   lambda: export_onnx(graph, tmp_path / "two", layout="single")):
        with pytest.raises(GraphoptError, match="force_gates has 2 rows"):
            export()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "onnx"]
