"""The reuse-schedule search (graphopt.distill.reuse_schedule): a target is met within one block's
share of the run (not one unit's), one search serves several targets, the lazy greedy's schedule
is the full greedy's, and bad targets raise."""
import pytest
import torch

from graphopt import GraphoptError, capture
from graphopt.distill.reuse_schedule import _fraction, reuse_schedule_search
from graphopt.families import build_model
from graphopt.passes.route import Route

STEPS = 4


@pytest.fixture(scope="module")
def setup():
    graph = capture(build_model("wan").eval())
    routed = graph.copy()
    Route(mode="schedule", skip="reuse", select="sign", budget=1.0, timestep_bins=1000).run(routed)
    gen = torch.Generator().manual_seed(8)
    cond_shape = graph.example_inputs["encoder_hidden_states"].shape[1:]
    cond = torch.randn((1, *cond_shape), generator=gen)
    shape = tuple(graph.example_inputs[graph.latent_input].shape[1:])
    search = {"video_shape": shape, "steps": STEPS, "guidance": 1.0}     # batch 1: the capture's
    return graph, routed, cond, search


def test_targets_are_met_within_one_block_not_one_unit(setup):
    graph, routed, cond, search = setup
    router = routed.gm.router
    block_share = float(router.cost.max()) / STEPS
    targets = [0.7, 0.45]                        # each inside a unit of the coarse path
    found = reuse_schedule_search(routed, graph, cond, targets=targets, groups=1, last_computes=0, **search)
    coarse = [p["fraction"] for p in found["path"]]
    assert coarse[0] - coarse[1] > 1.5 * block_share   # groups=1: a unit is a step's 2 blocks
    for target, point in zip(targets, found["points"]):
        assert target - block_share - 1e-9 <= point["fraction"] <= target
        assert point["fraction"] == pytest.approx(_fraction(router, point["computes"]))
        assert point["computes"][0].all()        # the first step computes: nothing is cached yet
        # The coarse path alone lands more than a block's share below the target.
        assert target - next(f for f in coarse if f <= target) > block_share
    assert router.force_gates is None            # the routed graph is left as it was


def test_lazy_greedy_picks_the_full_greedys_schedule_with_fewer_calls(setup):
    graph, routed, cond, search = setup
    lazy = reuse_schedule_search(routed, graph, cond, targets=[0.5], lazy=True, last_computes=0, **search)
    full = reuse_schedule_search(routed, graph, cond, targets=[0.5], lazy=False, last_computes=0, **search)
    assert lazy["model_calls"] < full["model_calls"]
    assert torch.equal(lazy["points"][0]["computes"], full["points"][0]["computes"])


def test_the_last_step_computes_and_a_target_below_the_floor_raises(setup):
    graph, routed, cond, search = setup
    found = reuse_schedule_search(routed, graph, cond, targets=[0.6], last_computes=1, **search)
    assert found["points"][0]["computes"][[0, STEPS - 1]].all()
    assert all(p["computes"][STEPS - 1].all() for p in found["path"])
    with pytest.raises(GraphoptError, match="below what reuse reaches"):         # 2 of 4 steps compute
        reuse_schedule_search(routed, graph, cond, targets=[0.3], last_computes=1, **search)


def test_max_reuse_bounds_the_steps_a_residual_is_reused_in_a_row(setup):
    graph, routed, cond, search = setup
    free = reuse_schedule_search(routed, graph, cond, targets=[0.3], **search)
    runs = lambda c: max(len(r) for b in range(c.shape[1])          # noqa: E731
                         for r in "".join("R" if not x else " " for x in c[:, b].tolist()).split())
    assert runs(free["points"][0]["computes"]) > 1                # unbounded: the search reuses in a row
    bounded = reuse_schedule_search(routed, graph, cond, targets=[0.6], max_reuse=1, **search)
    assert runs(bounded["points"][0]["computes"]) == 1
    with pytest.raises(GraphoptError, match="below what reuse reaches"):         # 0, 2 compute: ≥ 0.5
        reuse_schedule_search(routed, graph, cond, targets=[0.3], max_reuse=1, **search)


@pytest.mark.parametrize("targets", [[1.0], [0.0], []])
def test_bad_targets_raise(setup, targets):
    graph, routed, cond, search = setup
    with pytest.raises(GraphoptError, match="targets"):
        reuse_schedule_search(routed, graph, cond, targets=targets, **search)


@pytest.fixture(scope="module")
def two_clips():
    """Batch 2 (two conditions, no CFG), so the per-clip dB objective differs from pooled MSE."""
    import dataclasses

    from graphopt.families import FAMILIES

    spec = dataclasses.replace(FAMILIES["wan"].default_spec, batch=2)
    graph = capture(build_model("wan").eval(), spec=spec)
    routed = graph.copy()
    Route(mode="schedule", skip="forecast", select="sign", budget=1.0, timestep_bins=1000).run(routed)
    cond = torch.randn((2, *graph.example_inputs["encoder_hidden_states"].shape[1:]),
                       generator=torch.Generator().manual_seed(9))
    shape = tuple(graph.example_inputs[graph.latent_input].shape[1:])
    return graph, routed, cond, {"video_shape": shape, "steps": STEPS, "guidance": 1.0}


@pytest.mark.parametrize("objective, target, max_reuse", [("mse", 0.6, None), ("db", 0.6, None),
                                                          ("db", 0.45, None)])
def test_timetable_strategy_picks_the_best_whole_step_timetable_then_refines(two_clips, objective, target,
                                                                             max_reuse):
    """The oracle: every whole-step timetable run from scratch, one plain sampling loop each.
    Target 0.6: 1 of steps 1-3 skipped (0.75; 2 skipped: 0.52). Target 0.45: 2 skipped, then
    refined (step 0 computes, so only the third free step's blocks may go)."""
    import itertools

    from graphopt.distill.reuse_schedule import _Run
    from graphopt.reuse import reset_cache

    graph, routed, cond, search = two_clips
    router, n = routed.gm.router, len(graph.blocks)
    found = reuse_schedule_search(routed, graph, cond, targets=[target], strategy="timetable",
                                  objective=objective, max_reuse=max_reuse, **search)
    noise = torch.randn((2, *search["video_shape"]), generator=torch.Generator().manual_seed(0))

    def final(model, computes=None):
        run, x = _Run(model, cond, STEPS, 1.0, 1.0), noise
        reset_cache(routed)
        for s in range(STEPS):
            if computes is not None:
                router.force_gates = computes[s]
            x = run.step(x, s)
        router.force_gates = None
        return x.clamp(-1, 1)

    skipped = 1 if target == 0.6 else 2
    with torch.no_grad():
        reference = final(graph)
        scores = {}
        for reused in itertools.combinations(range(1, STEPS), skipped):
            computes = torch.tensor([[s not in reused] * n for s in range(STEPS)])
            d = (final(routed, computes) - reference).square().flatten(1).mean(1)
            scores[reused] = float(d.mean() if objective == "mse" else (10 * d.log10()).mean())
    best = min(scores, key=scores.get)
    point = found["points"][0]
    assert torch.equal(point["timetable"], torch.tensor([[s not in best] * n for s in range(STEPS)]))
    assert point["timetable_error"] == pytest.approx(scores[best], rel=1e-4)
    block_share = float(router.cost.max()) / STEPS
    assert target - block_share - 1e-9 <= point["fraction"] <= target
    assert not (point["computes"] & ~point["timetable"]).any()      # refining only turns blocks off
    assert point["computes"][0].all()


def test_the_db_objective_refuses_a_temporal_weight(setup):
    graph, routed, cond, search = setup
    with pytest.raises(GraphoptError, match="temporal_weight"):
        reuse_schedule_search(routed, graph, cond, targets=[0.6], objective="db", temporal_weight=0.1, **search)


def test_timetable_strategy_keeps_max_reuse_or_says_the_target_is_out_of_reach(two_clips):
    """Two of steps 1-3 skipped, never two in a row, leaves only steps 1 and 3 (0.52 of the run); a
    block more at step 2 would reuse three steps in a row, so 0.45 cannot be reached."""
    graph, routed, cond, search = two_clips
    with pytest.raises(GraphoptError, match="at most 1 reuse"):
        reuse_schedule_search(routed, graph, cond, targets=[0.45], strategy="timetable", max_reuse=1, **search)


def test_timetable_targets_with_the_same_skipped_steps_share_one_tree(setup):
    graph, routed, cond, search = setup
    alone = [reuse_schedule_search(routed, graph, cond, targets=[t], strategy="timetable", **search)
             for t in (0.7, 0.6)]                 # both: 1 of steps 1-3 skipped, then refined
    both = reuse_schedule_search(routed, graph, cond, targets=[0.7, 0.6], strategy="timetable", **search)
    assert both["model_calls"] < sum(a["model_calls"] for a in alone)
    for a, point in zip(alone, both["points"]):
        assert torch.equal(a["points"][0]["computes"], point["computes"])
