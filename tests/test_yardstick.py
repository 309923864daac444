"""The yardstick of tools/bench_quality.py: executed FLOPs (what ran, not the cost model), the
aggregate mini-VBench score, the Pareto front and plot, and diffusers' caches driven by the sampler."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_inputs

from graphopt import GraphoptError
from graphopt.compress import compress
from graphopt.eval import AGGREGATE_METRICS, aggregate_score
from graphopt.yardstick import count_flops, pareto_front, plot_pareto


@pytest.fixture(scope="module")
def teacher():
    """(captured tiny-wan graph, its GeneratorConfig, one calibration CFG pair)."""
    from graphopt.tiny.testbed import calibration_inputs, capture_teacher

    graph, config = capture_teacher()
    return graph, config, calibration_inputs(config)[1]


def _count(model, feed) -> int:
    with torch.no_grad():
        return count_flops(lambda: model(**feed))[1]


def test_count_flops_counts_matmuls_and_cpu_attention():
    b, h, s, d = 2, 3, 40, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    out, flops = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert out.shape == (b, h, s, d)
    assert flops == 2 * (2 * b * h * s * s * d)            # QKᵀ and AV, 2 FLOPs per multiply-add
    lin = torch.nn.Linear(16, 32)
    assert count_flops(lambda: lin(torch.randn(5, 16)))[1] == 2 * 5 * 16 * 32


def test_half_the_blocks_dropped_counts_about_half(teacher):
    graph, _, feed = teacher
    full = _count(graph, feed)
    counts = {}
    for removed in ([0, 1], [0, 1, 2, 3]):
        dropped = graph.copy()
        compress(dropped, ["drop"], {"drop": {"removed": removed}})
        counts[len(removed)] = _count(dropped, feed)
    block = (full - counts[2]) / 2                          # the 8 blocks are alike in FLOPs
    assert full - counts[4] == pytest.approx(4 * block, rel=1e-9)
    assert 0.45 < counts[4] / full < 0.55                   # blocks are nearly all of the work


def test_routed_graph_counts_only_the_branches_that_ran(tiny_graphs):
    """graphopt.router.cond_block runs the taken branch eagerly, so the counter sees exactly the
    routed blocks that executed; torch's counter would charge a real torch.cond its larger branch."""
    graph = tiny_graphs("wan")
    feed = random_inputs(graph)
    routed = graph.copy()
    compress(routed, ["route"], {"route": {"budget": 0.6}})
    router = routed.gm.router
    assert router.n_blocks == 2
    counts = {}
    for mask in ((False, False), (True, False), (False, True), (True, True)):
        router.force_gates = torch.tensor(mask)
        counts[mask] = _count(routed, feed)
    none, first, second, both = counts.values()
    assert none < first < both and first == second and both - none == 2 * (first - none)
    assert both == pytest.approx(_count(graph, feed), rel=1e-3)     # + the router's own small MLP
    router.force_gates = None                                  # the router decides, at its budget
    with router.recording():
        decided = _count(routed, feed)
        ran = int(router.history[-1]["run"].sum())
    assert ran == 1
    assert 0 < decided - first < 0.1 * (first - none)          # one block, plus the router's small MLP


def test_aggregate_score():
    teacher = {m: 0.8 for m in AGGREGATE_METRICS}
    assert aggregate_score(teacher, teacher) == pytest.approx(1.0)
    worse = dict(teacher, shape_accuracy=0.4)
    assert aggregate_score(worse, teacher) == pytest.approx(1 - 0.5 / len(AGGREGATE_METRICS))
    better = dict(worse, colour_accuracy=1.0)                # beating the teacher is capped at 1
    assert aggregate_score(better, teacher) == pytest.approx(aggregate_score(worse, teacher))
    unmeasured = dict(teacher, direction_adherence=math.nan)
    assert aggregate_score(unmeasured, teacher) == pytest.approx(1 - 1 / len(AGGREGATE_METRICS))
    with pytest.raises(GraphoptError, match="motion_smoothness is 0"):
        aggregate_score(teacher, dict(teacher, motion_smoothness=0.0))


def test_pareto_front_and_plot(tmp_path):
    points = [(1.0, 1.0), (0.5, 0.9), (0.6, 0.8), (0.4, 0.9), (0.3, 0.5), (0.5, 0.95)]
    assert pareto_front(points) == [4, 3, 5, 0]
    rows = [{"name": f"r{i}", "family": fam, "flops": f, "aggregate": s, "psnr_db": 100.0 if i == 0 else 20 + 10 * s}
            for i, ((f, s), fam) in enumerate(zip(points, ["teacher", "a", "a", "b", "b", "c"]))]
    plot_pareto(rows, tmp_path / "p" / "pareto.png", title="test")
    assert (tmp_path / "p" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["pareto.png"]      # no temporary left behind


# ---- diffusers' caches ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eager():
    """(the eager diffusers teacher, its config, 1 held-out condition)."""
    from graphopt.tiny import load_tiny_teacher
    from graphopt.tiny.testbed import eval_conditions

    model, config = load_tiny_teacher()
    return model, config, eval_conditions(config, 1)


STEPS = 4


def _sample(model, config, data):
    from graphopt.tiny.testbed import sample_clips

    return count_flops(lambda: sample_clips(model, config, data, steps=STEPS))


def test_first_block_cache_skips_work_and_leaves_no_hooks(eager):
    from diffusers import FirstBlockCacheConfig

    from graphopt.diffusers_caches import CachedTransformer

    model, config, data = eager
    plain, plain_flops = _sample(model, config, data)
    cached = CachedTransformer(model, FirstBlockCacheConfig(threshold=10.0), steps=STEPS)   # skip whenever it can
    for _ in range(2):                                       # a fresh cache each time: no state carried over
        with cached:
            clips, flops = _sample(cached, config, data)
        assert cached.calls == STEPS and not model.is_cache_enabled
        # step 0 computes everything; later steps only the first block (+ embeddings and head)
        assert 0.25 * plain_flops < flops < 0.5 * plain_flops
        assert np.abs(clips - plain).max() > 1e-3
    again, again_flops = _sample(model, config, data)        # disabled: the plain model again
    assert again_flops == plain_flops and np.array_equal(again, plain)


def test_cache_timestep_callback_and_misuse(eager):
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
    from diffusers import FlowMatchEulerDiscreteScheduler

    from graphopt.diffusers_caches import CachedTransformer

    model, config, data = eager
    seen = []
    pab = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)
    cached = CachedTransformer(model, pab, steps=STEPS)
    callback = cached.config.current_timestep_callback
    cached.config.current_timestep_callback = lambda: seen.append(callback()) or seen[-1]
    with cached:
        _sample(cached, config, data)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(STEPS)
    assert sorted(set(seen), reverse=True) == pytest.approx([float(t) for t in scheduler.timesteps])
    assert pab.current_timestep_callback is None             # the caller's config is not modified

    fbc = CachedTransformer(model, FirstBlockCacheConfig(), steps=STEPS)
    with pytest.raises(GraphoptError, match="inside `with cached:`"):
        fbc(hidden_states=None, timestep=torch.zeros(1))
    with fbc, pytest.raises(GraphoptError, match="already has a cache enabled"):
        with CachedTransformer(model, FirstBlockCacheConfig(), steps=STEPS):
            pass
    assert not model.is_cache_enabled
    with pytest.raises(GraphoptError, match="no enable_cache"):
        CachedTransformer(torch.nn.Linear(2, 2), FirstBlockCacheConfig())


def test_mag_cache_calibration_then_skipping(eager):
    from diffusers import MagCacheConfig

    from graphopt.diffusers_caches import CachedTransformer, calibrate_mag_cache

    model, config, data = eager
    plain, plain_flops = _sample(model, config, data)
    ratios = calibrate_mag_cache(model, lambda m: _sample(m, config, data), STEPS)
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.3 < r < 2.0 for r in ratios[1:])
    assert not model.is_cache_enabled
    mag = MagCacheConfig(threshold=1.0, retention_ratio=0.0, num_inference_steps=STEPS, mag_ratios=ratios)
    with CachedTransformer(model, mag) as cached:
        _, flops = _sample(cached, config, data)
    assert flops < 0.75 * plain_flops                        # at least one of the 4 steps skipped its blocks
    with pytest.raises(GraphoptError, match="called the transformer 4 times"):
        calibrate_mag_cache(model, lambda m: _sample(m, config, data), 3)


# ---- tools/bench_quality.py ---------------------------------------------------------------------

def _bench_quality():
    """The script as a module (tools/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    if "bench_quality" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "tools" / "bench_quality.py"
        spec = importlib.util.spec_from_file_location("bench_quality", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_quality"] = module             # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_quality"]


@pytest.mark.parametrize("argv, message", [
    (["--rows", "caches,nope"], "unknown row group(s) nope: choose from caches, prune, drop, route"),
    (["--distill-rows", "drop,caches"], "--distill-rows caches: only prune, drop, route rows are distilled"),
    (["--combo-static", "1"], "--combo-static in (0, 1)")])
def test_bench_quality_rejects_bad_row_options(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _bench_quality().main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_quality_end_to_end(tmp_path):
    import json

    bench = _bench_quality()
    out = tmp_path / "out"
    bench.main(["--rows", "caches,drop", "--clips", "1", "--steps", "3", "--distill-steps", "0", "--targets", "0.5",
                "--repeats", "1", "--out", str(out), "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "teacher" and "MagCache 0.4" in names and "drop hierarchical @0.5" in names
    teacher = rows[0]
    assert teacher["flops"] == 1.0 and teacher["aggregate"] == 1.0 and teacher["latency"] == 1.0
    for row in rows:
        assert {"name", "group", "family", "flops", "executed_flops", "aggregate"} <= set(row)
        assert all(key in row for key, _, _ in bench.METRICS)          # every metric of the table
        assert 0 < row["flops"] <= 1.0 + 1e-9 and 0 <= row["aggregate"] <= 1
    by_name = {r["name"]: r for r in rows}
    assert by_name["diffusers teacher, no cache"]["flops"] == 1.0
    assert by_name["drop hierarchical @0.5"]["flops"] < 0.7 and "latency" in by_name["drop hierarchical @0.5"]
    assert "latency" not in by_name["MagCache 0.4"]
    for name in ("bench_quality.md", "bench_quality.png", "pareto.png"):
        assert (out / name).stat().st_size > 0
