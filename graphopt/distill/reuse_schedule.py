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

The result goes into a schedule-mode router (`route(mode="schedule", skip="reuse", select="sign",
budget=1)`): its table holds +1 where a block computes and −1 where it reuses, for the timestep
bin of every step (bins between steps take the nearer step's row).
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from graphopt.errors import GraphoptError
from graphopt.reuse import STATE_MODULE, reset_cache


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
                          progress: bool = False) -> dict:
    """The greedy search on the conditions `cond` (clips × tokens × dim), from every block
    computing down to the lowest of `targets` (executed FLOPs fractions in (0, 1)). Returns
    {"path": one {"fraction", "error", "computes"} per coarse unit given, "points": one per
    target, in the order given, each the path's last point above it refined block by block to a
    fraction at most the target, "model_calls": calls of the student the search made}. One search
    serves several targets; `routed` is left as it was."""
    router = getattr(routed.gm, "router", None)
    if router is None or router.mode != "schedule" or router.select != "sign" \
            or not hasattr(routed.gm, STATE_MODULE):
        raise GraphoptError("a reuse schedule needs a graph routed with mode='schedule', "
                            "skip='reuse', select='sign' (and budget=1)")
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

    def refine(computes, error, s, blocks, target):
        """Turn off `blocks` at step `s` one at a time, best first (error per FLOP), until the
        run's fraction is at most `target`: lands within one block of it, not one unit."""
        computes, blocks = computes.clone(), list(blocks)
        while _fraction(router, computes) > target:
            scored = []
            for b in blocks:
                trial = computes.clone()
                trial[s, b] = False
                scored.append(((resume(trial, s, snapshots) - error) / float(cost[b]), b))
            _, b = min(scored)
            computes[s, b] = False
            blocks.remove(b)
            error = resume(computes, s, snapshots)
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

    computes = torch.ones(steps, n, dtype=torch.bool)
    saved = router.force_gates
    reset_cache(routed)
    snapshots = [(noise, {}, None)] + [None] * (steps - 1)
    error = resume(computes, 0, snapshots, keep=True)
    path = [point(computes, error)]
    found: dict[float, dict] = {}
    bar = tqdm(desc=f"reuse schedule → {min(targets):.2f}x FLOPs", disable=not progress)
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
                    found[t] = refine(computes, error, s, m, t)
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
