"""Quality per executed FLOP: the shipped tiny teacher, sped up by diffusers' own caches and compressed
by graphopt, every row sampled from the same noise and scored with mini-VBench against the teacher.

Row groups (--rows, default all but combo), one builder each in ROW_BUILDERS:

- caches (family "diffusers cache"): diffusers' caches on the eager diffusers teacher, applied with
  its own API (`model.enable_cache(config)` … `disable_cache()`, graphopt.diffusers_caches):
  FirstBlockCache at several thresholds; MagCache with ratios from its own calibrate=True mode (one
  sampling run on calibration conditions, not the scored ones); PyramidAttentionBroadcast and
  FasterCache at two settings each; TaylorSeer at its defaults and at two settings that skip work;
  and the eager teacher without a cache (a check: 1.00x FLOPs, the graph teacher's clips).
- prune (family "graphopt static"): attention heads removed by magnitude, Taylor sensitivity on
  real calibration clips, or PARE's role-aware criterion, until the cost model's FLOPs per step fall
  to each --targets value;
- drop ("graphopt static"): VDMini's hierarchical policy, whole shallow blocks removed;
- route ("graphopt dynamic"): PARE's router over every block, budget = the target;
- reuse ("graphopt dynamic"): residual reuse in the graph, no weight training: the cache pass
  (FirstBlockCache, and MagCache with the caches' calibrated ratios, compiled into the graph) and a
  learned reuse schedule (route skip=reuse; which block half recomputes at which step, searched on
  unrolled runs of 4 calibration conditions) at each --reuse-targets executed fraction; and a
  forecast timetable (route skip=forecast: a skipped block gives back its last residual extrapolated
  along its last change; the best whole-step timetable by mean per-clip dB, refined block by block)
  at each --forecast-targets fraction;
- combo ("graphopt dynamic", not in the default run): static compression under a skip, prune + a reuse
  schedule to each --reuse-targets fraction of the teacher's FLOPs, and drop one block + the MagCache
  pass, each before and after distilling the static model;
- and each row of the --distill-rows groups (default drop) after --distill-steps of distillation
  (graphopt.distill: output + ICD losses, and the router budget loss for the routed row: a router over the
  teacher's own blocks trains it with the weights from the first step) on the generator's clips.

Columns: FLOPs = what the whole sampling run executed (every step, every call, the CFG pair
batched), counted by torch's FlopCounterMode (graphopt.yardstick.count_flops) in the same run that
makes the clips, relative to the teacher's run; CPU latency = one CFG-pair call (median of --repeats
interleaved runs, --threads threads), relative to the teacher, for rows whose call cost is fixed
(not the caches: theirs changes from step to step); aggregate = the mean over colour, shape,
subject, smoothness and direction of min(metric / teacher's, 1) (graphopt.eval.aggregate_score);
then mini-VBench (graphopt.eval) on --clips held-out conditions, fidelity columns vs the teacher.

Writes <out>/bench_quality.md (table, command, notes), <out>/bench_quality.png (clip 0 of every
row), <out>/pareto.png (aggregate and PSNR against executed FLOPs) and, with --json, every row.

    python tools/bench_quality.py --out out/bench_quality      # default: 22.9 min wall at 1 thread
    python tools/bench_quality.py --rows caches,prune,drop,route,reuse,combo --distill-rows prune,drop,route  # long
    python tools/bench_quality.py --rows caches --clips 16 --json out/bq.json
    python tools/bench_quality.py --rows drop,route --clips 4 --distill-steps 0 --targets 0.5
    python tools/bench_quality.py --rows drop,route --targets 0.7 --recovery 0,100,300,1000 --json out/rec.json

To add rows: write a builder `(bed: Testbed) -> list[Row]` and add it to ROW_BUILDERS.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from graphopt.bench import interleaved_latency
from graphopt.compress import compress
from graphopt.cost import model_cost
from graphopt.diffusers_caches import CachedTransformer, calibrate_mag_cache
from graphopt.eval import AGGREGATE_METRICS, aggregate_score, evaluate_clips
from graphopt.io import atomic_write_text
from graphopt.passes.block_importance import block_importance, rank_blocks
from graphopt.passes.head_roles import head_roles
from graphopt.passes.importance import head_importance
from graphopt.passes.prune import select_heads
from graphopt.tiny import generate, load_tiny_teacher
from graphopt.tiny.testbed import (CALIBRATION_SEED, calibration_inputs, capture_teacher, distill_settings,
                                   eval_conditions, sample_clips, save_frame_grid, write_distill_data)
from graphopt.yardstick import count_flops, plot_pareto

METRICS = [("colour_accuracy", "colour", "{:.3f}"), ("shape_accuracy", "shape", "{:.3f}"),
           ("subject_consistency", "subject", "{:.3f}"), ("motion_smoothness", "smooth", "{:.3f}"),
           ("motion_rmse_px", "rmse px", "{:.2f}"), ("direction_adherence", "direction", "{:.3f}"),
           ("temporal_flicker", "flicker", "{:.3f}"), ("psnr_db", "PSNR dB", "{:.1f}"),
           ("relative_error", "rel err", "{:.3f}")]


@dataclass
class Row:
    """One model to sample and score. `model` is what the sampler calls (a DiTGraph, a diffusers
    model, a CachedTransformer); `context`, if given, is entered around its sampling run (a cache's
    enable/disable). `distill`: it can be distilled (model must be a DiTGraph): a distilled copy is scored
    when its group is in --distill-rows, and the recovery curve follows it. `timed`:
    one call's latency means something (False for a cache, whose calls differ in cost)."""

    name: str
    group: str
    family: str
    model: Callable
    context: contextlib.AbstractContextManager | None = None
    distill: bool = False
    timed: bool = True
    curve: str | None = None           # recovery curve: the row distilled, and after how many steps
    distill_steps: int | None = None


class Testbed:
    """What the row builders share; each analysis runs on first use, so a group that is not chosen
    costs nothing."""

    def __init__(self, args):
        self.args = args
        self.targets = [float(t) for t in args.targets.split(",") if t]
        self.teacher, self.config = capture_teacher()
        self.sampling = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed}
        self.reuse_search = {}                      # label -> what a schedule search cost (for the notes)

    @cached_property
    def eager_teacher(self):
        """The diffusers WanTransformer3DModel itself (diffusers' caches hook its modules)."""
        return load_tiny_teacher()[0]

    @cached_property
    def calib(self) -> list[dict]:
        return calibration_inputs(self.config)

    @cached_property
    def attentions(self) -> list[str]:
        return [a.name for a in self.teacher.attentions.values() if a.prunable and a.kind in ("self", "cross")
                and a.block is not None]

    @cached_property
    def roles(self):
        return head_roles(self.teacher, inputs=self.calib)

    @functools.cache
    def head_scores(self, criterion: str) -> dict:
        extra = {"inputs": self.calib} if criterion != "magnitude" else {}
        if criterion == "role-aware":
            extra["roles"] = self.roles
        return head_importance(self.teacher, criterion, attentions=self.attentions, **extra)

    @cached_property
    def mag_ratios(self) -> list[float]:
        """MagCache's calibration on 4 calibration conditions (not the scored ones), same sampling."""
        data = generate(self.config, 4, seed=CALIBRATION_SEED)
        return calibrate_mag_cache(self.eager_teacher, lambda m: sample_clips(m, self.config, data, **self.sampling),
                                   self.args.steps)

    def cache(self, config) -> CachedTransformer:
        return CachedTransformer(self.eager_teacher, config, steps=self.args.steps)


# ---- row builders ---------------------------------------------------------------------------------

def cache_rows(bed: Testbed) -> list[Row]:
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)

    steps = bed.args.steps
    wide = (50, 950)                      # every sampled timestep but the first (1000) and last (100)
    block_parts = [r"blocks\.\d+\.(attn1|attn2|ffn)"]
    configs = [("diffusers teacher, no cache", None)]
    configs += [(f"FirstBlockCache {t:g}", FirstBlockCacheConfig(threshold=t)) for t in (0.1, 0.2, 0.3, 0.5, 0.7)]
    configs += [(f"MagCache {t:g}", MagCacheConfig(threshold=t, num_inference_steps=steps, mag_ratios=bed.mag_ratios))
                for t in (0.12, 0.24, 0.4, 0.6)]
    configs += [("PAB spatial 2", PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)),
                ("PAB spatial 3 cross 3 wide", PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=3, cross_attention_block_skip_range=3,
                    spatial_attention_timestep_skip_range=wide, cross_attention_timestep_skip_range=wide)),
                ("FasterCache", FasterCacheConfig()),
                ("FasterCache uncond 3 wide", FasterCacheConfig(
                    unconditional_batch_skip_range=3, unconditional_batch_timestep_skip_range=(-1, 901),
                    spatial_attention_timestep_skip_range=(-1, 901))),
                ("TaylorSeer defaults", TaylorSeerCacheConfig()),
                ("TaylorSeer attn+ffn every 2", TaylorSeerCacheConfig(
                    cache_interval=2, cache_identifiers=block_parts, taylor_factors_dtype=torch.float32)),
                ("TaylorSeer lite", TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32))]
    rows = []
    for name, config in configs:
        if config is None:
            rows.append(Row(name, "caches", "diffusers cache", bed.eager_teacher))
        else:
            cached = bed.cache(config)
            rows.append(Row(name, "caches", "diffusers cache", cached, context=cached, timed=False))
    return rows


def flops_ratio(graph, teacher) -> float:
    return model_cost(graph).flops / model_cost(teacher).flops


def pruned_to(teacher, scores: dict, target: float):
    """The teacher with the fewest lowest-scoring heads removed that brings FLOPs/step to <= target."""
    candidates = [a for a in teacher.attentions.values() if a.name in scores]
    total = sum(a.heads for a in candidates)

    def prune(n: int):
        kept = select_heads(candidates, scores, n / total, 1, False)
        graph = teacher.copy()
        compress(graph, ["prune"], {"prune": {"heads": kept}})
        return graph

    lo, hi = 0, total - len(candidates)          # every attention keeps one head
    best = prune(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        graph = prune(mid)
        if flops_ratio(graph, teacher) <= target + 1e-9:
            hi, best = mid, graph
        else:
            lo = mid + 1
    return best


def prune_rows(bed: Testbed) -> list[Row]:
    rows = []
    for criterion in ("magnitude", "sensitivity", "role-aware"):
        scores = bed.head_scores(criterion)
        rows += [Row(f"prune {criterion} @{t:g}", "prune", "graphopt static", pruned_to(bed.teacher, scores, t),
                     distill=True) for t in bed.targets]
    return rows


def drop_rows(bed: Testbed) -> list[Row]:
    """The number of hierarchical-policy blocks removed whose cost-model FLOPs ratio is nearest each target."""
    ranking = rank_blocks(block_importance(bed.teacher).scores(), "hierarchical", 0.5)
    n = len(bed.teacher.blocks)
    options = []
    for count in range(1, n // 2 + 1):               # protect_deep 0.5: only the shallow half may go
        graph = bed.teacher.copy()
        compress(graph, ["drop"], {"drop": {"removed": sorted(ranking[n - count:])}})
        options.append((flops_ratio(graph, bed.teacher), graph))
    return [Row(f"drop hierarchical @{t:g}", "drop", "graphopt static",
                min(options, key=lambda o: abs(o[0] - t))[1], distill=True) for t in bed.targets]


def route_rows(bed: Testbed) -> list[Row]:
    rows = []
    for t in bed.targets:
        graph = bed.teacher.copy()
        compress(graph, ["route"], {"route": {"budget": t}})
        rows.append(Row(f"route @{t:g}", "route", "graphopt dynamic", graph, distill=True))
    return rows


def reuse_rows(bed: Testbed) -> list[Row]:
    """graphopt's reuse in the graph: the cache pass (FirstBlockCache and MagCache compiled in: the
    same clips as diffusers' hooks), a learned reuse schedule (route skip=reuse, a per-step, per-block-half
    schedule found by greedy search on unrolled runs of 4 calibration conditions) at each
    --reuse-targets executed fraction, and a forecast timetable (route skip=forecast, the timetable search
    on per-clip dB) at each --forecast-targets fraction; no training of the weights."""
    rows = []
    caches = [("first-block", t, {}) for t in (0.3, 0.5)]
    caches += [("mag", t, {"num_inference_steps": bed.args.steps, "mag_ratios": bed.mag_ratios}) for t in (0.4, 0.6)]
    for method, t, extra in caches:
        graph = bed.teacher.copy()
        compress(graph, ["cache"], {"cache": {"method": method, "threshold": t, **extra}})
        rows.append(Row(f"graphopt cache {method} {t:g}", "reuse", "graphopt dynamic", graph, timed=False))
    a = bed.args
    searches = [("reuse", "greedy", "mse", a.max_reuse, a.reuse_targets, "reuse schedule"),
                ("forecast", "timetable", "db", a.forecast_max_reuse, a.forecast_targets, "forecast timetable")]
    for skip, strategy, objective, max_reuse, targets, label in searches:
        rows += schedule_rows(bed, bed.teacher, label, skip=skip, strategy=strategy, objective=objective,
                              max_reuse=max_reuse, targets=[float(t) for t in targets.split(",") if t])
    return rows


def schedule_rows(bed: Testbed, base, label: str, *, skip: str, strategy: str, objective: str,
                  max_reuse: int | None, targets: list[float]) -> list[Row]:
    """`base` (the teacher, or a compressed model) routed with a schedule router and searched, on unrolled
    runs of 4 calibration conditions against the teacher's clips, to each of `targets` (executed FLOPs
    relative to the TEACHER; a target base already meets, or that leaves base nothing to skip, is left out)."""
    from graphopt.distill.reuse_schedule import reuse_schedule_search, set_reuse_schedule
    from graphopt.tiny import embed_tokens

    a = bed.args
    scale = flops_ratio(base, bed.teacher)
    own = [(t, t / scale) for t in targets if t / scale < 1.0]
    if not own:
        return []
    data = generate(bed.config, 4, seed=CALIBRATION_SEED)
    cond = embed_tokens(bed.config, data.tokens)
    routed = base.copy()
    compress(routed, ["route"], {"route": {"mode": "schedule", "skip": skip, "select": "sign",
                                           "budget": 1.0, "timestep_bins": 1000,
                                           "ranking": list(range(len(base.blocks)))}})
    found = reuse_schedule_search(routed, bed.teacher, cond, video_shape=data.videos.shape[1:],
                                  targets=[o for _, o in own], steps=a.steps, guidance=a.guidance,
                                  temporal_weight=a.temporal_weight if objective == "mse" else 0.0,
                                  last_computes=a.last_computes, max_reuse=max_reuse, strategy=strategy,
                                  objective=objective, progress=True)
    bed.reuse_search[label] = {"model_calls": found["model_calls"], "max_reuse": max_reuse,
                               "path": [p["fraction"] for p in found["path"]]}
    rows = []
    for (t, _), point in zip(own, found["points"]):
        graph = routed.copy()
        set_reuse_schedule(graph, point["computes"], steps=a.steps)
        rows.append(Row(f"{label} @{t:g}", "reuse", "graphopt dynamic", graph, timed=False))
    return rows


def combo_rows(bed: Testbed) -> list[Row]:
    """Static compression under a skip: prune (Taylor sensitivity, to --combo-static of the teacher's FLOPs per
    step) + a reuse schedule searched to each --reuse-targets fraction of the TEACHER's executed FLOPs, and
    drop (the hierarchical policy's first block) + the MagCache pass; each before and, with --distill-steps,
    after distilling the static model (the schedule is then searched, and the cache run, on the distilled one)."""
    a = bed.args
    t = a.combo_static
    pruned = pruned_to(bed.teacher, bed.head_scores("sensitivity"), t)
    ranking = rank_blocks(block_importance(bed.teacher).scores(), "hierarchical", 0.5)
    dropped = bed.teacher.copy()
    compress(dropped, ["drop"], {"drop": {"removed": [ranking[-1]]}})
    versions = [("", pruned, dropped)]
    if a.distill_steps:
        versions.append((" + distill", distilled(bed, pruned, a.distill_steps),
                         distilled(bed, dropped, a.distill_steps)))
    targets = [float(x) for x in a.reuse_targets.split(",") if x]
    rows = []
    for suffix, p, d in versions:
        found = schedule_rows(bed, p, f"prune sensitivity @{t:g}{suffix} + reuse schedule", skip="reuse",
                              strategy="greedy", objective="mse", max_reuse=a.max_reuse, targets=targets)
        cached = d.copy()
        compress(cached, ["cache"], {"cache": {"method": "mag", "threshold": 0.4,
                                                "num_inference_steps": a.steps, "mag_ratios": bed.mag_ratios}})
        found.append(Row(f"drop 1 block{suffix} + cache mag 0.4", "combo", "", cached, timed=False))
        for row in found:
            row.group, row.family = "combo", "graphopt combination" + suffix
        rows += found
    return rows


ROW_BUILDERS: dict[str, Callable[[Testbed], list[Row]]] = {
    "caches": cache_rows, "prune": prune_rows, "drop": drop_rows, "route": route_rows,
    "reuse": reuse_rows, "combo": combo_rows}
DEFAULT_ROWS = ["caches", "prune", "drop", "route", "reuse"]
DISTILLABLE = {"prune", "drop", "route"}          # the groups whose rows carry `distill`


def distilled_rows(bed: Testbed, rows: list[Row], steps: int, groups: list[str]) -> list[Row]:
    """A distilled copy of every row marked `distill` whose group is in `groups`."""
    return [Row(f"{row.name} + distill", row.group, f"{row.family} + distill",
                distilled(bed, row.model, steps, recover_width=row.group != "route"))
            for row in tqdm([r for r in rows if r.distill and r.group in groups], desc="distilling")]


def distilled(bed: Testbed, model, steps: int, *, recover_width: bool = True):
    """A copy of `model` distilled from the teacher for `steps` steps (graphopt.tiny.testbed.distill_settings)."""
    from graphopt.distill.run import distill

    with tempfile.TemporaryDirectory() as tmp:
        data = write_distill_data(bed.config, Path(tmp) / "data")
        routed = getattr(model.gm, "router", None) is not None
        settings = distill_settings(data, Path(tmp) / "run", steps, routed=routed, recover_width=recover_width,
                                    lr=bed.args.distill_lr, progress=False)
        return distill(model.copy(), bed.teacher, settings)


def recovery_rows(bed: Testbed, rows: list[Row], checkpoints: list[int]) -> list[Row]:
    """Every row marked `distill`, at each checkpoint step of ONE distillation run of max(checkpoints)
    steps (cosine schedule over the whole run, resumed from the trainer's checkpoint at each stop): the
    recovery curve. Step 0 is the row itself."""
    from graphopt.distill.run import distill

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_distill_data(bed.config, Path(tmp) / "data")
        for i, row in enumerate([r for r in rows if r.distill]):
            routed = getattr(row.model.gm, "router", None) is not None
            settings = distill_settings(data, Path(tmp) / f"run{i}", max(checkpoints), routed=routed,
                                        recover_width=row.group != "route", lr=bed.args.distill_lr)
            settings["run"]["resume"] = True
            settings["run"]["checkpoint_every"] = max(checkpoints)
            for k in checkpoints:
                start = time.perf_counter()
                model = row.model if k == 0 else distill(row.model.copy(), bed.teacher, settings, stop_at_step=k)
                out.append(Row(f"{row.name} + distill {k}", row.group, f"{row.family} + distill", model,
                               curve=row.name, distill_steps=k))
                print(f"{row.name}: {k} distillation steps ({time.perf_counter() - start:.0f} s)", flush=True)
    return out


def plot_recovery(results: list[dict], path: Path, title: str) -> None:
    """PNG: aggregate and colour / shape / direction against distillation steps, one line per curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.io import atomic_path

    keys = [("aggregate", "aggregate"), ("colour_accuracy", "colour"), ("shape_accuracy", "shape"),
            ("direction_adherence", "direction"), ("psnr_db", "PSNR dB vs teacher")]
    fig = Figure(figsize=(3.2 * len(keys), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys))
    curves = list(dict.fromkeys(r["curve"] for r in results if "curve" in r))
    for ax, (key, label) in zip(axes, keys):
        for c, curve in enumerate(curves):
            mine = [r for r in results if r.get("curve") == curve]
            ax.plot([r["distill_steps"] for r in mine], [r[key] for r in mine], marker="o", color=f"C{c}",
                    label=f"{curve} ({mine[-1]['flops']:.2f}x)")
        if key != "psnr_db":
            ax.axhline(0.9, color="0.6", lw=0.8, ls="--")
            ax.set_ylim(0, 1.05)
        ax.set_xticks(sorted({r["distill_steps"] for r in results if "curve" in r}))
        ax.set_xlabel("distillation steps (batch 8)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


# ---- measuring ------------------------------------------------------------------------------------

def measure(bed: Testbed, rows: list[Row], clips: int) -> tuple[list[dict], list]:
    """Per row: executed FLOPs of its sampling run (counted in that run) and mini-VBench vs the teacher's clips."""
    data = eval_conditions(bed.config, clips)
    results, grid = [], []
    reference = teacher_scores = teacher_flops = None
    for row in tqdm(rows, desc="sampling"):
        with row.context if row.context is not None else contextlib.nullcontext():
            videos, flops = count_flops(lambda: sample_clips(row.model, bed.config, data, **bed.sampling))
        if reference is None:                      # the teacher: fidelity columns against itself
            reference, teacher_flops = videos, flops
        scores = evaluate_clips(bed.config, videos, data, reference=reference)
        teacher_scores = teacher_scores or scores
        results.append({"name": row.name, "group": row.group, "family": row.family, "flops": flops / teacher_flops,
                        "executed_flops": flops, **scores, "aggregate": aggregate_score(scores, teacher_scores)})
        if row.curve is not None:
            results[-1].update(curve=row.curve, distill_steps=row.distill_steps)
        grid.append((row.name, videos))
    return results, grid


def add_latency(bed: Testbed, rows: list[Row], results: list[dict], repeats: int) -> float:
    """Adds `latency` (relative to the teacher) to the timed rows' results; returns the teacher's seconds."""
    feed = bed.calib[1]                             # one CFG pair of one clip
    calls = {row.name: (lambda m=row.model: m(**feed)) for row in rows if row.timed}
    latency = interleaved_latency(calls, repeats, 1, desc="timing")
    for result in results:
        if result["name"] in latency:
            result["latency"] = latency[result["name"]] / latency["teacher"]
    return latency["teacher"]


def render(results: list[dict], console: Console, title: str) -> list[str]:
    """The table on the console; returns it as markdown lines."""
    table = Table(title=title)
    header = ["model", "FLOPs", "CPU latency", "aggregate"] + [h for _, h, _ in METRICS]
    for h in header:
        table.add_column(h, justify="left" if h == "model" else "right")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in results:
        latency = f"{r['latency']:.2f}" if "latency" in r else "—"
        cells = [r["name"], f"{r['flops']:.2f}", latency, f"{r['aggregate']:.3f}"] + \
                [fmt.format(r[key]) for key, _, fmt in METRICS]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    return lines


def notes(bed: Testbed, groups: list[str], results: list[dict], command: str, wall_s: float,
          teacher_call_s: float) -> list[str]:
    teacher_flops = results[0]["executed_flops"]
    out = [f"command: `{command}` ({wall_s / 60:.1f} min wall, {bed.args.threads} thread(s))", "",
           f"FLOPs: torch FlopCounterMode over the whole sampling run ({bed.args.clips} clips, {bed.args.steps} "
           f"steps, CFG pair batched: one call of batch {2 * bed.args.clips} per step), matmuls, convolutions and "
           f"attention; the teacher's run counted {teacher_flops / 1e9:.1f} GFLOPs. aggregate: mean of "
           f"min(metric / teacher's, 1) over {', '.join(AGGREGATE_METRICS)}."]
    if "caches" in groups:
        out += ["", "diffusers caches: the sampler calls the transformer once per step with the CFG pair batched "
                "(unconditional first), so every cache keeps ONE state (one cache context) for both halves and a "
                "skip decision covers the whole batch (diffusers' pipelines call cond and uncond in separate "
                "contexts). FasterCache is built for this batched call: it drops the unconditional half on some "
                "steps. The cache's own bookkeeping (differences, norms) counts 0 FLOPs, as elementwise work does "
                "everywhere here. Latency is not given for the caches: one call's cost depends on the step.",
                f"MagCache ratios (calibrate=True, {bed.args.steps} steps, 4 calibration conditions): "
                f"{', '.join(f'{r:.3f}' for r in bed.mag_ratios)}; max_skip_steps 3, retention_ratio 0.2 (defaults).",
                "TaylorSeer at its defaults skips nothing on Wan: its default cache_identifiers "
                "(`^blocks.*attn`, matched with re.fullmatch) match no module name (Wan's are blocks.N.attn1 / "
                "attn2), so no hook is installed. The two other TaylorSeer rows name the modules: attn1, attn2 "
                "and ffn of every block, refreshed every 2nd step after 3 warm-up steps; lite mode (block outputs "
                "skipped, proj_out predicted)."]
    searches = bed.reuse_search
    if "reuse schedule" in searches:
        search = searches["reuse schedule"]
        out += ["", f"reuse schedule search (route skip=reuse; 4 calibration conditions, pooled MSE, temporal weight "
                    f"{bed.args.temporal_weight:g}, last {bed.args.last_computes} step(s) computing, max reuse in a "
                    f"row {search['max_reuse']}, lazy greedy): {search['model_calls']} model calls; coarse path "
                    + " ".join(f"{f:.3f}" for f in search["path"]) + "; each target refined block by block "
                    "within the unit that crosses it."]
    if "forecast timetable" in searches:
        search = searches["forecast timetable"]
        out += ["", f"forecast timetable search (route skip=forecast: a skipped block's last residual extrapolated "
                    f"along its last change; 4 calibration conditions, mean per-clip dB, max reuse in a row "
                    f"{search['max_reuse']}): {search['model_calls']} model calls; every whole-step timetable with "
                    "the most skipped steps above each target, the best refined block by block over its steps."]
    for label, search in searches.items():
        if label not in ("reuse schedule", "forecast timetable"):
            out += ["", f"{label} search: {search['model_calls']} model calls (lazy greedy, pooled MSE)."]
    if "prune" in groups:
        counts = bed.roles.counts()
        out += ["", f"head roles of the teacher on calibration clips: {counts['spatial']} spatial, "
                    f"{counts['temporal']} temporal, {counts['mixed']} mixed."]
    return out + ["", f"teacher call {teacher_call_s * 1e3:.1f} ms at {bed.args.threads} thread(s)."]


def write_json(path: Path, results: list[dict], bed: Testbed, command: str) -> None:
    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    payload = {"command": command, "clips": bed.args.clips, "steps": bed.args.steps, "guidance": bed.args.guidance,
               "seed": bed.args.seed, "rows": [{k: clean(v) for k, v in r.items()} for r in results]}
    atomic_write_text(path, json.dumps(payload, indent=1, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench_quality"))
    parser.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                        help=f"row groups, comma-separated, from {', '.join(ROW_BUILDERS)} (the teacher always runs; "
                             f"default: all but combo)")
    parser.add_argument("--targets", default="0.7,0.5", help="per-step FLOPs ratios, comma-separated")
    parser.add_argument("--clips", type=int, default=16, help="held-out conditions per row")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--distill-steps", type=int, default=60, help="0: no distilled rows")
    parser.add_argument("--distill-lr", type=float, default=3e-4, help="the student's peak learning rate (cosine)")
    parser.add_argument("--distill-rows", default="drop",
                        help="row groups whose rows also get a distilled copy (default drop, the static rows that "
                             "recover; prune,drop,route: the long mode; the recovery curve follows route too)")
    parser.add_argument("--combo-static", type=float, default=0.85,
                        help="combo rows: FLOPs per step of the pruned model under the reuse schedule")
    parser.add_argument("--repeats", type=int, default=5, help="latency: interleaved repeats")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads wait on each other)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-targets", default="0.5,0.35,0.25",
                        help="executed-FLOPs fractions of the learned reuse-schedule rows")
    parser.add_argument("--forecast-targets", default="0.5",
                        help="executed-FLOPs fractions of the forecast-timetable rows (route skip=forecast)")
    parser.add_argument("--forecast-max-reuse", type=int, default=2,
                        help="forecast timetable search: most steps in a row a block may forecast")
    parser.add_argument("--temporal-weight", type=float, default=0.0,
                        help="reuse schedule search: weight of the error's mean frame-to-frame change")
    parser.add_argument("--last-computes", type=int, default=0,
                        help="reuse schedule search: final sampling steps that always compute")
    parser.add_argument("--max-reuse", type=int, default=None,
                        help="reuse schedule search: most steps in a row a block may reuse one residual")
    parser.add_argument("--recovery", default="",
                        help="recovery curve: distillation steps, comma-separated (e.g. 0,100,300,1000); each "
                             "distillable row of --rows is scored at each, from one run; writes <out>/recovery.png")
    parser.add_argument("--json", type=Path, help="also write every row (name, flops, metrics, aggregate) here")
    args = parser.parse_args(argv)
    groups = [g for g in args.rows.split(",") if g]
    unknown = [g for g in groups if g not in ROW_BUILDERS]
    if unknown:
        parser.error(f"unknown row group(s) {', '.join(unknown)}: choose from {', '.join(ROW_BUILDERS)}")
    distillable = [g for g in ROW_BUILDERS if g in DISTILLABLE]
    wrong = [g for g in args.distill_rows.split(",") if g and g not in DISTILLABLE]
    if wrong:
        parser.error(f"--distill-rows {', '.join(wrong)}: only {', '.join(distillable)} rows are distilled "
                     "(combo follows --distill-steps; \"\" distils none)")
    if args.distill_lr <= 0 or not 0 < args.combo_static < 1:
        parser.error("--distill-lr must be > 0 and --combo-static in (0, 1)")
    if any(int(k) < 0 for k in args.recovery.split(",") if k):
        parser.error("--recovery steps must be ≥ 0")
    if args.clips < 1 or args.steps < 1:
        parser.error("--clips and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    console = Console(width=240)
    command = " ".join(["python tools/bench_quality.py"] + (argv if argv is not None else sys.argv[1:]))
    start = time.perf_counter()

    bed = Testbed(args)
    rows = [Row("teacher", "teacher", "teacher", bed.teacher)]
    for group in tqdm(groups, desc="building rows"):
        rows += ROW_BUILDERS[group](bed)
    checkpoints = sorted({int(k) for k in args.recovery.split(",") if k})
    if checkpoints:                     # the curve replaces the rows it follows
        rows = rows[:1] + recovery_rows(bed, rows, checkpoints) + [r for r in rows[1:] if not r.distill]
    elif args.distill_steps:
        rows += distilled_rows(bed, rows, args.distill_steps, [g for g in args.distill_rows.split(",") if g])
    results, grid = measure(bed, rows, args.clips)
    teacher_call_s = add_latency(bed, rows, results, args.repeats)

    title = (f"mini-VBench per executed FLOP: {args.clips} held-out conditions, {args.steps} steps, cfg "
             f"{args.guidance:g}; FLOPs and latency relative to the teacher")
    lines = render(results, console, title)
    note_lines = notes(bed, groups, results, command, time.perf_counter() - start, teacher_call_s)
    console.print("\n".join(note_lines))
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(["# Quality per executed FLOP (tools/bench_quality.py)", "", *lines, "", *note_lines, "",
                          "![Pareto](pareto.png)", "", "![frames](bench_quality.png)", ""])
    atomic_write_text(args.out / "bench_quality.md", markdown)
    save_frame_grid(args.out / "bench_quality.png", grid)
    plot_pareto(results, args.out / "pareto.png", title=title)
    if checkpoints:
        plot_recovery(results, args.out / "recovery.png",
                      f"recovery under distillation: {args.clips} held-out conditions, {args.steps} steps, cfg "
                      f"{args.guidance:g}")
    if args.json is not None:
        write_json(args.json, results, bed, command)
    console.print(f"wrote {args.out}/bench_quality.md, bench_quality.png, pareto.png"
                  + (f" and {args.json}" if args.json is not None else ""))


if __name__ == "__main__":
    main()
