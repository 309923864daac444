"""Does routing save time in proportion to the FLOPs it skips? (CPU, eager PyTorch)

Routes a small-but-not-tiny Wan model (8 blocks, width 256, latent 16 × 4 × 16 × 16: 256 video
tokens) with the router at its initial, importance-ranked policy, then for each inference budget
measures the executed FLOPs fraction (from the router's recorded decisions and the cost model)
and the latency per step (median of --repeats calls, configurations interleaved in one process so
drift hits them alike). Prints a markdown table; `deviation` = |latency ratio − FLOPs ratio| /
FLOPs ratio, against the unrouted model.

    python tools/bench_route.py [--repeats 30] [--threads 1] [--budgets 1.0 0.75 0.5]
"""
import argparse

import torch

from bench_models import SPEC, WAN_SMALL
from graphopt import capture
from graphopt.bench import interleaved_latency
from graphopt.describe import human
from graphopt.families import build_model
from graphopt.passes.route import Route


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.75, 0.5])
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    graph = capture(build_model("wan", WAN_SMALL), spec=SPEC)
    inputs = {**graph.example_inputs, "timestep": torch.tensor([500.0])}
    routed = graph.copy()
    Route(budget=min(args.budgets)).run(routed)
    router = routed.gm.router

    # "every gate off" runs only what is outside the routable blocks: the always-paid part.
    configs = [("original", None)] + [(f"routed, budget {b:g}", b) for b in args.budgets] + \
        [("every gate off", "off")]
    fractions, blocks_run = {}, {}

    def call(budget):
        if budget is None:
            return graph.gm(**inputs)
        router.force_gates = False if budget == "off" else None
        if budget != "off":
            router.budget = budget
        return routed.gm(**inputs)

    with torch.no_grad():
        for name, budget in configs:
            if budget is not None:
                router.clear_history()
                call(budget)
                [step] = router.step_flops()
                fractions[name], blocks_run[name] = step["fraction"], step["blocks_run"]
    router.record = False
    latency = interleaved_latency({name: (lambda b=budget: call(b)) for name, budget in configs},
                                  args.repeats, args.warmup)

    base = latency["original"]
    total_flops = router.fixed_flops + sum(router.block_flops)
    print(f"Wan {len(graph.blocks)} blocks, dim 256, latent {SPEC.frames}x{SPEC.height}x"
          f"{SPEC.width} ({human(total_flops)} FLOPs/step), CPU, {args.threads} thread(s), "
          f"median of {args.repeats}\n")
    print("| run | blocks run | FLOPs ratio | latency/step | latency ratio | deviation |")
    print("|---|---|---|---|---|---|")
    print(f"| original | {len(graph.blocks)} | 1.000 | {base * 1e3:.1f} ms | 1.000 | |")
    worst = 0.0
    for name, _ in configs[1:-1]:
        ratio, flops = latency[name] / base, fractions[name]
        deviation = abs(ratio - flops) / flops
        worst = max(worst, deviation)
        print(f"| {name} | {blocks_run[name]} | {flops:.3f} | {latency[name] * 1e3:.1f} ms | "
              f"{ratio:.3f} | {deviation:.1%} |")
    verdict = "within" if worst <= args.tolerance else "OUTSIDE"
    print(f"\nworst deviation {worst:.1%}: {verdict} the {args.tolerance:.0%} target")
    off = latency["every gate off"]
    print(f"always-running part (every gate off): {off * 1e3:.1f} ms = {off / base:.1%} of the "
          f"latency, {fractions['every gate off']:.1%} of the FLOPs (elementwise work the FLOPs "
          f"count leaves out: rotary tables, norms, unpatchify)")


if __name__ == "__main__":
    main()
