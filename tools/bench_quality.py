"""Quality at matched compute: the shipped tiny teacher, compressed five ways, before and after distillation.

Rows, at each target per-step FLOPs ratio (--targets, default 0.7 and 0.5):

- prune, magnitude: attention heads (self and cross) with the smallest q/k/v/out weight norms removed;
- prune, sensitivity: the Taylor estimate of each head's output change, on real calibration clips;
- prune, role-aware: PARE's criterion (that sensitivity normalised per head role, temporal heads ×1.5);
- drop, hierarchical: VDMini's policy, whole shallow blocks removed (the deep half is protected);
- route: PARE's router (timestep + content) over every block, budget = the target;
- and each of those after a short distillation (graphopt.distill: output + ICD (+ MCA) losses, and the
  router budget loss for the routed row) on the generator's clips.

How the FLOPs are matched: heads are removed in score order until the cost model's FLOPs per step fall
to the target (the count is searched); blocks are removed one by one (each is 1/8 of the blocks'
FLOPs, so the ratio lands on the nearest step); the router runs at its budget, and its column shows
the mean per-clip fraction it executed while sampling. Columns: that FLOPs ratio, the CPU latency
ratio of one denoising call (a CFG pair of one clip, the median of --repeats interleaved runs, every
row timed in the same loop, --threads threads), then mini-VBench (graphopt.eval) on --clips held-out
conditions, every row sampled from the same noise (fidelity columns vs the teacher's clips).

Writes <out>/bench_quality.md (the table and the command) and <out>/bench_quality.png (clip 0 of
every row, same seed and condition).

    python tools/bench_quality.py --out out/bench_quality                 # the README's table
    python tools/bench_quality.py --clips 4 --distill-steps 0 --targets 0.5   # a quick look
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from graphopt.bench import interleaved_latency
from graphopt.compress import compress
from graphopt.cost import model_cost
from graphopt.eval import evaluate_clips
from graphopt.io import atomic_write_text
from graphopt.passes.block_importance import block_importance, rank_blocks
from graphopt.passes.head_roles import head_roles
from graphopt.passes.importance import head_importance
from graphopt.passes.prune import select_heads
from graphopt.tiny.testbed import (calibration_inputs, capture_teacher, distill_settings, eval_conditions,
                                   quality, save_frame_grid, write_distill_data)

METRICS = [("colour_accuracy", "colour", "{:.3f}"), ("shape_accuracy", "shape", "{:.3f}"),
           ("subject_consistency", "subject", "{:.3f}"), ("motion_smoothness", "smooth", "{:.3f}"),
           ("motion_rmse_px", "rmse px", "{:.2f}"), ("direction_adherence", "direction", "{:.3f}"),
           ("temporal_flicker", "flicker", "{:.3f}"), ("psnr_db", "PSNR dB", "{:.1f}"),
           ("relative_error", "rel err", "{:.3f}")]


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


def dropped_to(teacher, ranking: list[int], target: float):
    """The teacher with the number of hierarchical-policy blocks removed whose FLOPs ratio is nearest target."""
    n = len(teacher.blocks)
    options = []
    for count in range(1, n // 2 + 1):               # protect_deep 0.5: only the shallow half may go
        graph = teacher.copy()
        compress(graph, ["drop"], {"drop": {"removed": sorted(ranking[n - count:])}})
        options.append((abs(flops_ratio(graph, teacher) - target), graph))
    return min(options, key=lambda o: o[0])[1]


def routed_at(teacher, target: float):
    graph = teacher.copy()
    compress(graph, ["route"], {"route": {"budget": target}})
    return graph


def distilled(student, teacher, data_folder: Path, run_dir: Path, steps: int):
    """A distilled copy of `student` (graphopt.tiny.testbed.distill_settings)."""
    from graphopt.distill.run import distill

    routed = getattr(student.gm, "router", None) is not None
    return distill(student.copy(), teacher, distill_settings(data_folder, run_dir, steps, routed=routed,
                                                             progress=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench_quality"))
    parser.add_argument("--targets", default="0.7,0.5", help="per-step FLOPs ratios, comma-separated")
    parser.add_argument("--clips", type=int, default=16, help="held-out conditions per row")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--distill-steps", type=int, default=200, help="0: no distilled rows")
    parser.add_argument("--repeats", type=int, default=5, help="latency: interleaved repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    targets = [float(t) for t in args.targets.split(",") if t]
    torch.set_num_threads(args.threads)
    console = Console(width=220)
    command = " ".join(["python tools/bench_quality.py"] + (argv if argv is not None else sys.argv[1:]))

    teacher, config = capture_teacher()
    calib = calibration_inputs(config)
    console.print("ranking heads (magnitude; sensitivity and role-aware on calibration clips) and blocks ...")
    attentions = [a.name for a in teacher.attentions.values() if a.prunable and a.kind in ("self", "cross")
                  and a.block is not None]
    roles = head_roles(teacher, inputs=calib)
    magnitude = head_importance(teacher, "magnitude", attentions=attentions)
    sensitivity = head_importance(teacher, "sensitivity", attentions=attentions, inputs=calib)
    role_aware = head_importance(teacher, "role-aware", attentions=attentions, inputs=calib, roles=roles)
    ranking = rank_blocks(block_importance(teacher).scores(), "hierarchical", 0.5)

    rows = [("teacher", teacher)]
    for target in tqdm(targets, desc="compressing"):
        rows += [(f"prune magnitude @{target:g}", pruned_to(teacher, magnitude, target)),
                 (f"prune sensitivity @{target:g}", pruned_to(teacher, sensitivity, target)),
                 (f"prune role-aware @{target:g}", pruned_to(teacher, role_aware, target)),
                 (f"drop hierarchical @{target:g}", dropped_to(teacher, ranking, target)),
                 (f"route @{target:g}", routed_at(teacher, target))]
    if args.distill_steps:
        with tempfile.TemporaryDirectory() as tmp:
            data = write_distill_data(config, Path(tmp) / "data")
            for i, (name, graph) in enumerate(tqdm(rows[1:], desc="distilling")):
                rows.append((f"{name} + distill", distilled(graph, teacher, data, Path(tmp) / f"run{i}",
                                                            args.distill_steps)))

    data = eval_conditions(config, args.clips)
    sampling = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    results, grid = [], []
    reference = None
    for name, graph in tqdm(rows, desc="sampling"):
        router = getattr(graph.gm, "router", None)
        with router.recording() if router is not None else contextlib.nullcontext():
            scores, clips = quality(graph, config, data, reference, **sampling)
            if router is not None:
                fractions = [f for step in router.step_flops() for f in step["sample_fractions"]]
        if reference is None:                      # the teacher: fidelity columns against itself
            reference = clips
            scores = evaluate_clips(config, clips, data, reference=reference)
        flops = sum(fractions) / len(fractions) if router is not None else flops_ratio(graph, teacher)
        results.append((name, flops, scores))
        grid.append((name, clips))

    def call(graph):
        feed = calib[1]
        return lambda: graph(**feed)
    latency = interleaved_latency({name: call(graph) for name, graph in rows}, args.repeats, 1, desc="timing")

    table = Table(title=f"mini-VBench at matched FLOPs: {args.clips} held-out conditions, {args.steps} steps, "
                        f"cfg {args.guidance:g}; latency: one CFG-pair call, {args.threads} CPU threads")
    header = ["model", "FLOPs", "CPU latency"] + [h for _, h, _ in METRICS]
    for h in header:
        table.add_column(h, justify="left" if h == "model" else "right")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, flops, scores in results:
        cells = [name, f"{flops:.2f}", f"{latency[name] / latency['teacher']:.2f}"] + \
                [fmt.format(scores[key]) for key, _, fmt in METRICS]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    counts = roles.counts()
    notes = [f"command: `{command}`", "",
             f"head roles of the teacher on calibration clips: {counts['spatial']} spatial, "
             f"{counts['temporal']} temporal, {counts['mixed']} mixed; teacher call "
             f"{latency['teacher'] * 1e3:.1f} ms at {args.threads} threads."]
    console.print("\n".join(notes))

    args.out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(["# Quality at matched compute (tools/bench_quality.py)", "", *lines, "", *notes, "",
                          "![frames](bench_quality.png)", ""])
    atomic_write_text(args.out / "bench_quality.md", markdown)
    save_frame_grid(args.out / "bench_quality.png", grid)
    console.print(f"wrote {args.out}/bench_quality.md and bench_quality.png")


if __name__ == "__main__":
    main()
