"""Does head pruning save time in proportion to the FLOPs it removes? (CPU, eager PyTorch)

Prunes the small Wan of tools/bench_models.py at each ratio (magnitude criterion: calibration is
not what is measured here), checks the cost model's prediction against the pruned graph, and
times original and pruned graphs interleaved in one process. Prints a markdown table.

    python tools/bench_prune.py [--ratios 0.25 0.5] [--repeats 30] [--threads 1]
"""
import argparse

import torch

from bench_models import SPEC, WAN_SMALL
from graphopt import capture, model_cost
from graphopt.bench import interleaved_latency
from graphopt.describe import human
from graphopt.families import build_model
from graphopt.passes.prune import Prune


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    graph = capture(build_model("wan", WAN_SMALL), spec=SPEC)
    inputs = graph.example_inputs
    base = model_cost(graph)
    pruned = {}
    for ratio in args.ratios:
        g = graph.copy()
        Prune(ratio=ratio, criterion="magnitude").run(g)
        pruned[ratio] = g
    calls = {"original": lambda: graph.gm(**inputs)}
    calls.update({r: (lambda g=g: g.gm(**inputs)) for r, g in pruned.items()})
    latency = interleaved_latency(calls, args.repeats, args.warmup)

    heads = sum(a.heads for a in graph.attentions.values())
    print(f"Wan {len(graph.blocks)} blocks, {heads} attention heads (self + cross), dim 256, latent "
          f"{SPEC.frames}x{SPEC.height}x{SPEC.width} ({human(base.flops)} FLOPs/step), CPU, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| prune ratio | heads kept | params ratio | FLOPs ratio | latency/step | "
          "latency ratio | speedup | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| 0 | {heads} | 1.000 | 1.000 | {latency['original'] * 1e3:.1f} ms | 1.000 | 1.00x | |")
    for ratio, g in pruned.items():
        cost = model_cost(g)
        kept = sum(a.heads for a in g.attentions.values())
        flops, lat = cost.flops / base.flops, latency[ratio] / latency["original"]
        print(f"| {ratio:g} | {kept} | {cost.params / base.params:.3f} | {flops:.3f} | "
              f"{latency[ratio] * 1e3:.1f} ms | {lat:.3f} | {1 / lat:.2f}x | {flops / lat:.2f} |")
    print("\nefficiency = speedup / (1 / FLOPs ratio): 1.0 means time falls exactly with FLOPs.")


if __name__ == "__main__":
    main()
