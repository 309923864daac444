"""A learned reuse schedule: which blocks recompute at which denoising step, fitted on unrolled
sampling runs of the teacher's conditions (Learning-to-Cache's timestep-only router, found by
greedy search on whole runs instead of by gradient).

A decision at step s changes what every later step sees (the caches it leaves), so decisions are
scored on whole runs, against the teacher's final clips. Blocks are taken in `groups` of
consecutive blocks (2: the shallow and the deep half); a unit is (step, group). Starting from
every unit computing, the search turns off, one at a time, the unit whose reuse raises the final
clips' mean squared error against the teacher's least per FLOP saved, until the run's executed
FLOPs reach `target`. A candidate is scored by resuming the run at its step from saved state
(latents and caches), so a round costs about half of (steps × groups) runs. The first step always
computes (nothing is cached yet).

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


def fit_reuse_schedule(routed, teacher, cond: torch.Tensor, *, target: float, tolerance=1e-3,
                       **search) -> dict:
    """Fit `routed`'s schedule router in place: the search's first schedule at or below `target`
    (+ `tolerance`, the fixed share makes exact fractions rare). Returns that point of the path
    ({"fraction", "error", "computes": steps × blocks bool}) with the path up to it ("path")."""
    path = reuse_schedule_path(routed, teacher, cond, down_to=target + tolerance, **search)
    point = next(p for p in path if p["fraction"] <= target + tolerance)
    set_reuse_schedule(routed, point["computes"], steps=len(point["computes"]),
                       shift=search.get("shift", 1.0))
    return {**point, "path": path}


@torch.no_grad()
def reuse_schedule_path(routed, teacher, cond: torch.Tensor, *, video_shape, down_to: float,
                        steps: int = 10, guidance: float = 4.0, shift: float = 1.0,
                        groups: int = 2, seed: int = 0, progress: bool = False) -> list[dict]:
    """The greedy search's path on the conditions `cond` (clips × tokens × dim), from every block
    computing down to an executed fraction ≤ `down_to`: one {"fraction", "error", "computes"} per
    reuse given, so one search serves several targets. `routed` is left as it was."""
    router = getattr(routed.gm, "router", None)
    if router is None or router.mode != "schedule" or router.select != "sign" \
            or not hasattr(routed.gm, STATE_MODULE):
        raise GraphoptError("a reuse schedule needs a graph routed with mode='schedule', "
                            "skip='reuse', select='sign' (and budget=1)")
    if not 0.0 < down_to < 1.0:
        raise GraphoptError(f"a reuse schedule's target is an executed-FLOPs fraction in (0, 1), "
                            f"got {down_to}")
    n = router.n_blocks
    if not 1 <= groups <= n:
        raise GraphoptError(f"reuse schedule groups must be in [1, {n}], got {groups}")
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
    unit_cost = [float(router.cost[m].sum()) for m in members]

    def resume(computes, start, snapshots, keep=False):
        """Final-clip MSE under `computes` (steps × groups), resumed at step `start`."""
        x, slots, last = snapshots[start]
        ctx = state._state()
        ctx["slots"], ctx["last"] = dict(slots), last
        for s in range(start, steps):
            if keep:
                snapshots[s] = (x, dict(ctx["slots"]), ctx["last"])
            router.force_gates = _blocks(computes[s], members, n)
            x = run.step(x, s)
        return float((x.clamp(-1, 1) - reference).square().mean())

    def point(computes, error):
        per_block = torch.stack([_blocks(row, members, n) for row in computes])
        return {"fraction": _fraction(router, per_block), "error": error, "computes": per_block}

    computes = torch.ones(steps, groups, dtype=torch.bool)
    saved = router.force_gates
    reset_cache(routed)
    snapshots = [(noise, {}, None)] + [None] * (steps - 1)
    error = resume(computes, 0, snapshots, keep=True)
    path = [point(computes, error)]
    bar = tqdm(desc=f"reuse schedule → {down_to:.2f}x FLOPs", disable=not progress)
    try:
        while path[-1]["fraction"] > down_to:
            best = None
            for s in range(1, steps):
                for g in range(groups):
                    if computes[s, g]:
                        trial = computes.clone()
                        trial[s, g] = False
                        score = (resume(trial, s, snapshots) - error) / unit_cost[g]
                        if best is None or score < best[0]:
                            best = (score, s, g)
            if best is None:
                break
            computes[best[1], best[2]] = False
            error = resume(computes, best[1], snapshots, keep=True)
            path.append(point(computes, error))
            bar.update(1)
    finally:
        bar.close()
        router.force_gates = saved
        reset_cache(routed)
    return path


def set_reuse_schedule(routed, computes: torch.Tensor, *, steps: int, shift: float = 1.0) -> None:
    """Write a (steps × blocks) compute schedule into `routed`'s schedule router: every timestep
    bin takes the row of the nearest sampling step, +1 compute, −1 reuse."""
    router = routed.gm.router
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    _write_table(router, computes, scheduler.timesteps.float())


def _blocks(row: torch.Tensor, members, n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.bool)
    for g, m in enumerate(members):
        out[m] = bool(row[g])
    return out


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
