"""route: gates on = the original; gates off = the stream unchanged, per sample; budget; export."""
import dataclasses

import pytest
import torch
from torch import fx

from conftest import PRUNE_FAMILIES, random_inputs
from graphopt import GraphoptError, PassManager, capture, model_cost, rel_error
from graphopt.families import FAMILIES, build_model
from graphopt.blocks import skip_blocks
from graphopt.passes.route import Route
from graphopt.router import cond_block, gate_stream


def _capture(family, batch, dynamic=False):
    spec = dataclasses.replace(FAMILIES[family].default_spec, batch=batch)
    return capture(build_model(family), spec=spec, dynamic_batch=dynamic)


@pytest.fixture(scope="module")
def routed():
    """(original, routed) tiny graphs at batch 2, per family; copy the routed one before editing."""
    cache = {}

    def get(family):
        if family not in cache:
            g = _capture(family, 2)
            r = g.copy()
            PassManager([Route(budget=0.6)], verify=True).run(r)
            cache[family] = g, r
        return cache[family]

    return get


def _samples(inputs, s):
    """Sample s of a batch of inputs, alone (batch 1)."""
    return {k: v[s:s + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in inputs.items()}


class _Record(fx.Interpreter):
    """Runs the routed module and keeps (gates, position, rows, block_out, stream_in, result) of
    every gate_stream node."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is gate_stream:
            gates, p, rows, block_out, stream_in = self.fetch_args_kwargs_from_env(n)[0]
            self.seen.append((p, rows, block_out, stream_in, out))
        return out


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_all_gates_on_equals_original(family, routed):
    g, r = routed(family)
    assert sum(n.target is cond_block for n in r.gm.graph.nodes) == len(g.blocks)
    assert not r.blocks                          # every block now lives in a conditional branch
    r = r.copy()
    r.gm.router.force_gates = True
    inputs = random_inputs(g)
    with torch.no_grad():
        assert rel_error(r(**inputs)[0], g(**inputs)[0]) < 1e-6


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_gate_off_leaves_that_samples_stream_unchanged(family, routed):
    g, r = routed(family)
    r = r.copy()
    n = len(g.blocks)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, n - 1] = False                       # sample 0 skips the last block, sample 1 runs it
    r.gm.router.force_gates = mask
    recorder = _Record(r.gm)
    recorder.seen = []
    with torch.no_grad():
        recorder.run(*r.flat_inputs(random_inputs(g)))
    last = [s for s in recorder.seen if s[0] == n - 1]
    assert last
    for _, rows, block_out, stream_in, result in last:
        assert torch.equal(result[:rows], stream_in[:rows])
        assert torch.equal(result[rows:], block_out[rows:])
        assert rel_error(block_out[:rows], stream_in[:rows]) > 1e-3     # the block does change it


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_mixed_batch_gives_each_sample_its_own_result(family, routed, tiny_graphs):
    g, r = routed(family)
    r = r.copy()
    n = len(g.blocks)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, n - 1] = False
    r.gm.router.force_gates = mask
    # The same model captured at batch 1, routed by replaying the recipe, same router weights.
    alone = r.recipe.copy()
    alone.steps = alone.steps[-1:]
    single = alone.replay(tiny_graphs(family).copy())
    single.gm.router.load_state_dict(r.gm.router.state_dict())
    inputs = random_inputs(g, seed=2)
    with torch.no_grad():
        batch_out = r(**inputs)[0]
        for s in range(2):
            single.gm.router.force_gates = mask[s]
            expected = single(**_samples(inputs, s))[0]
            assert rel_error(batch_out[s:s + 1], expected) < 1e-5
        # and what skipping those blocks in the original model gives
        assert rel_error(batch_out[:1], skip_blocks(g, [0])(**inputs)[0][:1]) < 1e-5
        assert rel_error(batch_out[1:], skip_blocks(g, [n - 1])(**inputs)[0][1:]) < 1e-5


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_routed_graph_exports(family, routed):
    g, r = routed(family)
    r = r.copy()
    mask = torch.zeros(2, len(g.blocks), dtype=torch.bool)
    mask[0, ::2] = True
    r.gm.router.force_gates = mask
    inputs = random_inputs(g, seed=3)
    ep = torch.export.export(r.gm, (), inputs, strict=False)
    conds = [n for n in ep.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == len(g.blocks)
    with torch.no_grad():
        assert rel_error(ep.module()(**inputs)[0], r(**inputs)[0]) < 1e-6


def test_dynamic_batch_routes_and_exports():
    # Latte's dynamic-batch graph reads symbolic sizes inside its blocks (batch × frames).
    g = _capture("latte", 2, dynamic=True)
    r = g.copy()
    Route(budget=0.7).run(r)
    spec3 = dataclasses.replace(FAMILIES["latte"].default_spec, batch=3)
    inputs = FAMILIES["latte"].example_inputs(g.config, spec3)
    mask = torch.tensor([[True, False, True, True], [True] * 4, [False, True, False, True]])
    with torch.no_grad():
        r.gm.router.force_gates = True
        assert rel_error(r(**inputs)[0], g(**inputs)[0]) < 1e-6
        r.gm.router.force_gates = mask
        assert rel_error(r(**inputs)[0][2:], skip_blocks(g, [0, 2])(**inputs)[0][2:]) < 1e-5
        r.gm.router.force_gates = None               # the router decides, in the export too
        routed_out = r(**inputs)[0]
    batch = torch.export.Dim("batch", min=1, max=64)
    dims = {k: {0: batch} if isinstance(v, torch.Tensor) and v.dim() else None
            for k, v in g.example_inputs.items()}
    ep = torch.export.export(r.gm, (), g.example_inputs, strict=False, dynamic_shapes=dims)
    with torch.no_grad():
        assert rel_error(ep.module()(**inputs)[0], routed_out) < 1e-6


def test_inference_gates_respect_the_budget(routed):
    g, r = routed("hunyuan-video")      # double and single blocks: unequal block costs
    r = r.copy()
    router = r.gm.router
    router.clear_history()
    inputs = random_inputs(g)
    budgets = (0.3, 0.5, 0.75, 1.0)
    with torch.no_grad():
        for budget in budgets:
            router.budget = budget
            for t in (50.0, 500.0, 950.0):
                r(**{**inputs, "timestep": torch.tensor([t, 1000.0 - t])})
    steps = router.step_flops()
    assert len(steps) == 3 * len(budgets)
    for k, step in enumerate(steps):
        assert max(step["sample_fractions"]) <= budgets[k // 3] + 1e-6
    assert all(s["fraction"] == 1.0 and s["blocks_run"] == len(g.blocks) for s in steps[-3:])
    assert steps[-1]["executed_flops"] == model_cost(g).flops
    assert any(s["blocks_run"] < len(g.blocks) for s in steps[:3])


def test_router_init_is_the_static_policy(tiny_graphs):
    g = tiny_graphs("hunyuan-video")
    r = g.copy()
    [result] = PassManager([Route(budget=0.7, init_policy="importance")], verify=True).run(r)
    ranking = result.decisions["ranking"]
    cost = model_cost(g)
    room = 0.7 * cost.flops - (cost.flops - sum(b["flops"] for b in cost.blocks))
    kept, spent = [], 0
    for j in ranking:
        if spent + cost.blocks[j]["flops"] > room:
            break
        kept.append(j)
        spent += cost.blocks[j]["flops"]
    assert 0 < len(kept) < len(g.blocks)
    skipped = [j for j in range(len(g.blocks)) if j not in kept]
    inputs = random_inputs(g)
    with torch.no_grad():
        assert rel_error(r(**inputs)[0], skip_blocks(g, skipped)(**inputs)[0]) < 1e-6
    assert r.gm.router.history[-1]["gates"][0].tolist() == [j in kept for j in range(len(g.blocks))]


def test_schedule_mode_reads_only_the_timestep(tiny_graphs):
    g = tiny_graphs("wan")
    r = g.copy()
    Route(mode="schedule", budget=0.6, timestep_bins=4).run(r)
    router = r.gm.router
    [call] = [n for n in r.gm.graph.nodes if n.op == "call_module" and n.target == "router"]
    assert [a.name for a in call.args] == ["timestep", "hidden_states"]
    table = router.schedule()
    assert table.shape == (4, len(g.blocks)) and table.dtype == torch.bool
    with torch.no_grad():
        for seed in (1, 2):
            for t in (100.0, 900.0):
                r(**{**random_inputs(g, seed), "timestep": torch.tensor([t])})
    history = router.history
    for a, b in zip(history[:2], history[2:]):        # other content, same timesteps
        assert torch.equal(a["gates"], b["gates"])
    assert history[0]["gates"][0].tolist() == table[0].tolist()     # t = 100 → bin 0
    assert history[1]["gates"][0].tolist() == table[3].tolist()     # t = 900 → bin 3


def test_training_gates_are_straight_through(tiny_graphs):
    g = tiny_graphs("latte")
    r = g.copy()
    Route(budget=0.6).run(r)
    router = r.gm.router
    r.gm.train()
    torch.manual_seed(0)
    out = r(**random_inputs(g))[0]
    assert router.gate_probs.shape == (1, 4) and router.exec_fraction.shape == (1,)
    loss = out.square().mean() + (router.exec_fraction.mean() - 0.3) ** 2
    loss.backward()
    grad = router.net[2].bias.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    r.gm.eval()
    before = len(router.history)
    with torch.no_grad():
        r(**random_inputs(g))
    assert len(router.history) == before + 1     # eval calls are recorded, training calls not


def test_route_decisions_replay_and_plot(tiny_graphs, tmp_path):
    g = tiny_graphs("ltx-video")
    r = g.copy()
    Route(budget=0.8, hidden=32).run(r)
    step = r.recipe.steps[-1]
    assert step["pass"] == "route"
    for key in ("blocks", "names", "mode", "hidden", "budget", "init_policy", "ranking"):
        assert key in step["decisions"]
    assert "router.net.0.weight" in dict(r.gm.named_parameters())
    with torch.no_grad():
        for p in r.gm.router.parameters():
            p.add_(torch.randn_like(p) * 0.1)      # "trained" weights, saved with the model
    again = r.recipe.copy()
    again.steps = again.steps[-1:]
    fresh = again.replay(tiny_graphs("ltx-video").copy())
    fresh.gm.router.load_state_dict(r.gm.router.state_dict())
    inputs = random_inputs(g, seed=4)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs)[0], r(**inputs)[0])
    r.gm.router.plot_decisions(tmp_path / "gates.png", step["decisions"]["names"])
    assert (tmp_path / "gates.png").read_bytes()[:4] == b"\x89PNG"


def test_route_rejects_bad_requests(tiny_graphs, routed):
    with pytest.raises(GraphoptError, match="mode"):
        Route(mode="random")
    with pytest.raises(GraphoptError, match="budget"):
        Route(budget=1.5)
    g = tiny_graphs("wan")
    with pytest.raises(GraphoptError, match="always runs"):
        Route(budget=0.5, blocks=(0,)).decide(g)
    _, r = routed("wan")
    with pytest.raises(GraphoptError, match="already routed"):
        Route().decide(r)
    with pytest.raises(GraphoptError, match="force_gates"):
        r.copy().gm.router.force_gates = torch.ones(3)


def test_route_refuses_data_dependent_blocks_untouched(tiny_graphs):
    g = tiny_graphs("mochi").copy()      # its blocks pick text tokens with nonzero()
    nodes = len(g.gm.graph.nodes)
    with pytest.raises(GraphoptError, match="data-dependent size"):
        Route(budget=0.9).run(g)
    assert len(g.gm.graph.nodes) == nodes and not hasattr(g.gm, "router")
