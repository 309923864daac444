"""cache pass: equals diffusers' own FirstBlockCache and MagCache hooks, step by step; route with
skip="reuse": gates on = the original, a gate off = input + the residual of the last run."""
import copy

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig
from torch import fx

from graphopt import GraphoptError, capture, compress, rel_error
from graphopt.families import build_model
from graphopt.passes.route import Route
from graphopt.reuse import cache_context, lift_state, reset_cache, slots
from graphopt.router import gate_stream

STEPS = 10
RATIOS = [1.0] + [0.95 + 0.01 * i for i in range(STEPS - 1)]
# Thresholds at which each tiny random model both skips and computes over the run below.
FIRST_BLOCK = {"wan": 0.1, "hunyuan-video": 0.5, "ltx-video": 0.08}
MAG = {"wan": 0.1, "hunyuan-video": 0.1, "ltx-video": 0.2}


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            model = build_model(family).eval()
            cache[family] = model, capture(model)
        return cache[family]

    return get


def _conditions(graph, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(graph.example_inputs)
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and k != graph.timestep_input:
            inputs[k] = torch.randn(v.shape, generator=gen, dtype=v.dtype)
    return inputs


def _run(model, graph, inputs, steps=STEPS, start=999.0):
    """One sampling-like run (x ← x − 0.02·v at falling timesteps); the outputs of every step."""
    x, outs = inputs[graph.latent_input], []
    for t in torch.linspace(start, 50.0, steps):
        timestep = torch.full_like(inputs[graph.timestep_input], float(t))
        out = model(**{**inputs, graph.latent_input: x, graph.timestep_input: timestep,
                       "return_dict": False})[0]
        outs.append(out)
        x = x - 0.02 * out
    return outs


class _Counted:
    """Counts the calls of a graph's conditional run branch."""

    def __init__(self, module):
        self.calls, self._forward = 0, module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._forward(*args, **kwargs)


def _diffusers_run(model, config, inputs, graph):
    ref = copy.deepcopy(model)
    ref.enable_cache(config)
    with torch.no_grad(), ref.cache_context("cond"):
        return _run(ref, graph, inputs)


@pytest.mark.parametrize("family", list(FIRST_BLOCK))
def test_first_block_cache_equals_diffusers_hook(family, models):
    model, graph = models(family)
    threshold = FIRST_BLOCK[family]
    cached = graph.copy()
    compress(cached, ["cache"], {"cache": {"method": "first-block", "threshold": threshold}},
             verify=True)
    tail = _Counted(cached.gm.cache_run)
    inputs = _conditions(graph)
    with torch.no_grad():
        ours = _run(cached, graph, inputs)
    theirs = _diffusers_run(model, FirstBlockCacheConfig(threshold=threshold), inputs, graph)
    assert 1 < tail.calls < STEPS                       # it really skips, and not always
    for a, b in zip(ours, theirs):
        assert rel_error(a, b) < 1e-5


@pytest.mark.parametrize("family", list(MAG))
def test_mag_cache_equals_diffusers_hook(family, models):
    model, graph = models(family)
    options = {"method": "mag", "threshold": MAG[family], "num_inference_steps": STEPS,
               "mag_ratios": RATIOS}
    cached = graph.copy()
    compress(cached, ["cache"], {"cache": options}, verify=True)
    blocks = _Counted(cached.gm.cache_run)
    inputs = _conditions(graph)
    with torch.no_grad():
        ours = _run(cached, graph, inputs)
        again = _run(cached, graph, inputs)             # its step counter restarts after STEPS
    config = MagCacheConfig(threshold=MAG[family], num_inference_steps=STEPS, mag_ratios=RATIOS)
    theirs = _diffusers_run(model, config, inputs, graph)
    assert 1 < blocks.calls < 2 * STEPS and blocks.calls % 2 == 0
    for a, b, c in zip(ours, theirs, again):
        assert rel_error(a, b) < 1e-5
        assert torch.equal(a, c)


def test_mag_cache_calibrates_its_own_ratios(models):
    _, graph = models("wan")
    cached = graph.copy()
    compress(cached, ["cache"], {"cache": {"method": "mag", "threshold": 0.2,
                                           "num_inference_steps": 6}})
    ratios = cached.recipe.steps[-1]["decisions"]["mag_ratios"]
    assert len(ratios) == 6 and ratios[0] == 1.0
    assert all(0.2 < r < 5.0 for r in ratios) and len(set(ratios)) > 2


def test_a_new_run_starts_with_empty_caches(models):
    _, graph = models("wan")
    cached = graph.copy()
    compress(cached, ["cache"], {"cache": {"method": "first-block", "threshold": 10.0}})
    tail = _Counted(cached.gm.cache_run)
    inputs = _conditions(graph, seed=3)
    with torch.no_grad():
        first = _run(cached, graph, inputs, steps=3)
        assert tail.calls == 1                          # threshold 10: only the first step runs
        second = _run(cached, graph, inputs, steps=3)   # the timestep rose: a new run
        assert tail.calls == 2
        assert torch.equal(first[0], second[0])
        assert rel_error(first[0], graph(**{**inputs, graph.timestep_input:
                                            torch.full_like(inputs[graph.timestep_input],
                                                            999.0)})[0]) < 1e-6
        _run(cached, graph, inputs, steps=1, start=40.0)    # a falling timestep: no new run
        assert tail.calls == 2
        reset_cache(cached)
        _run(cached, graph, inputs, steps=1, start=10.0)
        assert tail.calls == 3


def test_cache_contexts_keep_separate_states(models):
    _, graph = models("wan")
    cached = graph.copy()
    compress(cached, ["cache"], {"cache": {"method": "first-block", "threshold": 10.0}})
    tail = _Counted(cached.gm.cache_run)
    inputs = _conditions(graph, seed=4)
    with torch.no_grad():
        for t in (900.0, 800.0):
            for name in ("cond", "uncond"):            # CFG as two calls at the same timestep
                with cache_context(cached, name):
                    cached(**{**inputs, graph.timestep_input:
                              torch.full_like(inputs[graph.timestep_input], t)})
    assert tail.calls == 2                              # each context computed once, then reused


def test_cache_refuses_bad_requests(models):
    with pytest.raises(GraphoptError, match="method"):
        compress(models("wan")[1].copy(), ["cache"], {"cache": {"method": "tea"}})
    with pytest.raises(GraphoptError, match="num_inference_steps"):
        compress(models("wan")[1].copy(), ["cache"], {"cache": {"method": "mag"}})
    cached = models("wan")[1].copy()
    compress(cached, ["cache"], {"cache": {"threshold": 0.1}})
    with pytest.raises(GraphoptError, match="already has conditional"):
        compress(cached, ["cache"], {"cache": {"threshold": 0.1}})
    latte = capture(build_model("latte"))   # spatial/temporal blocks reshape the stream between
    with pytest.raises(GraphoptError, match="outside the blocks"):
        compress(latte, ["cache"], {"cache": {"threshold": 0.1}})


# ---- route(skip="reuse") -----------------------------------------------------------------------
class _Streams(fx.Interpreter):
    """Records every value of the listed node names (original graph) or every gate_stream result
    whose fallback is a stream + cached residual (routed graph), per call."""

    def __init__(self, gm, names=()):
        super().__init__(gm)
        self.names, self.seen = set(names), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.seen[n.name] = out
        return out


@pytest.mark.parametrize("family", ["wan", "hunyuan-video", "latte"])
def test_reuse_routing_gate_off_gives_input_plus_last_residual(family, models):
    _, graph = models(family)
    routed = graph.copy()
    Route(budget=0.6, skip="reuse").run(routed)
    n = len(graph.blocks)
    router = routed.gm.router
    inputs = _conditions(graph, seed=5)
    t_name, x_name = graph.timestep_input, graph.latent_input
    last = graph.blocks[-1]
    step1 = {**inputs, t_name: torch.full_like(inputs[t_name], 900.0)}
    step2 = {**inputs, t_name: torch.full_like(inputs[t_name], 800.0),
             x_name: inputs[x_name] * 0.9 + 0.1}
    with torch.no_grad():
        router.force_gates = True
        assert rel_error(routed(**step1)[0], graph(**step1)[0]) < 1e-6   # all on = the original
        gates = torch.ones(n, dtype=torch.bool)
        gates[n - 1] = False
        router.force_gates = gates
        out = routed(**step2)[0]
        # The oracle: the original model, block n-1's output replaced by input + last residual.
        seen = {}
        for step in (step1, step2):
            rec = _Streams(graph.gm, last.stream_in + last.stream_out)
            rec.run(*graph.flat_inputs(step))
            seen[step[t_name].flatten()[0].item()] = rec.seen
        s1, s2 = seen[900.0], seen[800.0]
        replaced = {o: s2[i] + (s1[o] - s1[i]) for i, o in zip(last.stream_in, last.stream_out)}

        class Replace(fx.Interpreter):
            def run_node(self, node):
                return replaced[node.name] if node.name in replaced else super().run_node(node)

        expected = Replace(graph.gm).run(*graph.flat_inputs(step2))[0]
        assert rel_error(out, expected) < 1e-6
        assert rel_error(out, graph(**step2)[0]) > 1e-4      # and reuse did change something


@pytest.mark.parametrize("family", ["wan", "hunyuan-video", "latte"])
def test_forecast_routing_gate_off_extrapolates_the_last_two_residuals(family, models):
    """skip="forecast": a block skipped at step 3 gives back input + r₂ + (r₂ − r₁)·(t₃ − t₂)/(t₂ − t₁),
    its last two computed residuals extrapolated on the timestep clock; the oracle edits the original
    model's graph by hand."""
    _, graph = models(family)
    routed = graph.copy()
    Route(budget=0.6, skip="forecast").run(routed)
    n, router = len(graph.blocks), routed.gm.router
    inputs = _conditions(graph, seed=9)
    t_name, x_name = graph.timestep_input, graph.latent_input
    times = (900.0, 800.0, 650.0)
    steps = [{**inputs, t_name: torch.full_like(inputs[t_name], t), x_name: inputs[x_name] * (1 - 0.1 * i) + 0.1 * i}
             for i, t in enumerate(times)]
    last = graph.blocks[-1]
    with torch.no_grad():
        router.force_gates = True
        reset_cache(routed)
        for step in steps[:2]:
            assert rel_error(routed(**step)[0], graph(**step)[0]) < 1e-6      # all on = the original
        gates = torch.ones(n, dtype=torch.bool)
        gates[n - 1] = False
        router.force_gates = gates
        out = routed(**steps[2])[0]
        seen = []
        for step in steps:
            rec = _Streams(graph.gm, last.stream_in + last.stream_out)
            rec.run(*graph.flat_inputs(step))
            seen.append(rec.seen)
        (s1, s2, s3), (t1, t2, t3) = seen, times

    def original_with(block_out):
        """The original model at step 3, the last block's outputs replaced by `block_out(in, out)`."""
        replaced = {o: block_out(i, o) for i, o in zip(last.stream_in, last.stream_out)}

        class Replace(fx.Interpreter):
            def run_node(self, node):
                return replaced[node.name] if node.name in replaced else super().run_node(node)

        with torch.no_grad():
            return Replace(graph.gm).run(*graph.flat_inputs(steps[2]))[0]

    def forecast(i, o):
        r1, r2 = s1[o] - s1[i], s2[o] - s2[i]
        return s3[i] + r2 + (r2 - r1) * (t3 - t2) / (t2 - t1)

    assert rel_error(out, original_with(forecast)) < 1e-5
    assert rel_error(out, original_with(lambda i, o: s3[i] + s2[o] - s2[i])) > 1e-4   # not plain reuse


def test_forecast_slope_is_finite_for_a_sample_whose_timestep_did_not_move():
    """A run goes on while the batch's mean timestep falls, so one sample's own timestep may stand
    still between two computations: its slope is 0 (plain reuse next), not inf/NaN."""
    import dataclasses

    from graphopt.families import FAMILIES

    spec = dataclasses.replace(FAMILIES["wan"].default_spec, batch=2)
    graph = capture(build_model("wan").eval(), spec=spec)
    routed = graph.copy()
    Route(budget=0.6, skip="forecast").run(routed)
    router, n = routed.gm.router, len(graph.blocks)
    inputs = _conditions(graph, seed=10)
    t = graph.timestep_input
    with torch.no_grad():
        router.force_gates = True
        for times in ([900.0, 900.0], [900.0, 700.0]):
            routed(**{**inputs, t: torch.tensor(times)})
        router.force_gates = torch.zeros(n, dtype=torch.bool)
        out = routed(**{**inputs, t: torch.tensor([800.0, 600.0])})[0]
    assert torch.isfinite(out).all()
    slots = routed.gm.reuse_state.state()["slots"]
    assert all(torch.isfinite(v).all() for v in slots.values())


def test_reuse_routing_exactly_adds_the_cached_residual(models):
    _, graph = models("wan")
    routed = graph.copy()
    Route(budget=0.6, skip="reuse").run(routed)
    router = routed.gm.router
    inputs = _conditions(graph, seed=6)
    t = graph.timestep_input

    class Gates(fx.Interpreter):
        """(block_out, stream_in, result) of every gate_stream call: per block, the stream
        (out vs stream + cached) and then the cache update (out − stream vs cached)."""

        def run_node(self, node):
            out = super().run_node(node)
            if node.op == "call_function" and node.target is gate_stream:
                self.seen.append((self.env[node.args[3]], self.env[node.args[4]], out))
            return out

    def run(step, force):
        router.force_gates = force
        rec = Gates(routed.gm)
        rec.seen = []
        rec.run(*routed.flat_inputs({**inputs, t: torch.full_like(inputs[t], step)}))
        return rec.seen

    with torch.no_grad():
        before = run(900.0, True)
        after = run(800.0, torch.tensor([True, False]))     # block 1 skipped at step 2
    residual_step1 = before[3][0]                        # block 1's out − stream_in at step 1
    assert rel_error(residual_step1, torch.zeros_like(residual_step1) + 1) > 0
    assert torch.equal(after[3][1], residual_step1)     # step 2 read exactly that residual
    assert torch.equal(after[3][2], residual_step1)     # and keeps it
    assert torch.equal(after[2][2], after[2][1])        # the block gave back stream + residual
    assert not torch.equal(after[2][1], after[2][0])    # (not what running it would give)


def test_reuse_state_lifts_to_inputs_and_outputs(models):
    _, graph = models("hunyuan-video")
    routed = graph.copy()
    Route(budget=0.6, skip="reuse").run(routed)
    keys = slots(routed.gm)
    assert len(keys) == sum(len(b.stream_in) for b in graph.blocks)
    lifted, lifted_keys = lift_state(routed.gm)
    assert lifted_keys == keys
    names = [n.name for n in lifted.graph.nodes if n.op == "placeholder"]
    assert names[-len(keys) - 1:] == ["cache_valid"] + [f"cache_{k}" for k in keys]
    inputs = _conditions(graph, seed=7)
    t = graph.timestep_input
    with torch.no_grad():
        reset_cache(routed)
        eager = [routed(**{**inputs, t: torch.full_like(inputs[t], s)})[0] for s in (900., 800.)]
        state = [torch.zeros_like(v) for v in _slot_likes(routed, inputs)]
        valid = torch.tensor(False)
        for s, want in zip((900., 800.), eager):
            out = lifted(**{**inputs, t: torch.full_like(inputs[t], s), "cache_valid": valid},
                         **{f"cache_{k}": v for k, v in zip(keys, state)})
            state, valid = list(out[len(out) - len(keys):]), torch.tensor(True)
            assert torch.equal(out[0], want)


def _slot_likes(routed, inputs):
    """Tensors shaped like each slot, read off one eager call."""
    from graphopt.reuse import STATE_MODULE

    reset_cache(routed)
    routed(**inputs)
    state = getattr(routed.gm, STATE_MODULE)._state()["slots"]
    reset_cache(routed)
    return [state[k] for k in slots(routed.gm)]


def test_reuse_schedule_search_and_its_router_agree(models):
    from graphopt.distill.reuse_schedule import _Run, fit_reuse_schedule

    _, graph = models("wan")
    routed = graph.copy()
    Route(mode="schedule", skip="reuse", select="sign", budget=1.0, timestep_bins=1000).run(routed)
    cond = _conditions(graph, seed=8)["encoder_hidden_states"][:1]
    shape = tuple(graph.example_inputs[graph.latent_input].shape[1:])
    fit = fit_reuse_schedule(routed, graph, cond, video_shape=shape, target=0.6, steps=4,
                             groups=2, guidance=1.0)    # batch 1: the capture's
    path = fit["path"]
    assert path[0]["error"] < 1e-12                    # every block computing = the teacher
    assert all(a["fraction"] > b["fraction"] for a, b in zip(path, path[1:]))
    assert fit["fraction"] <= 0.6 + 1e-3 and fit["computes"][0].all()
    # The router, deciding by itself from its table, makes the searched decisions.
    run = _Run(routed, cond, 4, 1.0, 1.0)
    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    reset_cache(routed)
    with torch.no_grad(), routed.gm.router.recording() as history:
        for s in range(4):
            x = run.step(x, s)
    assert torch.equal(torch.stack([h["gates"][0] for h in history]), fit["computes"])


@pytest.mark.slow
@pytest.mark.parametrize("family, method, layout", [
    *((f, m, "single") for f in FIRST_BLOCK for m in ("first-block", "mag")),
    ("hunyuan-video", "first-block", "segmented"),      # two streams, one ends inside the cache
    ("ltx-video", "mag", "segmented")])
def test_exported_cache_equals_diffusers_hook_in_onnxruntime(family, method, layout, models,
                                                             tmp_path):
    """The oracle again, through export: onnxruntime running the exported cache-passed model
    gives diffusers' hook outputs step by step (the state threaded as ONNX inputs/outputs, or
    kept by the segmented runtime)."""
    pytest.importorskip("onnxruntime")
    from graphopt.exporters.onnx import export_onnx, load_onnx

    model, graph = models(family)
    if method == "first-block":
        options = {"method": method, "threshold": FIRST_BLOCK[family]}
        config = FirstBlockCacheConfig(threshold=FIRST_BLOCK[family])
    else:
        options = {"method": method, "threshold": MAG[family], "num_inference_steps": STEPS,
                   "mag_ratios": RATIOS}
        config = MagCacheConfig(threshold=MAG[family], num_inference_steps=STEPS,
                                mag_ratios=RATIOS)
    cached = graph.copy()
    compress(cached, ["cache"], {"cache": options})
    exported = load_onnx(export_onnx(cached, tmp_path / "onnx", layout=layout))
    inputs = _conditions(graph)
    ours = [torch.as_tensor(o) for o in _run(exported, graph, inputs)]
    theirs = _diffusers_run(model, config, inputs, graph)
    for a, b in zip(ours, theirs):
        assert rel_error(a, b) < 1e-5
