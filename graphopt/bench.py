"""`graphopt bench`: original vs compressed, per backend, in one process.

For each backend — `torch` (eager PyTorch, always), `onnxruntime` (the single-file ONNX export,
one `If` per routed block; where onnxruntime is installed), `aoti` (AOTInductor; on request, as
compiling takes a minute or more per model on a CPU) — and for the original and the compressed model:

- the workload is one whole sampling run: `steps` calls of a flow-matching Euler sampler (x ← x +
  (σ' − σ)·v, each model integrating its own outputs), from seeded random latents and text states
  of the compressed model's captured shapes (one call = one denoising step at that batch). A cache
  or reuse-routed model therefore sees what it sees in a pipeline: a new run (every block computes
  at its first step) and steps whose inputs really drift.
- FLOPs: executed, counted with torch's FlopCounterMode over that run in eager PyTorch, call by
  call (`flops_per_call`; `flops_per_step` is their mean), and per call the blocks that computed
  and those that were skipped or reused (`blocks_per_call`, from the model's StepRecords).
  Backend-independent: every backend runs the same decisions in the graph on the same inputs.
- latency per step: median over `repeats` whole runs ÷ steps, after `warmup` runs, every
  configuration of every backend interleaved in each repeat so drift hits them alike.
- speedup = latency(original) / latency(compressed); FLOPs speedup = FLOPs(original) /
  FLOPs(compressed); efficiency = speedup / FLOPs speedup (1: time falls exactly as FLOPs do).

The original is `original` if given, else the model the compressed folder's recipe was made from
when that source still resolves (a shipped name such as tiny-wan, or an existing path), else the
recipe's architecture with seeded random weights (weights change neither a dense model's FLOPs nor
its latency); it is captured at the compressed model's input spec.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from graphopt.errors import GraphoptError

BACKENDS = ("torch", "onnxruntime", "aoti")
DEFAULT_BACKENDS = ("torch", "onnxruntime")


def interleaved_latency(calls: dict, repeats: int, warmup: int, desc: str | None = None
                        ) -> dict[str, float]:
    """Median seconds per call of each named zero-argument function.

    Configurations alternate inside each repeat, so drift (thermal, other processes) hits all alike.
    """
    from tqdm.auto import tqdm

    times = {name: [] for name in calls}
    with torch.no_grad():
        for fn in calls.values():
            for _ in range(warmup):
                fn()
        for _ in tqdm(range(repeats), desc=desc, leave=False, disable=desc is None):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def check_options(backends, steps: int, repeats: int, warmup: int) -> None:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise GraphoptError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if steps < 1 or repeats < 1 or warmup < 0:
        raise GraphoptError(f"bench needs steps >= 1, repeats >= 1 and warmup >= 0; got steps="
                            f"{steps}, repeats={repeats}, warmup={warmup}")


def load_pair(folder, original=None, *, device: str = "cpu", trust_pickle: bool = False):
    """(original graph, compressed graph) for `folder`; the original's `source` says where it
    came from. The original takes the compressed model's dtypes (a bf16 checkpoint is benched in
    bf16 on both sides), so the speedup is the compression's, not a change of precision."""
    from graphopt import families
    from graphopt.capture import capture, load_model, shipped_names
    from graphopt.serialize import cast_like_checkpoint, load, state_dict

    compressed = load(folder, device=device)
    record = compressed.recipe.model
    dtypes = {k: v.dtype for k, v in state_dict(compressed).items()}
    source = original if original is not None else record.get("source")
    if original is not None or (source in shipped_names() or Path(str(source)).exists()):
        model = load_model(source, trust_pickle=trust_pickle)
        if not isinstance(model, torch.nn.Module):
            raise GraphoptError(f"the original '{source}' is an exported program; bench needs the "
                                f"model (a diffusers folder or a shipped name) to capture it at "
                                f"the compressed model's input shape")
        cast_like_checkpoint(model, dtypes)
        base = capture(model.to(device), spec=families.spec_from_recipe(record, device), trust_pickle=trust_pickle)
        origin = str(source)
    else:
        base = compressed.recipe.rebuild(device, dtypes=dtypes, seeded=True, replay=False)
        origin = f"{record.get('class_name')} from the recipe's config (seeded random weights)"
    if base.recipe.model.get("config") != record.get("config"):
        raise GraphoptError(f"the original '{origin}' is not the model '{folder}' was compressed "
                            f"from (their configs differ): pass the right one with --original")
    base.source = origin
    return base, compressed


@dataclass
class Workload:
    """One sampling run's inputs: the model's tensor inputs at the start (`inputs`), the timestep
    of each call and the flow-matching sigmas (one more than the calls)."""

    inputs: dict[str, torch.Tensor]
    timesteps: list[torch.Tensor]
    sigmas: list[float]
    latent: str
    timestep: str

    def run(self, model, each=None) -> torch.Tensor:
        """Euler-sample with `model` (called like the diffusers transformer); `each(call)` wraps
        every call (e.g. to count its FLOPs). Returns the final latent."""
        x = self.inputs[self.latent]
        for i, t in enumerate(self.timesteps):
            def call(x=x, t=t):
                return model(**{**self.inputs, self.latent: x, self.timestep: t}, return_dict=False)[0]

            v = torch.as_tensor(each(call) if each is not None else call()).to(x)
            x = x + (self.sigmas[i + 1] - self.sigmas[i]) * v
        return x


def workload(graph, steps: int, seed: int = 0) -> Workload:
    """The sampling run every model of the benchmark makes (see the module docstring)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t_name = graph.timestep_input
    gen = torch.Generator().manual_seed(seed)
    base = {}
    for k, v in graph.example_inputs.items():
        if not isinstance(v, torch.Tensor):
            continue
        base[k] = torch.randn(v.shape, generator=gen).to(v) if v.is_floating_point() and \
            k != t_name else v
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    example_t = graph.example_inputs[t_name]
    timesteps = [torch.full_like(example_t, float(t) if example_t.is_floating_point() else round(float(t)))
                 for t in scheduler.timesteps]
    return Workload(base, timesteps, [float(s) for s in scheduler.sigmas], graph.latent_input, t_name)


def executed_flops(graph, work: Workload) -> tuple[list[int], list[dict]]:
    """(FLOPs each call of the run executes, counted with FlopCounterMode in eager PyTorch; per
    call the blocks that computed and those skipped or reused, from the StepRecords)."""
    from graphopt.dropin import GraphTransformer
    from graphopt.reuse import reset_cache
    from graphopt.yardstick import count_flops

    model = GraphTransformer(graph)
    reset_cache(graph)
    flops = []

    def counted(call):
        out, n = count_flops(call)
        flops.append(n)
        return out

    with torch.no_grad():
        work.run(model, counted)
    reset_cache(graph)
    blocks = [{"executed": list(r.executed), "skipped": list(r.skipped)} for r in model.records]
    return flops, blocks


def bench(original, compressed, *, backends=DEFAULT_BACKENDS, steps: int = 4, repeats: int = 5,
          warmup: int = 1, explicit: bool = False, workdir=None, onnx_models=None) -> dict:
    """Measure (see the module docstring); returns the JSON-able result `render` prints.

    A backend in `backends` that cannot run here is skipped with the reason, unless `explicit`
    (the user named it), in which case that is an error. `onnx_models`: {"original" or
    "compressed": a loaded single-file ONNX model of that graph} the caller already exported.
    """
    from tqdm.auto import tqdm

    from graphopt.dropin import GraphTransformer

    check_options(backends, steps, repeats, warmup)
    work = workload(compressed, steps)
    (original_flops, _), (compressed_flops, blocks) = (executed_flops(g, work) for g in (original, compressed))
    flops = {"original": original_flops, "compressed": compressed_flops}
    device = next((p.device for p in compressed.gm.parameters()), torch.device("cpu"))
    models, skipped = {}, {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for backend in tqdm(backends, desc="loading backends", leave=False):
            try:
                for role, graph in (("original", original), ("compressed", compressed)):
                    given = (onnx_models or {}).get(role) if backend == "onnxruntime" else None
                    models[backend, role] = given if given is not None else \
                        load_backend(backend, graph, Path(tmp) / f"{backend}-{role}")
            except _Unavailable as e:
                if explicit:
                    raise GraphoptError(f"backend '{backend}' cannot run: {e}") from None
                skipped[backend] = str(e)
        for model in models.values():
            if isinstance(model, GraphTransformer) and model.router is not None:
                model.router.record = False       # timing: no host copies of the decisions

        def run(model):
            def call():
                work.run(model)         # each run starts at the top timestep: a new run
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            return call

        latency = interleaved_latency({key: run(m) for key, m in models.items()}, repeats, warmup,
                                      desc="timing")
    mean = {role: sum(f) / len(f) for role, f in flops.items()}
    flop_speedup = mean["original"] / mean["compressed"]
    rows = []
    for backend in backends:
        if backend in skipped:
            continue
        orig, comp = (latency[backend, r] / steps for r in ("original", "compressed"))
        speedup = orig / comp
        rows.append({"backend": backend, "original_s": orig, "compressed_s": comp,
                     "speedup": speedup, "efficiency": speedup / flop_speedup})
    return {
        "original": original.source, "compressed": compressed.source,
        "input_shapes": {k: list(v.shape) for k, v in work.inputs.items()},
        "device": str(device), "threads": torch.get_num_threads(),
        "steps": steps, "repeats": repeats, "warmup": warmup,
        "timesteps": [float(t.flatten()[0]) for t in work.timesteps],
        "flops_per_step": mean, "flops_per_call": flops, "flops_speedup": flop_speedup,
        "blocks_per_call": blocks,
        "backends": rows, "skipped": skipped,
    }


class _Unavailable(Exception):
    """A backend that cannot run here (its package is missing); the message says what to install."""


def load_backend(backend: str, graph, where: Path):
    """`graph` as `backend` runs it ("torch", "aoti", "onnxruntime"; exported into `where`)."""
    from graphopt.dropin import GraphTransformer

    device = next((p.device for p in graph.gm.parameters()), torch.device("cpu"))
    if backend == "torch":
        return GraphTransformer(graph)
    if backend == "aoti":
        from graphopt.exporters.aoti import export_aoti, load_aoti

        return load_aoti(export_aoti(graph, where / "model.pt2"))
    try:
        import onnxruntime  # noqa: F401

        from graphopt.exporters.onnx import export_onnx, load_onnx
    except ImportError as e:
        raise _Unavailable(f"{e} (pip install 'graphopt[onnx]')") from None
    return load_onnx(export_onnx(graph, where, layout="single"), device=device)


def render(result: dict, console) -> None:
    """The result as a rich table (one row per backend and model) and a one-line caption."""
    from rich.table import Table

    from graphopt.describe import human

    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in result["input_shapes"].items())
    table = Table(title=f"original vs compressed, per step ({result['device']}, "
                        f"{result['threads']} thread(s), median of {result['repeats']} runs of "
                        f"{result['steps']} steps)")
    for col in ("backend", "model", "FLOPs/step", "latency/step", "speedup", "efficiency"):
        table.add_column(col, justify="left" if col in ("backend", "model") else "right")
    flops = result["flops_per_step"]
    for row in result["backends"]:
        table.add_row(row["backend"], "original", human(flops["original"]),
                      f"{row['original_s'] * 1e3:.2f} ms", "1.00x", "")
        table.add_row("", "compressed", human(flops["compressed"]),
                      f"{row['compressed_s'] * 1e3:.2f} ms", f"{row['speedup']:.2f}x",
                      f"{row['efficiency']:.2f}")
    console.print(table)
    console.print(f"original: {result['original']}; inputs {shapes}; FLOPs speedup "
                  f"{result['flops_speedup']:.2f}x; efficiency = speedup / FLOPs speedup")
    for backend, why in result["skipped"].items():
        console.print(f"[yellow]skipped {backend}[/]: {why}")


def plot(result: dict, path) -> None:
    """PNG: latency per step of original and compressed, per backend, with speedup labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.io import atomic_path

    rows = result["backends"]
    fig = Figure(figsize=(1.8 * len(rows) + 2.5, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["original_s"] * 1e3 for r in rows], 0.4, label="original")
    ax.bar([x + 0.2 for x in xs], [r["compressed_s"] * 1e3 for r in rows], 0.4, label="compressed")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['speedup']:.2f}x\neff {r['efficiency']:.2f}",
                    (x + 0.2, r["compressed_s"] * 1e3), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r["backend"] for r in rows])
    ax.set_ylabel("latency per step (ms)")
    ax.set_title(f"FLOPs speedup {result['flops_speedup']:.2f}x ({result['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
