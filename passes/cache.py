"""cache: diffusers' training-free step caches, compiled into the graph.

`method="first-block"` (FirstBlockCache, ParaAttention's FBCache): the first block always runs.
Its residual r₀ = out₀ − in₀ (the video stream) is compared with r₀ at the last step that ran
everything: d = mean|r₀ − r₀'| / mean|r₀'|. If d > threshold (or the caches are empty) the other
blocks run and their residual R = out_last − out₀ (per stream) is cached; else the output is
out₀ + R from that step.

`method="mag"` (MagCache): every block is skipped or none. A fixed per-step magnitude ratio γᵢ (how
the model's residual norm changes from step i−1 to i) is accumulated after the first
⌊retention_ratio · steps + ½⌋ steps: ρ ← ρ·γᵢ, k ← k + 1, e ← e + |1 − ρ|; the step reuses the
cached residual (out = in + R) while e ≤ threshold and k ≤ max_skip_steps, else it computes and
(ρ, k, e) restart. The state restarts after `num_inference_steps` calls, as diffusers' does. The
ratios are the config's (`mag_ratios`, e.g. from diffusers' `MagCacheConfig(calibrate=True)`), or
graphopt measures them itself (`calibrate_mag_ratios`) over one Euler sampling run of the
calibration inputs' conditions (flow matching, `calibration_shift`).

Graph shape after the pass: the decision is a 0-dim bool computed in the graph (`first_block_
decision`, `mag_decision`), one `torch.cond` (ONNX `If`) carries all the blocks it may skip, and
the residuals are cache slots of `gm.reuse_state` (graphopt/reuse.py: eager state per cache
context, lifted to inputs/outputs on export).

Promise (checked by `ensures`, and against diffusers' own hooks in tests/test_cache.py): the first
call of a run equals the original model. Deliberate differences from diffusers' hooks: a new
sampling run (the timestep does not fall, or the shapes change) empties the caches by itself,
where diffusers' hooks keep the last run's state until they are reset; the FirstBlockCache
threshold is compared in float64 exactly as diffusers' `.item() > threshold` is.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from graphopt import reuse
from graphopt.errors import GraphoptError
from graphopt.outline import LABEL, check_outlinable, outline, replace_outputs, stable_toposort
from graphopt.pass_manager import Pass, register, rel_error

aten = torch.ops.aten
METHODS = ("first-block", "mag")


@dataclass
class CacheOptions:
    method: str = "first-block"
    threshold: float = 0.05             # diffusers' FirstBlockCacheConfig default
    max_skip_steps: int = 3             # mag: at most this many steps in a row reuse
    retention_ratio: float = 0.2        # mag: the first share of the steps always computes
    num_inference_steps: int | None = None      # mag: steps per sampling run (required)
    mag_ratios: tuple[float, ...] | None = None  # mag: None = graphopt calibrates them
    calibration_shift: float = 1.0      # mag calibration: flow-matching timestep shift

    def __post_init__(self):
        if self.method not in METHODS:
            raise GraphoptError(f"cache method '{self.method}' unknown; choose one of {METHODS}")
        if not self.threshold >= 0:
            raise GraphoptError(f"cache threshold must be >= 0, got {self.threshold}")
        if self.method != "mag":
            return
        if self.num_inference_steps is None or int(self.num_inference_steps) < 1:
            raise GraphoptError("cache method 'mag' needs num_inference_steps (the sampling "
                                "run's step count), e.g. --option cache.num_inference_steps=10")
        self.num_inference_steps = int(self.num_inference_steps)
        if int(self.max_skip_steps) < 0 or self.max_skip_steps != int(self.max_skip_steps):
            raise GraphoptError(f"cache max_skip_steps must be a whole number >= 0, got "
                                f"{self.max_skip_steps}")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise GraphoptError(f"cache retention_ratio must be in [0, 1], got "
                                f"{self.retention_ratio}")
        if self.mag_ratios is not None:
            self.mag_ratios = tuple(float(r) for r in self.mag_ratios)
            if not self.mag_ratios:
                raise GraphoptError("cache mag_ratios is empty")


@register
class Cache(Pass):
    name = "cache"
    Options = CacheOptions

    def decide(self, graph) -> dict:
        o = self.options
        if any(n.meta.get(LABEL) for n in graph.gm.graph.nodes):
            raise GraphoptError("this graph already has conditional blocks (route or cache): "
                                "cache the original model's blocks, once")
        if len(graph.blocks) < (2 if o.method == "first-block" else 1):
            raise GraphoptError(f"cache method '{o.method}' needs at least "
                                f"{2 if o.method == 'first-block' else 1} blocks; the model has "
                                f"{len(graph.blocks)}")
        decisions = {"method": o.method, "threshold": o.threshold,
                     "names": [b.name for b in graph.blocks]}
        if o.method == "mag":
            ratios = o.mag_ratios
            if ratios is None:
                if graph.is_meta:
                    raise GraphoptError("calibrating MagCache runs the model, and this graph is on "
                                        "the meta device: give cache.mag_ratios, or replay a "
                                        "recipe computed where the weights are")
                ratios = calibrate_mag_ratios(graph, o.num_inference_steps, o.calibration_shift)
            decisions.update(max_skip_steps=int(o.max_skip_steps),
                             retention_ratio=o.retention_ratio,
                             num_inference_steps=o.num_inference_steps,
                             mag_ratios=[float(r) for r in _resampled(ratios,
                                                                      o.num_inference_steps)])
        return decisions

    def apply(self, graph, decisions: dict) -> None:
        names = [b.name for b in graph.blocks]
        if names != list(decisions["names"]):
            raise GraphoptError(f"recipe caches blocks {decisions['names']}; this model has "
                                f"{names}: the recipe was made for another architecture or "
                                f"config")
        cache_blocks(graph, decisions)

    def summarize(self, graph, decisions) -> dict:
        return {"method": decisions["method"], "threshold": decisions["threshold"]}

    def describe(self, decisions: dict) -> list[str]:
        if decisions["method"] == "first-block":
            return [f"- FirstBlockCache: {decisions['names'][0]} always runs; the other "
                    f"{len(decisions['names']) - 1} blocks reuse their residual while the first "
                    f"block's changed by at most {decisions['threshold']:g} (relative mean "
                    f"absolute change) since the last full step"]
        return [f"- MagCache: all {len(decisions['names'])} blocks reuse the model's residual "
                f"while the accumulated magnitude error stays within {decisions['threshold']:g} "
                f"(at most {decisions['max_skip_steps']} steps in a row, the first "
                f"{decisions['retention_ratio']:g} of {decisions['num_inference_steps']} steps "
                f"always computed)"]

    def ensures(self, before, after, inputs) -> float:
        reuse.reset_cache(after)            # a first step computes every block
        try:
            return rel_error(after.gm(**inputs)[0], before.gm(**inputs)[0])
        finally:
            reuse.reset_cache(after)


# ---- the decisions, as functions of tensors (traced into the graph on export) ------------------
def first_block_decision(valid, residual, previous, threshold: float):
    """True (compute the tail) unless the caches hold this run's values and the first block's
    residual changed by at most `threshold`: mean|r − r'| / mean|r'|, compared in float64."""
    change = (residual - previous).abs().mean() / previous.abs().mean()
    return (~valid) | (change.to(torch.float64) > threshold)


def mag_decision(valid, step, ratio, count, error, has_residual, *, ratios: list[float],
                 threshold: float, max_skip_steps: int, retention_steps: int):
    """(compute, step, ratio, count, error, has_residual) of MagCache for this call, from the cached state
    (diffusers' MagCacheHeadHook, in float32 like its tensors)."""
    zero_i = torch.zeros_like(step)
    step = torch.where(valid, step, zero_i)
    ratio = torch.where(valid, ratio, torch.ones_like(ratio))
    count = torch.where(valid, count, zero_i)
    error = torch.where(valid, error, torch.zeros_like(error))
    has_residual = valid & has_residual
    table = torch.tensor(ratios + [1.0], dtype=ratio.dtype, device=ratio.device)
    scale = table.index_select(0, step.clamp(0, len(ratios)).reshape(1)).reshape(())
    accumulating = step >= retention_steps
    new_ratio = ratio * scale
    new_count = count + 1
    new_error = error + (1.0 - new_ratio).abs()
    reuse_now = accumulating & has_residual & (new_error <= threshold) & \
        (new_count <= max_skip_steps)
    restart = accumulating & ~reuse_now
    ratio = torch.where(restart, torch.ones_like(ratio), torch.where(accumulating, new_ratio, ratio))
    count = torch.where(restart, zero_i, torch.where(accumulating, new_count, count))
    error = torch.where(restart, torch.zeros_like(error),
                        torch.where(accumulating, new_error, error))
    return ~reuse_now, step, ratio, count, error, has_residual


def mag_advance(step, ratio, count, error, has_residual, *, steps: int):
    """After a call: the next step index; at the run's last step everything restarts."""
    step = step + 1
    end = step >= steps
    return (torch.where(end, torch.zeros_like(step), step),
            torch.where(end, torch.ones_like(ratio), ratio),
            torch.where(end, torch.zeros_like(count), count),
            torch.where(end, torch.zeros_like(error), error),
            has_residual & ~end)


def cache_rule(gm: fx.GraphModule, cond: fx.Node) -> dict:
    """The rule that decides the cache pass's conditional `cond`, read back from the graph (what a
    runtime outside the graph needs to decide it the same way: `cache_step`)."""
    compute = cond.args[0]
    if compute.target is first_block_decision:
        return {"method": "first-block", "threshold": float(compute.args[3])}
    decided = compute.args[0]
    advance = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is mag_advance)
    return {"method": "mag", **decided.kwargs, "steps": advance.kwargs["steps"]}


def cache_step(rule: dict, slots: dict, valid: bool, streams: list[torch.Tensor],
               first_block: tuple[torch.Tensor, torch.Tensor] | None, run) -> list[torch.Tensor]:
    """One call of the cache pass's conditional outside the graph (the segmented runtime): the same
    decision functions and slot updates as the graph's nodes, with the decision on the host.

    `slots`: this cache context's slots (updated in place); `streams`: the streams entering the
    cached blocks; `first_block`: (input, output) of the first block's primary stream
    (first-block method); `run(streams) -> streams` computes the cached blocks."""
    like = streams[0]
    flag = torch.tensor(valid, device=like.device)
    if rule["method"] == "first-block":
        residual = first_block[1] - first_block[0]
        previous = slots.get("first_block_residual", torch.zeros_like(residual))
        compute = bool(first_block_decision(flag, residual, previous, rule["threshold"]))
        slots["first_block_residual"] = residual if compute else previous
    else:
        state = [slots.get(key, torch.zeros((), dtype=dtype, device=like.device))
                 for key, dtype in _MAG_SLOTS]
        decided = mag_decision(flag, *state, **{k: rule[k] for k in (
            "ratios", "threshold", "max_skip_steps", "retention_steps")})
        compute = bool(decided[0])
        values = list(decided[1:])
        values[-1] = decided[0] | values[-1]
        for (key, _), value in zip(_MAG_SLOTS, mag_advance(*values, steps=rule["steps"])):
            slots[key] = value
    out = run(streams) if compute else None
    finals = []
    for k, s_in in enumerate(streams):
        if rule["method"] == "mag" and k > 0:
            finals.append(out[k] if compute else s_in)
            continue
        key = f"residual_s{k}"
        cached = slots.get(key, torch.zeros_like(s_in))
        if compute:
            finals.append(out[k])
            slots[key] = out[k] - s_in
        else:
            finals.append(cached + s_in if rule["method"] == "first-block" else s_in + cached)
    return finals


# ---- the rewrite --------------------------------------------------------------------------------
def cache_blocks(graph, decisions: dict) -> None:
    gm, g = graph.gm, graph.gm.graph
    blocks = list(graph.blocks)
    first_block = decisions["method"] == "first-block"
    region = blocks[1:] if first_block else blocks
    entering = graph._nodes(region[0].stream_in)
    pairs = _chained_streams(graph, region, entering)
    members = _members(graph, region)
    label = f"{region[0].name}..{region[-1].name}" if len(region) > 1 else region[0].name
    check_outlinable(graph, members, pairs, f"blocks {label}")
    valid = reuse.begin_node(graph)
    at = members[0]
    primary_in = entering[0]
    with g.inserting_before(at):
        if first_block:
            head_in = graph.node(blocks[0].stream_in[0])
            residual = g.call_function(aten.sub.Tensor, (primary_in, head_in))
            previous = reuse.read_node(g, "first_block_residual", residual)
            compute = g.call_function(first_block_decision,
                                      (valid, residual, previous, float(decisions["threshold"])))
        else:
            state = _mag_state(g, primary_in)
            decided = g.call_function(mag_decision, (valid, *state), {
                "ratios": list(decisions["mag_ratios"]), "threshold": float(decisions["threshold"]),
                "max_skip_steps": int(decisions["max_skip_steps"]),
                "retention_steps": int(decisions["retention_ratio"]
                                       * decisions["num_inference_steps"] + 0.5)})
            compute = g.call_function(operator.getitem, (decided, 0))
    compute.meta["val"] = torch.empty((), dtype=torch.bool)
    outs = outline(gm, members, pairs, compute, "cache", label)
    finals = []
    with g.inserting_before(at):
        for k, ((s_in, _), out) in enumerate(zip(pairs, outs)):
            if not first_block and k > 0:
                # MagCache gives back the other streams (text tokens) unchanged, as diffusers does.
                finals.append(g.call_function(reuse.pick, (compute, out, s_in)))
                continue
            key = f"residual_s{k}"
            cached = reuse.read_node(g, key, s_in)
            reused = g.call_function(aten.add.Tensor, (cached, s_in) if first_block else
                                     (s_in, cached))
            finals.append(g.call_function(reuse.pick, (compute, out, reused)))
            fresh = g.call_function(aten.sub.Tensor, (out, s_in))
            reuse.write_node(g, key, g.call_function(reuse.pick, (compute, fresh, cached)))
        if first_block:
            kept = g.call_function(reuse.pick, (compute, residual, previous))
            reuse.write_node(g, "first_block_residual", kept)
        else:
            _write_mag_state(g, decided, compute, int(decisions["num_inference_steps"]))
    replace_outputs(g, members, [b for _, b in pairs], finals)
    stable_toposort(g)
    graph.refresh()


_MAG_SLOTS = (("mag_step", torch.int64), ("mag_ratio", torch.float32),
              ("mag_count", torch.int64), ("mag_error", torch.float32),
              ("mag_has_residual", torch.bool))


def _mag_state(g: fx.Graph, like: fx.Node) -> list[fx.Node]:
    state = []
    for key, dtype in _MAG_SLOTS:
        zero = g.call_function(aten.zeros.default, ([],), {"dtype": dtype,
                                                             "device": like.meta["val"].device})
        zero.meta["val"] = torch.empty((), dtype=dtype)
        state.append(reuse.read_node(g, key, zero))
    return state


def _write_mag_state(g: fx.Graph, decided: fx.Node, compute: fx.Node, steps: int) -> None:
    values = [g.call_function(operator.getitem, (decided, i)) for i in range(1, 6)]
    # A step that computes leaves a residual to reuse.
    values[-1] = g.call_function(operator.or_, (compute, values[-1]))
    advanced = g.call_function(mag_advance, tuple(values), {"steps": steps})
    for i, (key, _) in enumerate(_MAG_SLOTS):
        reuse.write_node(g, key, g.call_function(operator.getitem, (advanced, i)))


def _members(graph, blocks) -> list[fx.Node]:
    order = {n: i for i, n in enumerate(graph.gm.graph.nodes)}
    members = {n for b in blocks for n in graph._nodes(b.nodes)}
    return sorted(members, key=order.__getitem__)


def _chained_streams(graph, blocks, entering: list[fx.Node]) -> list[tuple[fx.Node, fx.Node]]:
    """(stream entering blocks[0], the value it has after blocks[-1]) for every stream used after
    the blocks: each block must read its streams straight from the blocks before it."""
    current = list(entering)
    for b in blocks:
        for s_in, s_out in zip(graph._nodes(b.stream_in), graph._nodes(b.stream_out)):
            if s_in not in current:
                raise GraphoptError(
                    f"block '{b.name}' reads its stream '{s_in.name}' through ops outside the "
                    f"blocks (a reshape between blocks): the cache pass skips runs of directly "
                    f"chained blocks only; route(skip='reuse') handles such models per block")
            current[current.index(s_in)] = s_out
    inside = set(_members(graph, blocks))
    used_after = {m for m in inside if any(u not in inside for u in m.users)}
    pairs = [(a, b) for a, b in zip(entering, current) if b in used_after]
    if used_after - {b for _, b in pairs}:
        extra = sorted(m.name for m in used_after - {b for _, b in pairs})
        raise GraphoptError(f"blocks {blocks[0].name}..{blocks[-1].name} have values used after "
                            f"them that are not streams ({extra}): they cannot be cached as one")
    return pairs


def _resampled(ratios, steps: int) -> list[float]:
    """diffusers' nearest_interp: ratios resampled to `steps` entries."""
    ratios = list(ratios)
    if len(ratios) == steps:
        return ratios
    if steps == 1:
        return ratios[-1:]
    scale = (len(ratios) - 1) / (steps - 1)
    return [ratios[int(torch.round(torch.tensor(i * scale, dtype=torch.float32)))]
            for i in range(steps)]


@torch.no_grad()
def calibrate_mag_ratios(graph, steps: int, shift: float = 1.0) -> list[float]:
    """MagCache's ratios γᵢ = mean over tokens of ‖Rᵢ‖ / ‖Rᵢ₋₁‖ (R = the model's residual across
    its blocks, the norm over channels; γ₀ = 1), measured as diffusers' calibrate mode does, over
    one Euler flow-matching sampling run from seeded noise with the conditions of the graph's
    example inputs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from graphopt.calibration import calibration_inputs

    feed = dict(calibration_inputs(graph, timesteps=(500.0,), samples=1)[0])
    x_name, t_name = graph.latent_input, graph.timestep_input
    first, last = graph.blocks[0], graph.blocks[-1]
    residuals = []

    class Residual(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == first.stream_in[0]:
                self.entering = out
            if n.name == last.stream_out[0]:
                residuals.append((out - self.entering).float())
            return out

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(feed[x_name].shape, generator=gen, dtype=torch.float32)
    example_t = feed[t_name]
    for t in scheduler.timesteps:
        feed[x_name] = x.to(graph.example_inputs[x_name].dtype)
        feed[t_name] = torch.full_like(example_t, float(t)) if example_t.dim() else \
            torch.tensor(float(t), dtype=example_t.dtype)
        velocity = Residual(graph.gm).run(*graph.flat_inputs(feed))[0].float()
        x = scheduler.step(velocity, t, x, return_dict=False)[0]
    ratios = [1.0]
    for prev, cur in zip(residuals, residuals[1:]):
        ratios.append(float((cur.norm(dim=-1) / (prev.norm(dim=-1) + 1e-8)).mean()))
    return ratios
