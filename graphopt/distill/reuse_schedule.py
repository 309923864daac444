"""A learned reuse schedule: which blocks recompute at which denoising step, fitted on unrolled
sampling runs of the teacher's conditions (Learning-to-Cache's timestep-only router, found by
greedy search on whole runs instead of by gradient).

A decision at step s changes what every later step sees (the caches it leaves), so decisions are
scored on whole runs, against the teacher's final clips. Blocks are taken in `groups` of
consecutive blocks (2: the shallow and the deep half); a unit is (step, group). Starting from
every unit computing, the search turns off, one at a time, the unit whose reuse raises the clip
error against the teacher's least per FLOP saved. The clip error is the final clips' MSE plus
`temporal_weight` × the MSE of the error's frame-to-frame change: reuse that leaves an error
differing between frames shows as flicker, which plain MSE weighs no more than a steady error. A
candidate is scored by resuming the run at its step from saved state (latents and caches). With
`lazy` (Minoux's lazy greedy) a round re-scores units in the order of their last scores and stops
once a fresh score beats every stale one, instead of re-scoring all of them. When the next unit
would pass below a target, that unit is split into its blocks, turned off one block at a time,
best first, until the run's executed FLOPs are at most the target: a target is met within one
block's share, not one unit's (a unit is about 0.05 of the run at 8 blocks and 10 steps). The
first step always computes (nothing is cached yet), and so do the `last_computes` last steps:
reused there, a stale residual lands in the clip with no later step to correct it, and the clips
flicker (measured: see README, "Quality at equal compute").

`strategy="timetable"` searches instead every whole-step timetable (at each step every block
computes or every block reuses, MagCache's shape) with as many reused steps as stay above the
target, as a tree of shared prefixes (a few hundred model calls at 10 steps), and refines the best
block by block over all its computing steps. With `objective="db"` runs are scored by the mean of
each clip's MSE in dB (what the benchmark's PSNR column averages) instead of the pooled MSE, which
one bad clip dominates. Measured on the shipped teacher (README, "Quality at equal compute"): with
route skip="forecast", timetable + db finds a schedule that keeps MagCache's flicker with far
better PSNR, where the greedy, one unit at a time, strings forecasts over many steps in a row.

The result goes into a schedule-mode router (`route(mode="schedule", skip="reuse" or "forecast", select="sign",
budget=1)`): its table holds +1 where a block computes and −1 where it reuses, for the timestep
bin of every step (bins between steps take the nearer step's row).
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from graphopt.errors import GraphoptError
from graphopt.reuse import STATE_MODULE, reset_cache

STRATEGIES = ("greedy", "timetable")
OBJECTIVES = ("mse", "db")


class _Run:
    """Euler flow-matching sampling with CFG (graphopt.tiny.sampler's), one step at a time."""

    def __init__(self, model, cond, steps, guidance, shift):
        self.model, self.guidance = model, guidance
        self.cond = torch.cat([torch.zeros_like(cond), cond]) if guidance != 1.0 else cond
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.set_timesteps(steps)
        self.timesteps = scheduler.timesteps.float()
        self.sigmas = scheduler.sigmas.float()

    def step(self, x, s):
        model_in = torch.cat([x, x]) if self.guidance != 1.0 else x
        t = self.timesteps[s].expand(model_in.shape[0])
        v = self.model(hidden_states=model_in, timestep=t, encoder_hidden_states=self.cond,
                       return_dict=False)[0].float()
        if self.guidance != 1.0:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + self.guidance * (v_cond - v_uncond)
        return x + (self.sigmas[s + 1] - self.sigmas[s]) * v


def fit_reuse_schedule(routed, teacher, cond: torch.Tensor, *, target: float, **search) -> dict:
    """Fit `routed`'s schedule router in place to the search's schedule for `target` (an executed
    FLOPs fraction; the schedule's is at most that). Returns that point ({"fraction", "error",
    "computes": steps × blocks bool}) with the coarse path that led to it ("path")."""
    found = reuse_schedule_search(routed, teacher, cond, targets=[target], **search)
    point = found["points"][0]
    set_reuse_schedule(routed, point["computes"], steps=len(point["computes"]),
                       shift=search.get("shift", 1.0))
    return {**point, "path": found["path"]}


@torch.no_grad()
def reuse_schedule_search(routed, teacher, cond: torch.Tensor, *, video_shape, targets,
                          steps: int = 10, guidance: float = 4.0, shift: float = 1.0,
                          groups: int = 2, temporal_weight: float = 0.0, last_computes: int = 0,
                          max_reuse: int | None = None, lazy: bool = True, seed: int = 0,
                          strategy: str = "greedy", objective: str = "mse",
                          progress: bool = False) -> dict:
    """The greedy search on the conditions `cond` (clips × tokens × dim), from every block
    computing down to the lowest of `targets` (executed FLOPs fractions in (0, 1)). Returns
    {"path": one {"fraction", "error", "computes"} per coarse unit given, "points": one per
    target, in the order given, each the path's last point above it refined block by block to a
    fraction at most the target, "model_calls": calls of the student the search made}. One search
    serves several targets; `routed` is left as it was. With `strategy="timetable"` the path is the
    all-computing run alone, and each point also holds the whole-step timetable it was refined from
    ("timetable", steps × blocks) and that timetable's error ("timetable_error")."""
    router = getattr(routed.gm, "router", None)
    if router is None or router.mode != "schedule" or router.select != "sign" \
            or not hasattr(routed.gm, STATE_MODULE):
        raise GraphoptError("a reuse schedule needs a graph routed with mode='schedule', "
                            "skip='reuse' or 'forecast', select='sign' (and budget=1)")
    targets = [float(t) for t in targets]
    if not targets or not all(router.fixed_share < t < 1.0 for t in targets):
        raise GraphoptError(f"a reuse schedule's targets are executed-FLOPs fractions in "
                            f"({router.fixed_share:.3f}, 1) (below it only the always-running "
                            f"part is left), got {targets}")
    n = router.n_blocks
    if not 1 <= groups <= n:
        raise GraphoptError(f"reuse schedule groups must be in [1, {n}], got {groups}")
    if not 0 <= last_computes < steps:
        raise GraphoptError(f"last_computes must be in [0, {steps - 1}], got {last_computes}")
    if max_reuse is not None and max_reuse < 1:
        raise GraphoptError(f"max_reuse must be ≥ 1 (or None), got {max_reuse}")
    if temporal_weight < 0:
        raise GraphoptError(f"temporal_weight must be ≥ 0, got {temporal_weight}")
    if strategy not in STRATEGIES or objective not in OBJECTIVES:
        raise GraphoptError(f"reuse schedule strategy must be one of {STRATEGIES} and objective one of "
                            f"{OBJECTIVES}, got {strategy!r}, {objective!r}")
    if objective == "db" and temporal_weight:
        raise GraphoptError("temporal_weight weighs a term of the mse objective; the db objective has none: "
                            "give one or the other")
    members = [list(range(n))[g * n // groups:(g + 1) * n // groups] for g in range(groups)]
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((cond.shape[0], *video_shape), generator=gen).float()
    teacher_run = _Run(teacher, cond, steps, guidance, shift)
    reference = noise
    for s in range(steps):
        reference = teacher_run.step(reference, s)
    reference = reference.clamp(-1, 1)
    run = _Run(routed, cond, steps, guidance, shift)
    state = getattr(routed.gm, STATE_MODULE)
    cost = router.cost.double()
    calls = [0]                               # model calls the search made (its cost)

    def clip_error(x):
        """Final clips vs the teacher's: MSE, plus `temporal_weight` × the mean absolute change
        of the error from frame to frame (an error that differs between frames is flicker; L1,
        as the flicker metric, so many small background changes weigh what they do there)."""
        d = x.clamp(-1, 1) - reference
        if objective == "db":           # the mean of each clip's MSE in dB: what PSNR columns average
            return float(10 * d.square().flatten(1).mean(1).clamp_min(1e-12).log10().mean())
        return float(d.square().mean() + temporal_weight * d.diff(dim=2).abs().mean())

    def resume(computes, start, snapshots, keep=False):
        """Clip error under `computes` (steps × blocks), resumed at step `start`."""
        x, slots, last = snapshots[start]
        ctx = state._state()
        ctx["slots"], ctx["last"] = dict(slots), last
        for s in range(start, steps):
            if keep:
                snapshots[s] = (x, dict(ctx["slots"]), ctx["last"])
            router.force_gates = computes[s].clone()
            x = run.step(x, s)
        calls[0] += steps - start
        return clip_error(x)

    def point(computes, error):
        return {"fraction": _fraction(router, computes), "error": error, "computes": computes.clone()}

    def refine(computes, error, cells, target):
        """Turn off `cells` ((step, block) pairs) one at a time, best first (error per FLOP),
        until the run's fraction is at most `target`: lands within one block of it, not one unit."""
        computes, cells = computes.clone(), list(cells)
        while _fraction(router, computes) > target:
            if not any(allowed(computes, s, [b]) for s, b in cells):
                raise GraphoptError(
                    f"reuse schedule target {target} is below what reuse reaches here "
                    f"({_fraction(router, computes):.3f}: the first and the last {last_computes} "
                    f"step(s) compute, at most {max_reuse} reuse(s) in a row); raise the target, "
                    f"lower last_computes or raise max_reuse")
            scored = []
            for s, b in cells:
                if not allowed(computes, s, [b]):
                    continue
                trial = computes.clone()
                trial[s, b] = False
                scored.append(((resume(trial, s, snapshots) - error) / float(cost[b]), (s, b)))
            _, (s, b) = min(scored)
            computes[s, b] = False
            cells.remove((s, b))
            error = resume(computes, s, snapshots, keep=True)
        return point(computes, error)

    def allowed(computes, s, blocks):
        """With `max_reuse`, no block may reuse one residual for more than that many steps in a row."""
        if max_reuse is None:
            return True
        for b in blocks:
            run, t = 1, s - 1
            while t >= 0 and not computes[t, b]:
                run, t = run + 1, t - 1
            t = s + 1
            while t < steps and not computes[t, b]:
                run, t = run + 1, t + 1
            if run > max_reuse:
                return False
        return True

    def pick(computes, error, stale):
        """The unit (step, group) whose reuse costs the least error per FLOP saved. With `lazy`,
        units are re-scored in the order of their last round's scores until a fresh score is at
        most every remaining stale one (Minoux's lazy greedy: a unit's cost mostly grows as more
        of the run reuses, so a stale score is close to a lower bound); `stale` is updated."""
        units = [(s, g) for s in range(1, steps - last_computes) for g, m in enumerate(members)
                 if computes[s, m].all() and allowed(computes, s, m)]  # step 0: nothing cached yet
        for u in list(stale):
            if u not in units:
                del stale[u]
        order = sorted(units, key=lambda u: stale.get(u, float("-inf")))
        best = None
        for u in order:
            if lazy and best is not None and stale.get(u, float("-inf")) >= best[0]:
                break
            s, m = u[0], members[u[1]]
            trial = computes.clone()
            trial[s, m] = False
            stale[u] = (resume(trial, s, snapshots) - error) / float(cost[m].sum())
            if best is None or stale[u] < best[0]:
                best = (stale[u], u)
        return None if best is None else (best[1][0], members[best[1][1]])

    def whole_step_fraction(reused):
        return _fraction(router, torch.tensor([[s not in reused] * n for s in range(steps)]))

    def timetable(target, bar):
        """Every whole-step timetable (all blocks reuse at a step, or none: MagCache's shape) that
        reuses the most steps while staying above `target`, run as a tree of shared prefixes; the
        best is refined block by block, over every step, to at most the target."""
        free = list(range(1, steps - last_computes))
        k = max(k for k in range(len(free) + 1) if whole_step_fraction(set(free[:k])) > target)
        if k in best_timetables:            # another target needs the same count of skipped steps
            return finish(*best_timetables[k], free, target)
        best = [float("inf"), None]

        def grow(s, x, ctx_slots, last, left, run_length, computes):
            if s == steps:
                error = clip_error(x)
                if error < best[0]:
                    best[:] = [error, computes.clone()]
                return
            for reuse_here in (False, True):
                if reuse_here and (left == 0 or s not in free
                                   or max_reuse is not None and run_length >= max_reuse):
                    continue
                if not reuse_here and sum(t in free for t in range(s + 1, steps)) < left:
                    continue                  # too few steps left for the reuses still owed
                computes[s] = not reuse_here
                ctx = state._state()
                ctx["slots"], ctx["last"] = dict(ctx_slots), last
                router.force_gates = computes[s].clone()
                nxt = run.step(x, s)
                calls[0] += 1
                bar.update(1)
                grow(s + 1, nxt, dict(ctx["slots"]), ctx["last"], left - reuse_here,
                     run_length + 1 if reuse_here else 0, computes)
            computes[s] = True

        reset_cache(routed)
        grow(0, noise, {}, None, k, 0, torch.ones(steps, n, dtype=torch.bool))
        if best[1] is None:
            raise GraphoptError(f"no whole-step timetable reuses {k} of steps {free} with at most "
                                f"{max_reuse} in a row; raise max_reuse or the target")
        best_timetables[k] = tuple(best)
        return finish(*best, free, target)

    def finish(timetable_error, computes, free, target):
        """The best timetable refined block by block down to `target`."""
        error = resume(computes, 0, snapshots, keep=True)
        cells = [(s, b) for s in free for b in range(n) if computes[s, b]]
        return {**refine(computes, error, cells, target), "timetable": computes.clone(),
                "timetable_error": timetable_error}

    computes = torch.ones(steps, n, dtype=torch.bool)
    saved = router.force_gates
    reset_cache(routed)
    snapshots = [(noise, {}, None)] + [None] * (steps - 1)
    error = resume(computes, 0, snapshots, keep=True)
    path = [point(computes, error)]
    found: dict[float, dict] = {}
    bar = tqdm(desc=f"reuse schedule → {min(targets):.2f}x FLOPs", disable=not progress)
    if strategy == "timetable":
        best_timetables: dict[int, tuple[float, torch.Tensor]] = {}   # skipped steps → (error, timetable)
        try:
            found = {t: timetable(t, bar) for t in set(targets)}
        finally:
            bar.close()
            router.force_gates = saved
            reset_cache(routed)
        return {"path": path, "points": [found[t] for t in targets], "model_calls": calls[0]}
    try:
        stale: dict[tuple[int, int], float] = {}
        while len(found) < len(set(targets)):
            best = pick(computes, error, stale)
            if best is None:                  # everything reusable reuses: the floor
                raise GraphoptError(
                    f"reuse schedule targets {sorted(set(targets) - set(found))} are below what "
                    f"reuse reaches here ({path[-1]['fraction']:.3f}: the first and the last "
                    f"{last_computes} step(s) compute); raise the target or lower last_computes")
            s, m = best
            after = computes.clone()
            after[s, m] = False
            for t in sorted(set(targets) - set(found), reverse=True):
                if _fraction(router, after) <= t:
                    found[t] = refine(computes, error, [(s, b) for b in m], t)
            computes = after
            error = resume(computes, s, snapshots, keep=True)
            path.append(point(computes, error))
            bar.update(1)
    finally:
        bar.close()
        router.force_gates = saved
        reset_cache(routed)
    return {"path": path, "points": [found[t] for t in targets], "model_calls": calls[0]}


def set_reuse_schedule(routed, computes: torch.Tensor, *, steps: int, shift: float = 1.0) -> None:
    """Write a (steps × blocks) compute schedule into `routed`'s schedule router: every timestep
    bin takes the row of the nearest sampling step, +1 compute, −1 reuse."""
    router = routed.gm.router
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    _write_table(router, computes, scheduler.timesteps.float())


def _fraction(router, per_block: torch.Tensor) -> float:
    """The run's executed FLOPs fraction under a (steps × blocks) schedule."""
    return float((router.fixed_share + (per_block.double() * router.cost.double()).sum(1)).mean())


def _write_table(router, computes: torch.Tensor, timesteps: torch.Tensor) -> None:
    """Every timestep bin takes the row of the nearest sampling step: +1 compute, −1 reuse."""
    bins = router.timestep_bins
    centers = (torch.arange(bins, dtype=torch.float32) + 0.5) * router.timestep_max / bins
    nearest = (centers[:, None] - timesteps[None, :]).abs().argmin(1)
    step_bin = (timesteps / router.timestep_max * bins).floor().clamp(0, bins - 1).long()
    nearest[step_bin] = torch.arange(len(timesteps))      # a step's own bin is always its row
    if len(set(step_bin.tolist())) != len(timesteps):
        raise GraphoptError(f"the router's {bins} timestep bins put two sampling steps in one "
                            f"bin; route with more timestep_bins (e.g. 1000)")
    with torch.no_grad():
        router.table.copy_(computes[nearest].float() * 2 - 1)
