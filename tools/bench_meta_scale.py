"""Structural compression of full-size architectures on the meta device (no weights in memory).

For Wan2.1-14B and HunyuanVideo-13B (graphopt.family_configs.PUBLISHED): capture, then prune 30% of the
heads of every block attention + drop 10% of the blocks + route the rest, with the decisions
given (as from a recipe computed on a GPU elsewhere: seeded choices here, since ranking needs
weights), and the cost model before/after. Each architecture runs in its own process, so its
peak RSS is its own. Goal: under 60 s and 2 GB each.

    python tools/bench_meta_scale.py                 # both architectures
    python tools/bench_meta_scale.py --arch hunyuan-video-13b
"""
import argparse
import json
import random
import resource
import subprocess
import sys
import time

import torch

PRUNE, DROP, BUDGET = 0.3, 0.1, 0.7
# Mochi-1 (also in PUBLISHED) captures on meta, but prune fails on its meta graph: the kept-head
# index buffers are made on the CPU and its per-head RoPE tables are computed on meta.
ARCHS = ("wan2.1-t2v-14b", "hunyuan-video-13b")


def run(name: str) -> dict:
    from graphopt import capture
    from graphopt.cost import model_cost
    from graphopt.families import build_model
    from graphopt.family_configs import PUBLISHED
    from graphopt.pass_manager import PassManager, get_pass

    config, spec = PUBLISHED[name]
    t0 = time.perf_counter()
    graph = capture(build_model(config, config, "meta"),
                    spec=spec.__class__(**{**spec.__dict__, "device": "meta"}))
    t_capture = time.perf_counter() - t0
    before = model_cost(graph)

    rng = random.Random(0)
    kept = {a.name: sorted(rng.sample(range(a.heads), a.heads - round(PRUNE * a.heads)))
            for a in graph.attentions.values() if a.prunable and a.block is not None}
    heads = max(a.heads for a in graph.attentions.values())
    n = len(graph.blocks)
    removed = sorted(rng.sample(range(n // 2), round(DROP * n)))     # among the shallow half
    survivors = n - len(removed)
    passes = [get_pass("prune")(heads=kept), get_pass("drop")(removed=removed),
              get_pass("route")(budget=BUDGET, ranking=list(reversed(range(survivors))))]
    t1 = time.perf_counter()
    PassManager(passes).run(graph)
    t_passes = time.perf_counter() - t1
    after = model_cost(graph)
    return {"arch": name, "blocks": f"{n} → {survivors}, all routed",
            "heads": f"{heads} → {sum(map(len, kept.values())) / len(kept):.0f} per attention",
            "params": (before.params, after.params), "flops": (before.flops, after.flops),
            "capture_s": t_capture, "passes_s": t_passes, "total_s": time.perf_counter() - t0,
            "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main():
    from graphopt.describe import human
    from graphopt.family_configs import PUBLISHED

    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(PUBLISHED))
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)   # child process
    args = parser.parse_args()
    if args.json:
        torch.set_num_threads(1)
        print(json.dumps(run(args.arch)))
        return
    rows = []
    for name in [args.arch] if args.arch else ARCHS:
        out = subprocess.run([sys.executable, __file__, "--arch", name, "--json"], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"| architecture (meta) | blocks | heads | params before → after | FLOPs/step before → "
          f"after (all blocks run) | at router budget {BUDGET} | capture | prune+drop+route | "
          f"total | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        (p0, p1), (f0, f1) = r["params"], r["flops"]
        print(f"| {r['arch']} | {r['blocks']} | {r['heads']} | {human(p0)} → {human(p1)} "
              f"({p1 / p0:.2f}x) | {human(f0)} → {human(f1)} ({f1 / f0:.2f}x) | "
              f"{human(BUDGET * f1)} ({BUDGET * f1 / f0:.2f}x) | {r['capture_s']:.1f} s | "
              f"{r['passes_s']:.1f} s | {r['total_s']:.1f} s | "
              f"{r['peak_gb']:.2f} GB |")


if __name__ == "__main__":
    main()
