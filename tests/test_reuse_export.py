"""Reuse survives export: single-file and segmented ONNX of a cache-passed and a reuse-routed model
equal the eager graph over a whole sampling run in which blocks really are skipped."""
import dataclasses

import pytest
import torch

from graphopt import capture, compress, rel_error
from graphopt.families import FAMILIES, build_model
from graphopt.reuse import cache_context, reset_cache

pytest.importorskip("onnxruntime")


def _compare(model_eager, model_onnx, graph, counted):
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=gen) if isinstance(v, torch.Tensor)
              and v.is_floating_point() and k != graph.timestep_input else v
              for k, v in graph.example_inputs.items() if k != "return_dict"}
    x_eager = inputs[graph.latent_input].clone()
    x_onnx = x_eager.clone()
    errors = []
    for t in torch.linspace(999.0, 50.0, 10):
        step = {**inputs, graph.timestep_input: torch.full_like(inputs[graph.timestep_input], float(t))}
        with torch.no_grad():
            a = model_eager(**{**step, graph.latent_input: x_eager}, return_dict=False)[0]
        b = torch.as_tensor(model_onnx(**{**step, graph.latent_input: x_onnx}, return_dict=False)[0])
        errors.append(rel_error(b, a))
        x_eager, x_onnx = x_eager - 0.02 * a, x_onnx - 0.02 * b
    assert 1 < counted() < 10                     # blocks were really skipped, not at every step
    assert max(errors) < 1e-5


@pytest.fixture(scope="module")
def wan():
    return capture(build_model("wan").eval())


def _export(graph, tmp_path, layout="single"):
    from graphopt.exporters.onnx import export_onnx, load_onnx

    return load_onnx(export_onnx(graph, tmp_path / "onnx", layout=layout))


def test_cache_pass_single_file_onnx_equals_eager_over_a_run(wan, tmp_path):
    cached = wan.copy()
    compress(cached, ["cache"], {"cache": {"method": "first-block", "threshold": 0.1}})
    onnx_model = _export(cached, tmp_path)
    runs = []
    forward = cached.gm.cache_run.forward
    cached.gm.cache_run.forward = lambda *a: runs.append(1) or forward(*a)
    _compare(cached, onnx_model, wan, lambda: len(runs))
    reset_cache(onnx_model)                          # a new run from the same start: same result
    assert onnx_model.reuse.state()["slots"] == {}


@pytest.mark.parametrize("skip", ["reuse", "forecast"])
def test_reuse_routed_single_file_onnx_equals_eager_over_a_run(wan, tmp_path, skip):
    routed = wan.copy()
    compress(routed, ["route"], {"route": {"budget": 0.6, "skip": skip}})
    onnx_model = _export(routed, tmp_path)
    router = routed.gm.router
    with router.recording() as history:
        _compare(routed, onnx_model, wan,
                 lambda: sum(not bool(h["run"].all()) for h in history))   # steps with a reuse
    skipped = [r.skipped for r in onnx_model.records]
    assert any(skipped) and not skipped[0]           # the first step computes every block


def test_cache_pass_segmented_onnx_equals_eager_over_a_run(wan, tmp_path):
    cached = wan.copy()
    compress(cached, ["cache"], {"cache": {"method": "first-block", "threshold": 0.1}})
    onnx_model = _export(cached, tmp_path, layout="segmented")
    cached_blocks = onnx_model.manifest.blocks[-1]
    assert cached_blocks.reuse["cache"]["method"] == "first-block"
    _compare(cached, onnx_model, wan, lambda: sum(cached_blocks.block in r.executed
                                                  for r in onnx_model.records))
    # The caches live in the runtime, one state per context; a reset empties them.
    assert onnx_model.reuse.state()["slots"]
    reset_cache(onnx_model)
    assert onnx_model.reuse.state()["slots"] == {}


@pytest.mark.parametrize("skip", ["reuse", "forecast"])
def test_reuse_routed_segmented_onnx_equals_eager_per_sample_and_per_context(tmp_path, skip):
    """Batch 2 with gates that differ per sample (a skipped sample gets stream + its own cached
    residual, or it extrapolated, the other the block's output), CFG as two calls with their own
    cache states."""
    spec = dataclasses.replace(FAMILIES["wan"].default_spec, batch=2)
    graph = capture(build_model("wan"), spec=spec, dynamic_batch=True)
    compress(graph, ["route"], {"route": {"budget": 0.6, "skip": skip}})
    onnx_model = _export(graph, tmp_path, layout="segmented")
    assert all(b.reuse["slots"] for b in onnx_model.manifest.blocks)
    assert all(("forecast" in b.reuse) == (skip == "forecast") for b in onnx_model.manifest.blocks)
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(v.shape, generator=gen) if k != graph.timestep_input else v
              for k, v in graph.example_inputs.items() if isinstance(v, torch.Tensor)}
    x_eager, x_onnx = inputs[graph.latent_input].clone(), inputs[graph.latent_input].clone()
    errors = []
    for i, t in enumerate(torch.linspace(999.0, 50.0, 10)):
        on = torch.ones(2, 2, dtype=torch.bool)
        mask = on if i == 0 else torch.tensor([[True, False], [False, True]]) ^ bool(i % 2)
        if i in (4, 5):             # block 1 skipped by the whole batch, twice in a row
            mask = torch.tensor([[True, False], [True, False]])
        graph.gm.router.force_gates = onnx_model.force_gates = mask
        step = {**inputs, graph.timestep_input: torch.full((2,), float(t))}
        for context in ("cond", "uncond"):
            with torch.no_grad(), cache_context(graph, context), onnx_model.cache_context(context):
                a = graph(**{**step, graph.latent_input: x_eager}, return_dict=False)[0]
                b = onnx_model(**{**step, graph.latent_input: x_onnx}, return_dict=False)[0]
            errors.append(rel_error(b, a))
        x_eager, x_onnx = x_eager - 0.05 * a, x_onnx - 0.05 * b
    assert max(errors) < 1e-5
    assert set(onnx_model.reuse.contexts) == {"cond", "uncond"}
    assert [r.skipped for r in onnx_model.records][:2] == [(), ()]


@pytest.mark.slow
def test_mag_cache_segmented_onnx_equals_eager_over_a_run(wan, tmp_path):
    cached = wan.copy()
    compress(cached, ["cache"], {"cache": {"method": "mag", "threshold": 0.3,
                                           "num_inference_steps": 10}})
    onnx_model = _export(cached, tmp_path, layout="segmented")
    cached_blocks = onnx_model.manifest.blocks[-1]
    assert cached_blocks.reuse["cache"]["method"] == "mag"
    _compare(cached, onnx_model, wan, lambda: sum(cached_blocks.block in r.executed
                                                  for r in onnx_model.records))


@pytest.mark.slow
@pytest.mark.parametrize("passes", [{"cache": {"method": "first-block", "threshold": 0.1}},
                                    {"route": {"budget": 0.6, "skip": "reuse"}},
                                    {"route": {"budget": 0.6, "skip": "forecast"}}],
                         ids=["cache", "route-reuse", "route-forecast"])
def test_reuse_aoti_package_equals_eager_over_a_run(wan, tmp_path, passes):
    """AOTInductor: the lifted state threaded by the loaded package, as in single-file ONNX; its
    records say which blocks computed at each step."""
    from graphopt.exporters.aoti import export_aoti, load_aoti

    model = wan.copy()
    compress(model, list(passes), passes)
    package = load_aoti(export_aoti(model, tmp_path / "model.pt2"))
    assert package.state["slots"]
    _compare(model, package, wan, lambda: sum(bool(r.skipped) for r in package.records))
    reset_cache(package)
    assert package.reuse.state()["slots"] == {}
