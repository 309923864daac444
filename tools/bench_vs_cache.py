"""graphopt's deployed model against what users run today: whole sampling runs of the shipped teacher,
side by side in one process.

Rows (every one samples the same held-out conditions from the same noise: `--steps` Euler steps,
CFG `--guidance`, the CFG pair batched, graphopt.tiny.sample):

- "diffusers eager": diffusers' WanTransformer3DModel itself, no cache;
- "diffusers + FirstBlockCache T": the same model with diffusers' own FirstBlockCache
  (`enable_cache`, graphopt.diffusers_caches.CachedTransformer) at `--fbc-threshold` (0.3: the cache
  row whose quality matches the reuse schedule's in README's "Quality at equal compute" table);
- "graphopt torch / onnxruntime / aoti": the teacher routed with skip=reuse and a learned reuse
  schedule (graphopt.distill.reuse_schedule.fit_reuse_schedule at `--reuse-target`, searched on
  4 calibration conditions, as tools/bench_quality.py does; or read from `--schedule`, a JSON
  file with "computes" (steps × blocks booleans), e.g. this tool's own --json), run eagerly
  (GraphTransformer), as a single-file ONNX model in onnxruntime, and as an AOTInductor package.

Columns: wall seconds of one whole sampling run (median of `--repeats`, every row interleaved in
each repeat after one warm-up run), its ratio to diffusers + FirstBlockCache (the target: ≤ 0.8;
the median over repeats of the ratio of the two runs in the same repeat, `paired_ratio`),
the executed FLOPs of the run relative to the teacher's (torch FlopCounterMode over the run; a
compiled backend takes the same decisions as its eager graph, so it shares that count), and the
quality of the clips the first timed run made: PSNR vs the teacher's clips and mini-VBench's
aggregate (graphopt.eval), so "equal quality" is shown, not assumed.

    python tools/bench_vs_cache.py --json out/vs_cache.json                 # fits the schedule (a few minutes)
    python tools/bench_vs_cache.py --schedule out/vs_cache.json --repeats 7 # reuses its schedule
    python tools/bench_vs_cache.py --backends torch onnxruntime --clips 4 --steps 4 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

BACKENDS = ("torch", "onnxruntime", "aoti")


def build_student(teacher, config, args):
    """The reuse-routed teacher with its schedule: fitted here, or read from `args.schedule`."""
    from graphopt.compress import compress
    from graphopt.distill.reuse_schedule import fit_reuse_schedule, set_reuse_schedule
    from graphopt.errors import GraphoptError
    from graphopt.tiny import embed_tokens, generate
    from graphopt.tiny.testbed import CALIBRATION_SEED

    student = teacher.copy()
    compress(student, ["route"], {"route": {"mode": "schedule", "skip": "reuse", "select": "sign", "budget": 1.0,
                                            "timestep_bins": 1000, "ranking": list(range(len(teacher.blocks)))}})
    if args.schedule is not None:
        try:
            computes = torch.tensor(json.loads(args.schedule.read_text())["computes"], dtype=torch.bool)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GraphoptError(f"--schedule {args.schedule}: cannot read a 'computes' list of lists of booleans "
                                f"({type(e).__name__}: {e}); pass a --json file this tool wrote") from None
        if computes.ndim != 2 or tuple(computes.shape) != (args.steps, len(teacher.blocks)):
            raise GraphoptError(f"{args.schedule}: 'computes' is {list(computes.shape)}, expected steps × blocks "
                                f"[{args.steps}, {len(teacher.blocks)}]; fit a schedule for --steps {args.steps}")
        set_reuse_schedule(student, computes, steps=args.steps)
        return student, {"source": str(args.schedule), "computes": computes.tolist()}
    data = generate(config, args.fit_clips, seed=CALIBRATION_SEED)
    start = time.perf_counter()
    fit = fit_reuse_schedule(student, teacher, embed_tokens(config, data.tokens), video_shape=data.videos.shape[1:],
                             target=args.reuse_target, steps=args.steps, guidance=args.guidance, progress=True)
    return student, {"source": f"fitted at {args.reuse_target:g} on {args.fit_clips} calibration conditions "
                               f"({time.perf_counter() - start:.0f} s)",
                     "fraction": fit["fraction"], "computes": fit["computes"].tolist()}


def load_backend(backend: str, student, where: Path, threads: int):
    from graphopt.dropin import GraphTransformer

    if backend == "torch":
        model = GraphTransformer(student)
        model.router.record = False            # timing: no host copies of the decisions
        return model
    if backend == "onnxruntime":
        import onnxruntime

        from graphopt.exporters.onnx import export_onnx, load_onnx

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        return load_onnx(export_onnx(student, where / "onnx", layout="single"), session_options=options)
    from graphopt.exporters.aoti import export_aoti, load_aoti

    return load_aoti(export_aoti(student, where / "model.pt2"))


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over repeats of (this row's run ÷ the base row's run in the same repeat): on a
    loaded machine a repeat's runs share its load, so the pairs cancel drift that moves both
    medians (seen: one row's runs ranging 36–134 s within five repeats)."""
    return statistics.median(t / b for t, b in zip(times, base))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="graphopt's deployed backends to time (default: all three)")
    parser.add_argument("--fbc-threshold", type=float, default=0.3,
                        help="diffusers FirstBlockCache threshold (default 0.3: equal quality to the reuse schedule)")
    parser.add_argument("--reuse-target", type=float, default=0.5,
                        help="executed-FLOPs fraction the reuse schedule is fitted to (default 0.5)")
    parser.add_argument("--schedule", type=Path,
                        help="read the schedule ('computes') from this JSON instead of fitting")
    parser.add_argument("--fit-clips", type=int, default=4, help="calibration conditions the schedule is fitted on")
    parser.add_argument("--clips", type=int, default=16,
                        help="held-out conditions per run (default 16, as the README quality table; "
                             "the call batch is 2x)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps per run (default 10)")
    parser.add_argument("--guidance", type=float, default=4.0, help="CFG scale (default 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row, interleaved (median; default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--json", type=Path, help="also write the rows, the schedule and the settings here")
    args = parser.parse_args(argv)
    if min(args.clips, args.steps, args.repeats, args.threads, args.fit_clips) < 1:
        parser.error("--clips, --steps, --repeats, --threads and --fit-clips must be at least 1")

    from diffusers import FirstBlockCacheConfig
    from rich.console import Console
    from rich.table import Table
    from tqdm.auto import tqdm

    from graphopt.diffusers_caches import CachedTransformer
    from graphopt.dropin import GraphTransformer
    from graphopt.errors import GraphoptError
    from graphopt.eval import aggregate_score, evaluate_clips
    from graphopt.io import atomic_write_text
    from graphopt.tiny import load_tiny_teacher
    from graphopt.tiny.testbed import capture_teacher, eval_conditions, sample_clips
    from graphopt.yardstick import count_flops

    torch.set_num_threads(args.threads)
    console = Console(width=200)
    command = " ".join(["python tools/bench_vs_cache.py"] + (argv if argv is not None else sys.argv[1:]))
    teacher, config = capture_teacher()
    eager = load_tiny_teacher()[0]
    try:
        student, schedule = build_student(teacher, config, args)
    except GraphoptError as e:
        parser.error(str(e))
    data = eval_conditions(config, args.clips)
    sampling = {"steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    fbc = CachedTransformer(eager, FirstBlockCacheConfig(threshold=args.fbc_threshold), steps=args.steps)

    def cached_run():
        with fbc:                              # a fresh cache per run, as a pipeline call enables it
            return sample_clips(fbc, config, data, **sampling)

    fbc_name = f"diffusers + FirstBlockCache {args.fbc_threshold:g}"
    runs = {"diffusers eager": lambda: sample_clips(eager, config, data, **sampling), fbc_name: cached_run}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            t = time.perf_counter()
            model = load_backend(backend, student, Path(tmp) / backend, args.threads)
            console.print(f"graphopt {backend}: loaded in {time.perf_counter() - t:.0f} s")
            runs[f"graphopt {backend}"] = lambda m=model: sample_clips(m, config, data, **sampling)

        # Executed FLOPs: eager runs counted by FlopCounterMode; compiled backends take the eager graph's decisions.
        with torch.no_grad():
            _, teacher_flops = count_flops(runs["diffusers eager"])
            _, fbc_flops = count_flops(cached_run)
            _, student_flops = count_flops(lambda: sample_clips(GraphTransformer(student), config, data, **sampling))
        clips, times = {}, {name: [] for name in runs}
        with torch.no_grad():
            for name, run in tqdm(runs.items(), desc="warm-up runs"):   # first-call allocations, lazy inits
                clips[name] = run()
            for _ in tqdm(range(args.repeats), desc="timing (interleaved runs)"):
                for name, run in runs.items():
                    t = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - t)
    load = os.getloadavg()
    reference = clips["diffusers eager"]
    teacher_scores = evaluate_clips(config, reference, data, reference=reference)
    rows = []
    for name in runs:
        seconds = statistics.median(times[name])
        scores = evaluate_clips(config, clips[name], data, reference=reference)
        flops = teacher_flops if name == "diffusers eager" else fbc_flops if name == fbc_name else student_flops
        rows.append({"name": name, "seconds": seconds, "times": times[name],
                     "ratio_to_fbc": paired_ratio(times[name], times[fbc_name]),
                     "flops": flops / teacher_flops, "psnr_db": scores["psnr_db"],
                     "aggregate": aggregate_score(scores, teacher_scores)})

    table = Table(title=f"whole sampling runs: {args.clips} conditions, {args.steps} steps, CFG {args.guidance:g} "
                        f"(batch {2 * args.clips}), {args.threads} thread(s), median of {args.repeats}")
    for col in ("row", "wall s / run", "ratio to FBC", "FLOPs", "PSNR dB", "aggregate"):
        table.add_column(col, justify="left" if col == "row" else "right")
    for r in rows:
        table.add_row(r["name"], f"{r['seconds']:.3f}", f"{r['ratio_to_fbc']:.2f}", f"{r['flops']:.2f}",
                      f"{r['psnr_db']:.1f}" if math.isfinite(r["psnr_db"]) else "inf", f"{r['aggregate']:.3f}")
    console.print(table)
    console.print(f"schedule: {schedule['source']}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    result = {"command": command, "clips": args.clips, "steps": args.steps, "guidance": args.guidance,
              "threads": args.threads, "repeats": args.repeats, "fbc_threshold": args.fbc_threshold,
              "load_average": list(load), "rows": rows, **schedule}
    if args.json is not None:
        clean = json.loads(json.dumps(result), parse_constant=lambda _: None)   # inf PSNR (identical clips) → null
        atomic_write_text(args.json, json.dumps(clean, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
