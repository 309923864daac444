"""Speed at real block sizes (CPU): do graphopt's compressions save time in proportion to FLOPs?

Builds diffusers' WanTransformer3DModel at the width of Wan2.1-1.3B (dim 1536, 12 heads, FFN 8960)
and of Wan2.1-14B (dim 5120, 40 heads, FFN 13824) with random weights and only `--blocks` blocks,
at a latent small enough for a 2-core machine, and measures, per backend (torch eager,
onnxruntime single-file export, AOTInductor on request):

- rows: original; prune 50% of heads; prune 50% of heads and 50% of FFN channels (multiples of
  128); route at budget 0.5 of the blocks' FLOPs ("half": the router fits whole blocks under its
  budget, the always-running part included, so the budget given is that part plus half the
  blocks' share: half the blocks run); reuse-route (skip=reuse); the cache pass (first-block,
  `--cache-threshold`, diffusers' default 0.05). Rankings are given or by magnitude:
  calibration is not what is measured, and with random weights any ranking is as good.
- executed FLOPs per step: torch's FlopCounterMode over the whole workload in eager PyTorch
  (`graphopt.yardstick.count_flops`): a skipped block, a cache hit, a pruned head or channel are
  counted as work not done. Backend-independent: every backend takes the same decisions.
- latency per step: one whole Euler sampling run of `steps` calls, each model integrating its own
  outputs (`graphopt.bench.Workload`, the workload of `graphopt bench`: a cache sees a new run and
  drifting inputs), median over `--repeats`, ÷ steps, every row of a backend interleaved.
- efficiency = latency speedup / executed-FLOPs speedup, both against the original on the same
  backend, in this one process (1.0: time falls exactly as FLOPs do).
- overhead = what the router, its gates and the cache's decision and residual copies cost,
  as a share of the original's step: latency(all on) / latency(original) - 1, where "all on" is
  the same pass with every block run (route and reuse-route at budget 1.0, cache at threshold 0).
  A difference of two medians: on a shared machine, values within a percent or two of zero are
  noise.

    nice -n 10 python tools/bench_real_size.py [--sizes 1.3b 14b] [--backends torch onnxruntime]
        [--blocks 2] [--steps 3] [--repeats 3] [--threads 2] [--json PATH]
    python tools/bench_real_size.py --full-size-flops   # prune FLOPs on the whole architectures
    python tools/bench_real_size.py --sizes 1.3b --threads 1 --profile-onnxruntime   # per-op kernel time
"""
import argparse
import json
import tempfile
from pathlib import Path

import torch

from graphopt import capture, model_cost
from graphopt.bench import interleaved_latency, load_backend, workload
from graphopt.describe import human
from graphopt.dropin import GraphTransformer
from graphopt.families import build_model
from graphopt.layout import InputSpec
from graphopt.io import atomic_path
from graphopt.passes.cache import Cache
from graphopt.passes.prune import Prune
from graphopt.passes.route import Route
from graphopt.yardstick import count_flops

_COMMON = {"patch_size": [1, 2, 2], "attention_head_dim": 128, "in_channels": 16,
           "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True,
           "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}
# Width of the published configs; latent sizes chosen to fit a 2-core CPU (tokens after patchify:
# 1.3b 4 x 8 x 8 = 256, 14b 2 x 4 x 8 = 64; 64 text tokens).
SIZES = {
    "1.3b": ({**_COMMON, "num_attention_heads": 12, "ffn_dim": 8960},
             InputSpec(frames=4, height=16, width=16, text_len=64)),
    "14b": ({**_COMMON, "num_attention_heads": 40, "ffn_dim": 13824},
            InputSpec(frames=2, height=8, width=16, text_len=64)),
}
BACKENDS = ("torch", "onnxruntime", "aoti")


def rows(graph, blocks: int, cache_threshold: float) -> dict[str, tuple]:
    """name -> (graph, name of its all-on twin or None)."""
    ranking = tuple(reversed(range(blocks)))       # given: no block-importance calibration
    # The router fits whole blocks under the budget, the always-running part included: a budget
    # of exactly that part plus half the blocks' FLOPs runs half the blocks.
    cost = model_cost(graph)
    fixed = 1.0 - sum(cost.block_flops()) / cost.flops
    half = fixed + 0.5 * (1.0 - fixed) + 1e-6
    originals = dict(graph.gm.named_parameters())

    def passed(p):
        g = graph.copy()
        p.run(g)
        # Unchanged weights shared with the original: real-size copies do not fit in memory.
        for name, value in list(g.gm.named_parameters()):
            if name in originals and originals[name].shape == value.shape \
                    and torch.equal(originals[name], value):
                g.set_param(name, originals[name])
        return g

    out = {"original": (graph, None),
           "prune 50% heads": (passed(Prune(ratio=0.5, criterion="magnitude", per_layer=True)),
                               None),
           "prune 50% heads + FFN": (passed(Prune(ratio=0.5, ffn_ratio=0.5, per_layer=True,
                                                  criterion="magnitude")), None)}
    for name, skip in (("route half", "identity"), ("reuse-route half", "reuse")):
        out[name] = (passed(Route(budget=half, ranking=ranking, skip=skip)), name + " all on")
        out[name + " all on"] = (passed(Route(budget=1.0, ranking=ranking, skip=skip)), None)
    out["cache first-block"] = (passed(Cache(method="first-block", threshold=cache_threshold)),
                                "cache all on")
    out["cache all on"] = (passed(Cache(method="first-block", threshold=0.0)), None)
    return out


def load(backend: str, graph, where: Path):
    """The graph on `backend`; the ONNX export has fixed shapes (what a benchmark deploys)."""
    if backend == "onnxruntime":
        from graphopt.exporters.onnx import export_onnx, load_onnx

        return load_onnx(export_onnx(graph, where, layout="single", dynamic=False))
    return load_backend(backend, graph, where)


def measure(size: str, args) -> list[dict]:
    config, spec = SIZES[size]
    model = build_model("wan", {**config, "num_layers": args.blocks})
    graph = capture(model, spec=spec)
    graph.source = f"random Wan2.1-{size} width, {args.blocks} blocks"
    built = rows(graph, args.blocks, args.cache_threshold)
    work = workload(graph, args.steps)

    flops = {}
    with torch.no_grad():
        for name, (g, _) in built.items():
            m = GraphTransformer(g)
            _, counted = count_flops(lambda: work.run(m))
            flops[name] = counted / args.steps
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            loaded = {name: load(backend, g, Path(tmp) / f"{backend}-{i}")
                      for i, (name, (g, _)) in enumerate(built.items())}
            for m in loaded.values():
                router = getattr(m, "router", None)
                if router is not None:
                    router.record = False

            def run(m):
                return lambda: work.run(m)

            latency = interleaved_latency({n: run(m) for n, m in loaded.items()}, args.repeats,
                                          args.warmup, desc=f"{size} {backend}")
            del loaded
            base = latency["original"] / args.steps
            for name, (g, twin) in built.items():
                if name.endswith("all on"):
                    continue
                lat = latency[name] / args.steps
                speedup, flop_speedup = base / lat, flops["original"] / flops[name]
                results.append({
                    "size": size, "backend": backend, "row": name, "flops_per_step": flops[name],
                    "flops_ratio": flops[name] / flops["original"], "latency_s": lat,
                    "latency_ratio": lat / base, "efficiency": speedup / flop_speedup,
                    "overhead": (latency[twin] / latency["original"] - 1.0) if twin else None,
                    "tokens": graph.attentions["blocks.0.attn1"].q_tokens,
                    "steps": args.steps, "repeats": args.repeats, "threads": args.threads})
            # Printed per backend: a long run that is stopped still shows what it measured.
            print(render([r for r in results if r["backend"] == backend]), flush=True)
    return results


def profile_onnxruntime(size: str, args) -> str:
    """Kernel time per op type (onnxruntime's profiler, two whole runs of `args.steps` calls each) of the
    original and of every "all on" twin: where an overhead sits, op type by op type. An `If` row holds its
    branches' kernels too, so the rows overlap; "(model run)" is the whole call."""
    import collections

    import onnxruntime as ort

    from graphopt.exporters.onnx import export_onnx, load_onnx

    config, spec = SIZES[size]
    graph = capture(build_model("wan", {**config, "num_layers": args.blocks}), spec=spec)
    built = rows(graph, args.blocks, args.cache_threshold)
    names = ["original"] + [n for n in built if n.endswith("all on")]
    work = workload(graph, args.steps)
    kernels = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.enable_profiling = True
            options.profile_file_prefix = f"{tmp}/profile{i}"
            model = load_onnx(export_onnx(built[name][0], Path(tmp) / f"m{i}", layout="single", dynamic=False),
                              session_options=options)
            work.run(model)
            work.run(model)
            events = json.loads(Path(model.runner.session.end_profiling()).read_text())
            per_op = collections.Counter()
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                    per_op[e["args"]["op_name"]] += e["dur"] / 1e3
            per_op["(model run)"] = sum(e["dur"] for e in events
                                        if e.get("cat") == "Session" and e["name"] == "model_run") / 1e3
            kernels[name] = per_op
    ops = sorted(set().union(*kernels.values()), key=lambda o: -max(k[o] for k in kernels.values()))[:12]
    lines = [f"| op type ({size}, ms, 2 runs) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {op} | " + " | ".join(f"{kernels[n][op]:.0f}" for n in names) + " |" for op in ops]
    return "\n".join(lines)


def full_size_prune_flops() -> list[str]:
    """Cost-model FLOPs ratio of "prune 50%" on the whole published architectures at their real
    latent (81 frames 480p, 512 text tokens), captured on the meta device (no weights, so the
    kept heads and channels are given: the first half of each; which half does not change FLOPs)."""
    from graphopt import ffnflow
    from graphopt.family_configs import PUBLISHED

    config14, spec = PUBLISHED["wan2.1-t2v-14b"]
    configs = {"1.3b": {**config14, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
               "14b": config14}
    lines = ["| architecture (whole, real latent) | prune 50% heads | prune 50% heads + FFN |",
             "|---|---|---|"]
    for size, config in configs.items():
        graph = capture(build_model("wan", config, "meta"), spec=spec)
        base = model_cost(graph).flops
        heads = {a.name: list(range(a.heads // 2)) for a in graph.attentions.values()
                 if a.block is not None and a.prunable}
        channels = {n: list(range(f.hidden // 2)) for n, f in ffnflow.find(graph).items()}
        ratios = []
        for p in (Prune(heads=heads), Prune(heads=heads, channels=channels)):
            g = graph.copy()
            p.run(g)
            ratios.append(model_cost(g).flops / base)
        lines.append(f"| Wan2.1-{size} ({len(graph.blocks)} blocks, {human(base)} FLOPs/step) | "
                     f"{ratios[0]:.3f} | {ratios[1]:.3f} |")
    return lines


def render(results: list[dict]) -> str:
    lines = ["| width | backend | row | executed FLOPs/step | FLOPs ratio | latency/step | "
             "latency ratio | efficiency | overhead |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        over = "" if r["overhead"] is None else f"{r['overhead']:+.1%}"
        eff = "" if r["row"] == "original" else f"{r['efficiency']:.2f}"
        lines.append(f"| {r['size']} | {r['backend']} | {r['row']} | {human(r['flops_per_step'])} "
                     f"| {r['flops_ratio']:.3f} | {r['latency_s'] * 1e3:.0f} ms | "
                     f"{r['latency_ratio']:.3f} | {eff} | {over} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        default=["torch", "onnxruntime"])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-threshold", type=float, default=0.05)
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--full-size-flops", action="store_true",
                        help="only print the cost model's prune FLOPs ratios on the whole "
                             "published architectures (meta device, no timing)")
    parser.add_argument("--profile-onnxruntime", action="store_true",
                        help="only print onnxruntime's kernel time per op type for the original and the "
                             "all-on twins (where the overhead is)")
    args = parser.parse_args()
    if args.blocks < 2 or args.steps < 2 or args.repeats < 1:
        parser.error("--blocks and --steps must be >= 2 (routing and caching need them), "
                     "--repeats >= 1")
    if args.profile_onnxruntime:
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        for size in args.sizes:
            print(profile_onnxruntime(size, args))
        return
    if args.full_size_flops:
        print("\n".join(full_size_prune_flops()))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = []
    for size in args.sizes:
        results += measure(size, args)
    print(f"\n{args.blocks} blocks, random weights, float32, CPU, {args.threads} thread(s); "
          f"{args.steps} steps per run, median of {args.repeats} runs. efficiency = latency "
          f"speedup / executed-FLOPs speedup; overhead = latency(all on) / latency(original) - 1")
    if args.json:
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
