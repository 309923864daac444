"""`graphopt demo`: the whole toolchain on the shipped tiny teacher (tiny-wan), start to finish.

    inspect → head roles → compress (route, skip = reuse) → fit the reuse schedule → export ONNX
    → bench → sample and score

Every stage is the library's own API (what `graphopt inspect/compress/export/bench` call, and
`graphopt.distill.reuse_schedule`);
the demo only chooses small settings and collects the results into one report folder:

    summary.md / summary.json   what each stage did, how long it took, and the numbers
    inspect.json                the teacher's structure and cost (`graphopt inspect --json`)
    head_roles.png / .md        temporal score per head (calibration clips of the training data)
    compressed/                 the `graphopt compress` folder (recipe, weights, report, plots)
    onnx/model.onnx             single-file ONNX export (one If per routed block, cache slots as
                                inputs/outputs)
    bench.png / bench.json      teacher vs student latency per step, torch and onnxruntime
    router_decisions.png        which blocks the router ran at each sampling step
    compute_per_step.png        executed FLOPs fraction per sampling step
    frames.png                  teacher vs student clips from the same noise and condition
    quality.md                  mini-VBench of both (graphopt.eval)

`quick` (CI) runs every stage with fewer steps, clips and repeats.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graphopt.io import atomic_dir, atomic_write_text


@dataclass(frozen=True)
class DemoSettings:
    reuse_target: float = 0.5          # executed FLOPs fraction of a whole sampling run
    fit_clips: int = 4                 # calibration conditions the reuse schedule is searched on
    clips: int = 8                     # quality: held-out conditions
    sample_steps: int = 10
    bench_repeats: int = 5
    bench_backends: tuple[str, ...] = ("torch", "onnxruntime")


FULL = DemoSettings()
# Quick: onnxruntime is still checked against PyTorch at export; only its timing (two more exports) is left out.
QUICK = DemoSettings(fit_clips=1, clips=2, sample_steps=4, bench_repeats=2, bench_backends=("torch",))


def run_demo(out: str | Path, *, quick: bool = False, threads: int | None = None, console=None,
             overwrite: bool = False) -> dict:
    """Run every stage on tiny-wan, write the report folder `out`, return the summary dict.

    `out` is checked before the first stage (graphopt.io.check_output_dir: a folder holding files
    graphopt did not write needs `overwrite`) and appears whole, every file its summary links
    included, when the last stage is done."""
    from rich.console import Console

    console = console or Console()
    settings = QUICK if quick else FULL
    if threads is not None:
        torch.set_num_threads(threads)
    total = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite, what="graphopt demo") as work:
        console.print(f"[bold]graphopt demo[/] on tiny-wan ({'quick' if quick else 'full'}), "
                      f"report in {out}/")
        summary = _write_report(work, settings, quick, console, total)
    console.print(f"[bold]done[/] in {summary['seconds']:.0f} s; read {out}/summary.md")
    return summary


def _write_report(out: Path, settings: DemoSettings, quick: bool, console, total: float) -> dict:
    """Every stage, writing into `out` (the report folder, under its temporary name)."""
    stages: list[dict] = []

    cpu = [time.process_time()]

    def stage(name: str, detail: str, started: float, **numbers) -> None:
        # CPU seconds too: on a machine other jobs load, wall time says more about them than the stage.
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu[0]
        cpu[0] = time.process_time()
        stages.append({"stage": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                       "detail": detail, **numbers})
        console.print(f"[green]✓[/] [bold]{name}[/] ({seconds:.1f} s, {cpu_seconds:.1f} s CPU): {detail}")

    # 1. inspect: structure, cost, and the heads' roles on clips of the training data.
    from graphopt.describe import describe, human, render
    from graphopt.passes.head_roles import head_roles
    from graphopt.tiny.testbed import calibration_inputs, capture_teacher

    t = time.perf_counter()
    teacher, config = capture_teacher()
    info = describe(teacher)
    render(info, console)
    atomic_write_text(out / "inspect.json", json.dumps(info, indent=2, default=str))
    calib = calibration_inputs(config)
    roles = head_roles(teacher, inputs=calib)
    roles.plot(out / "head_roles.png")
    atomic_write_text(out / "head_roles.md", roles.to_markdown() + "\n")
    counts = roles.counts()
    stage("inspect", f"{len(teacher.blocks)} blocks, {len(teacher.attentions)} attentions; head roles "
          f"{counts['spatial']} spatial / {counts['temporal']} temporal / {counts['mixed']} mixed", t,
          head_roles=counts, flops_per_step=info["totals"]["flops_per_step"])

    # 2. compress: every block routed, a skipped block giving back its cached residual (reuse).
    from graphopt.compress import compress

    t = time.perf_counter()
    student = teacher.copy()
    report = compress(student, ["route"],
                      {"route": {"mode": "schedule", "skip": "reuse", "select": "sign",
                                 "budget": 1.0, "timestep_bins": 1000,
                                 # the schedule is fitted next: no block ranking to start from
                                 "ranking": list(range(len(teacher.blocks)))}},
                      out=out / "compressed", console=console)
    stage("compress", f"route every block with residual reuse (a schedule router: which blocks "
          f"recompute at which step); static FLOPs/step {human(report['before']['flops_per_step'])}",
          t, params_ratio=report["after"]["params"] / report["before"]["params"])

    # 3. fit: the schedule, searched on unrolled sampling runs of calibration conditions.
    from graphopt.distill.reuse_schedule import fit_reuse_schedule
    from graphopt.tiny import embed_tokens, generate
    from graphopt.tiny.testbed import CALIBRATION_SEED

    t = time.perf_counter()
    data = generate(config, settings.fit_clips, seed=CALIBRATION_SEED)
    fit = fit_reuse_schedule(student, teacher, embed_tokens(config, data.tokens),
                             video_shape=data.videos.shape[1:], target=settings.reuse_target,
                             steps=settings.sample_steps, progress=True)
    # The chosen schedule's numbers, not the search path's last point (which may lie past the target).
    stage("fit", f"reuse schedule on {settings.fit_clips} calibration conditions: executed FLOPs "
          f"{fit['path'][0]['fraction']:.2f} → {fit['fraction']:.2f} of the teacher's (target "
          f"{settings.reuse_target:g}), clip error vs the teacher {fit['error']:.2g}", t,
          executed_fraction=fit["fraction"], clip_error=fit["error"])

    # 4. export: single-file ONNX, checked against the PyTorch student in onnxruntime.
    from graphopt.exporters.onnx import export_onnx, load_onnx
    from graphopt.pass_manager import rel_error

    t = time.perf_counter()
    path = export_onnx(student, out / "onnx")
    onnx_model = load_onnx(path)
    feed = {k: v for k, v in calib[1].items() if k != "return_dict"}
    with torch.no_grad():
        expected = student(**calib[1])[0]
    got = torch.as_tensor(onnx_model(**feed, return_dict=False)[0])
    onnx_error = float(rel_error(got, expected))
    stage("export", f"{path.relative_to(out)} ({path.stat().st_size / 1e6:.1f} MB), onnxruntime vs PyTorch "
          f"rel. error {onnx_error:.1e}", t, onnx_rel_error=onnx_error)

    # 5. bench: teacher vs student per step, eager PyTorch and onnxruntime, in one process.
    from graphopt.bench import bench, plot

    t = time.perf_counter()
    timing = bench(teacher, student, backends=settings.bench_backends, steps=4,
                   repeats=settings.bench_repeats, warmup=1, onnx_models={"compressed": onnx_model})
    plot(timing, out / "bench.png")
    atomic_write_text(out / "bench.json", json.dumps(timing, indent=2))
    speedups = {r["backend"]: r["speedup"] for r in timing["backends"]}
    stage("bench", f"FLOPs speedup {timing['flops_speedup']:.2f}x; latency speedup "
          + ", ".join(f"{b} {s:.2f}x" for b, s in speedups.items()), t,
          flops_speedup=timing["flops_speedup"], latency_speedup=speedups, skipped=timing["skipped"])

    # 6. quality: sample with both from the same noise; router decisions and compute per step.
    from graphopt.eval import evaluate_clips
    from graphopt.tiny.testbed import eval_conditions, sample_clips, save_frame_grid

    t = time.perf_counter()
    conditions = eval_conditions(config, settings.clips)
    sampling = {"steps": settings.sample_steps, "guidance": 4.0, "seed": 0}
    teacher_clips = sample_clips(teacher, config, conditions, **sampling)
    router = student.gm.router
    with router.recording():
        student_clips = sample_clips(student, config, conditions, **sampling)
        router.plot_decisions(out / "router_decisions.png", names=[f"block {i}" for i in range(router.n_blocks)])
        per_step = router.step_flops()
    # The router's fractions are of the student's dense FLOPs; the plot and summary use the teacher's.
    scale = (router.fixed_flops + sum(router.block_flops)) / info["totals"]["flops_per_step"]
    per_step = [{"step": s["step"], "batch": s["fraction"] * scale,
                 "clip": scale * sum(s["sample_fractions"]) / len(s["sample_fractions"])} for s in per_step]
    _plot_compute(out / "compute_per_step.png", per_step)
    scores = {"teacher": evaluate_clips(config, teacher_clips, conditions, reference=teacher_clips),
              "student": evaluate_clips(config, student_clips, conditions, reference=teacher_clips),
              "training data": evaluate_clips(config, conditions.videos, conditions)}
    save_frame_grid(out / "frames.png", [("data", conditions.videos), ("teacher", teacher_clips),
                                         ("student", student_clips)])
    atomic_write_text(out / "quality.md", _quality_markdown(scores))
    fraction = sum(s["clip"] for s in per_step) / len(per_step)
    stage("quality", f"{settings.clips} clips × {settings.sample_steps} steps: motion smoothness teacher "
          f"{scores['teacher']['motion_smoothness']:.2f} / student {scores['student']['motion_smoothness']:.2f}, "
          f"PSNR vs teacher {scores['student']['psnr_db']:.1f} dB, FLOPs per step {fraction:.2f}x the teacher's", t,
          scores=scores, executed_fraction=fraction)

    summary = {"model": "tiny-wan", "mode": "quick" if quick else "full", "threads": torch.get_num_threads(),
               "seconds": round(time.perf_counter() - total, 1), "settings": settings.__dict__, "stages": stages}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(out / "summary.md", _summary_markdown(summary, scores))
    return summary


def _plot_compute(path: Path, per_step: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.io import atomic_path

    fig = Figure(figsize=(5, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [s["step"] for s in per_step]
    ax.plot(steps, [s["batch"] for s in per_step], marker="o", label="executed (a block runs if any clip needs it)")
    ax.plot(steps, [s["clip"] for s in per_step], marker=".", ls="--", label="per clip (mean)")
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("sampling step (noise → clean)")
    ax.set_ylabel("FLOPs / teacher's")
    ax.set_title("compute per sampling step, reuse-routed student", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


QUALITY_COLUMNS = ("colour_accuracy", "shape_accuracy", "subject_consistency", "motion_smoothness",
                   "direction_adherence", "temporal_flicker", "psnr_db", "relative_error")


def _quality_markdown(scores: dict) -> str:
    lines = ["| clips | " + " | ".join(QUALITY_COLUMNS) + " |", "|---" * (len(QUALITY_COLUMNS) + 1) + "|"]
    for name, values in scores.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[c]:.3f}" if c in values else "" for c in QUALITY_COLUMNS)
                     + " |")
    return "\n".join(lines) + "\n"


def _summary_markdown(summary: dict, scores: dict) -> str:
    lines = [f"# graphopt demo: tiny-wan ({summary['mode']}, {summary['threads']} threads, "
             f"{summary['seconds']:.0f} s)", "", "| stage | seconds | CPU seconds | what happened |",
             "|---|---:|---:|---|"]
    lines += [f"| {s['stage']} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | {s['detail']} |"
              for s in summary["stages"]]
    lines += ["", "## Quality (mini-VBench)", "", _quality_markdown(scores),
              "![frames](frames.png)", "", "## Head roles", "", "![head roles](head_roles.png)", "",
              "## Router decisions and compute per step", "", "![decisions](router_decisions.png)",
              "![compute](compute_per_step.png)", "", "## Latency", "", "![bench](bench.png)", ""]
    return "\n".join(lines)
