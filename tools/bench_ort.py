"""onnxruntime CPU latency per denoising step of the routed tiny teacher at router budgets 1.0 / 0.75 / 0.5.

For each ONNX layout (single file with If blocks; segmented with host-side skipping) and budget:
executed-FLOPs ratio (what the router ran, from the cost model's per-block FLOPs, relative to the
unrouted model), latency ratio (vs the same layout at budget 1.0 with every block run), speedup
(1 / latency ratio) and efficiency = speedup / (1 / FLOPs ratio): 1.0 means skipped blocks cost
nothing and the rest runs as fast as before.

The teacher's own latent (3 x 8 x 12, 72 tokens) runs a step in about a millisecond, where fixed
per-call costs dominate; by default the teacher's architecture and weights are captured at a larger
latent (5 x 32 x 32: 1280 tokens per sample), batch 2 (one CFG pair). Every layout/budget is timed in
this one process, interleaved over repeats, median reported.

    python tools/bench_ort.py                       # both layouts, budgets 1.0 0.75 0.5
    python tools/bench_ort.py --frames 3 --height 8 --width 12   # the teacher's own latent
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from graphopt import PassManager, capture, model_cost
from graphopt.exporters.onnx import export_onnx, load_onnx
from graphopt.layout import InputSpec
from graphopt.passes.route import Route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--budgets", default="1.0,0.75,0.5")
    parser.add_argument("--layouts", default="single,segmented")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    spec = InputSpec(batch=1, frames=args.frames, height=args.height, width=args.width)
    base = capture("tiny-wan", spec=spec)
    cost = model_cost(base)
    block_flops = [b["flops"] for b in cost.blocks]
    budgets = [float(b) for b in args.budgets.split(",")]
    layouts = args.layouts.split(",")

    models, fractions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for budget in budgets:
            graph = base.copy()
            PassManager([Route(budget=budget)]).run(graph)
            for layout in layouts:
                path = export_onnx(graph, Path(tmp) / f"{layout}_{budget}", layout=layout)
                models[layout, budget] = load_onnx(path, providers=["CPUExecutionProvider"],
                                                   session_options=options)
        inputs = _batch2(base)
        for key, model in models.items():            # warm up, and the FLOPs each budget runs
            model(**inputs, return_dict=False)
            executed = model.records[-1].executed
            fractions[key] = (cost.flops - sum(block_flops) + sum(block_flops[b] for b in executed)) / cost.flops
        times = {key: [] for key in models}
        for _ in range(args.repeats):
            for key, model in models.items():
                start = time.perf_counter()
                model(**inputs, return_dict=False)
                times[key].append(time.perf_counter() - start)

    print(f"tiny-wan architecture + weights, latent {args.frames}x{args.height}x{args.width}, batch 2, "
          f"{args.threads} thread(s), onnxruntime CPU, median of {args.repeats}")
    print(f"{'layout':<10} {'budget':>6} {'blocks':>6} {'FLOPs ratio':>11} {'ms/step':>8} {'latency ratio':>13} "
          f"{'speedup':>7} {'efficiency':>10}")
    for layout in layouts:
        full = statistics.median(times[layout, budgets[0]])
        for budget in budgets:
            ms = statistics.median(times[layout, budget])
            flop_ratio = fractions[layout, budget]
            latency_ratio = ms / full
            speedup = 1 / latency_ratio
            efficiency = speedup * flop_ratio
            blocks = len(models[layout, budget].records[-1].executed)
            print(f"{layout:<10} {budget:>6.2f} {blocks:>6} {flop_ratio:>11.3f} {ms * 1e3:>8.2f} "
                  f"{latency_ratio:>13.3f} {speedup:>7.2f} {efficiency:>10.2f}")


def _batch2(graph) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in graph.example_inputs.items():
        if k == "return_dict":
            continue
        if k == "timestep":
            out[k] = torch.tensor([700.0, 300.0])
        else:
            out[k] = torch.randn((2,) + v.shape[1:], generator=g)
    return out


if __name__ == "__main__":
    main()
