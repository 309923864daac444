"""distill(): train a compressed graph towards its original with the progressive trainer.

    student = graphopt.load("out/pruned-routed")
    student = distill(student, config="distill.toml", out="out/distilled")   # teacher from the recipe
    graphopt distill out/pruned-routed --config distill.toml -o out/distilled  (distill_folder)

The pair comes from the `student` pass (feature taps on both graphs, block mapping by name), the
training from `trainer.train`; the result is the same graph with trained weights, saved (with
`out`) as a folder `graphopt.load`, `export` and `bench` read like any `graphopt compress` output.
Values the graphs already know are filled in where the config leaves them out: [data]
batch_size / latent_shape / text_shape from the capture's example inputs, [stage2]
target_exec_fraction from the router's budget.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphopt.distill.config import DistillConfig, config_from_dict, read_config
from graphopt.distill.checkpoint import check_checkpoint_dir
from graphopt.distill.data import DistillData
from graphopt.distill.trainer import joined_processes, output_error, train
from graphopt.errors import GraphoptError
from graphopt.io import check_output_dir

EVAL_BATCHES = 4        # held-out batches (own seed) for the before/after output error


@dataclass
class DistillReport:
    """What a distillation run did; `graph.reports["distill"]` after `distill()`."""

    steps: int
    output_error_before: float        # ‖ŷ_s − ŷ_t‖ / ‖ŷ_t‖ on held-out batches, inference gates
    output_error_after: float
    exec_fraction_after: float | None  # executed-FLOPs fraction at inference gates (routed only)
    last_losses: dict
    mapping: list                     # (block, student tap, teacher block) per feature pair
    log: list = field(default_factory=list)   # one dict per logged step (losses, stage, lr)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "log"}

    def plot(self, path) -> None:
        """PNG: each logged loss against the step, stage 2 shaded."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from graphopt.io import atomic_path

        names = [k for k in ("output", "icd", "mca_gen", "mca_disc", "budget", "exec_fraction")
                 if any(k in e for e in self.log)]
        if not names:
            return
        fig = Figure(figsize=(3.2 * len(names), 3))
        FigureCanvasAgg(fig)
        stage2 = [e["step"] for e in self.log if e.get("stage") == 2]
        for i, name in enumerate(names):
            ax = fig.add_subplot(1, len(names), i + 1)
            points = [(e["step"], e[name]) for e in self.log if name in e]
            ax.plot(*zip(*points), lw=1)
            if stage2:
                ax.axvspan(min(stage2) - 1, max(stage2), color="0.9", zorder=0, label="stage 2")
            if name == "output" and all(v > 0 for _, v in points):
                ax.set_yscale("log")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)


def distill_config(student, config: DistillConfig | dict | str | os.PathLike | None = None
                   ) -> DistillConfig:
    """A validated DistillConfig for `student` from a config, a dict shaped like the TOML file, or
    a TOML path; the graph fills what the dict or file leaves out (see the module docstring)."""
    if isinstance(config, DistillConfig):
        _check_against_graph(student, config)
        return config
    values = read_config(config) if isinstance(config, (str, os.PathLike)) else dict(config or {})
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    data = values.setdefault("data", {})
    if isinstance(data, dict) and data.get("folder") is None:
        example = student.example_inputs
        latent, text = example.get("hidden_states"), example.get("encoder_hidden_states")
        if isinstance(latent, torch.Tensor):
            data.setdefault("batch_size", int(latent.shape[0]))
            data.setdefault("latent_shape", list(latent.shape[1:]))
        # Families without text states still get a (tiny, unused) random text tensor.
        data.setdefault("text_shape", list(text.shape[1:]) if isinstance(text, torch.Tensor)
                        else [1, 1])
    router = getattr(student.gm, "router", None)
    stage2 = values.setdefault("stage2", {})
    if router is not None and isinstance(stage2, dict):
        stage2.setdefault("target_exec_fraction", router.budget)
    built = config_from_dict(values)
    _check_against_graph(student, built)
    return built


def _check_against_graph(student, config: DistillConfig) -> None:
    latent = student.example_inputs.get("hidden_states")
    if not isinstance(latent, torch.Tensor):
        raise GraphoptError("distillation feeds `hidden_states` latents; this graph was captured "
                            f"with inputs {sorted(student.example_inputs)}")
    batch = _static_batch(student)
    if batch is not None and config.data.batch_size != batch:
        raise GraphoptError(f"[data] batch_size = {config.data.batch_size}, but the graphs were "
                            f"captured at batch {batch}: set batch_size = {batch}, or compress "
                            f"with --batch {config.data.batch_size}")
    if config.data.latent_shape is not None and list(config.data.latent_shape) != list(latent.shape[1:]):
        raise GraphoptError(f"[data] latent_shape = {config.data.latent_shape}, but the graphs "
                            f"were captured for latents {list(latent.shape[1:])}: use that shape "
                            f"(or leave latent_shape out)")
    text = student.example_inputs.get("encoder_hidden_states")
    if (isinstance(text, torch.Tensor) and config.data.text_shape is not None
            and list(config.data.text_shape) != list(text.shape[1:])):
        raise GraphoptError(f"[data] text_shape = {config.data.text_shape}, but the graphs were "
                            f"captured with text states {list(text.shape[1:])}: use that shape "
                            f"(or leave text_shape out)")
    router = getattr(student.gm, "router", None)
    if (router is not None and config.stage2.steps > 0
            and not math.isclose(config.stage2.target_exec_fraction, router.budget, abs_tol=1e-9)):
        raise GraphoptError(f"[stage2] target_exec_fraction = {config.stage2.target_exec_fraction}"
                            f", but the router's inference budget (route budget) is "
                            f"{router.budget}: they must agree, so set it to {router.budget} "
                            f"(or leave it out), or route with that budget")


def _static_batch(graph) -> int | None:
    """The captured batch size, or None for a dynamic-batch capture (its graph reads the latent's
    batch size at run time: `sym_size(hidden_states, 0)`)."""
    for n in graph.placeholders():
        if n.target == "hidden_states" and any(
                u.target is torch.ops.aten.sym_size.int and u.args[1] == 0 for u in n.users):
            return None
    return int(graph.example_inputs["hidden_states"].shape[0])


def eval_batches(config: DistillConfig, graph, n: int = EVAL_BATCHES) -> list[dict]:
    """Held-out batches: the data stream of the config with a seed training never uses."""
    data = DistillData(config.data, seed=config.run.seed, rank=0,
                       dtype=graph.example_inputs["hidden_states"].dtype, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(10_007 + config.run.seed)
    return [data.sample(generator) for _ in range(n)]


def distill(student, teacher=None, config: DistillConfig | dict | str | os.PathLike | None = None,
            *, out=None, teacher_dtype: str | None = None, stop_at_step: int | None = None,
            overwrite: bool = False, protect=()):
    """Distill `student` (a compressed DiTGraph, trained in place) from `teacher` (the original
    DiTGraph; default: captured from the student's recipe source, in `teacher_dtype`).

    Returns the student graph, with `graph.reports["distill"]` a DistillReport. With `out`, the
    graph is saved there (process 0 only under torchrun) with distill.json and distill.png; `out`
    and the checkpoint folder are checked before training (graphopt.io.check_output_dir: never
    an input, checkpoints and data included, nor, unless `overwrite`, a folder holding files
    graphopt did not write).
    """
    from graphopt.distill.student import GraphPair, teacher_graph

    config_path = config if isinstance(config, (str, os.PathLike)) else None
    config = distill_config(student, config)
    check_checkpoint_dir(config.run.output_dir)
    if out is not None:
        protect = [*_inputs(config, config_path), student.source,
                   getattr(teacher, "source", None), *protect]
        check_output_dir(out, protect=protect, overwrite=overwrite)
    if teacher is None:
        teacher = teacher_graph(student, dtype=teacher_dtype)
    pair = GraphPair(student, teacher, timestep_scale=config.data.num_train_timesteps)
    batches = eval_batches(config, student)
    before = output_error(pair, batches)
    with joined_processes(config.run.device):      # FSDP2 gathers weights after training too
        result = train(pair, config, stop_at_step=stop_at_step)
        after = output_error(pair, batches)
        exec_fraction = pair.executed_fraction(batches)
        graph = pair.finish()   # last: a sharded twin's forward re-shards the modules it shares
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()] \
        if result.log_path.is_file() else []
    report = DistillReport(steps=result.steps_done, output_error_before=before,
                           output_error_after=after, exec_fraction_after=exec_fraction,
                           last_losses=result.last_losses,
                           mapping=[list(m) for m in pair.mapping], log=log)
    graph.reports["distill"] = report
    if out is not None and int(os.environ.get("RANK", "0")) == 0:
        save_distilled(graph, out, config, overwrite=overwrite, protect=protect)
    return graph


def save_distilled(graph, out, config: DistillConfig, extra_files: dict | None = None, *,
                   overwrite: bool = False, protect=()) -> Path:
    """`graphopt.save` the distilled graph, with distill.json (config + report) and distill.png."""
    from graphopt.serialize import save

    report = graph.reports["distill"]
    text = json.dumps({"config": config.to_dict(), "report": report.to_json()}, indent=2,
                      default=str)
    return save(graph, out, extra_files={**(extra_files or {}), "distill.json": text,
                                         "distill.png": report.plot},
                overwrite=overwrite, protect=[*_inputs(config, None), *protect])


def _inputs(config: DistillConfig | dict, config_path) -> list:
    """What a distillation run reads or keeps, which its output folder must never replace: the
    config file, the checkpoint folder and the data folder."""
    if isinstance(config, DistillConfig):
        return [config_path, config.run.output_dir, config.data.folder]
    run, data = config.get("run"), config.get("data")
    return [config_path, run.get("output_dir") if isinstance(run, dict) else None,
            data.get("folder") if isinstance(data, dict) else None]


def distill_folder(compressed, config, out, *, teacher: str | None = None,
                   teacher_dtype: str | None = None, checkpoints=None, trust_pickle: bool = False,
                   overwrite: bool = False, console=None) -> Path:
    """`graphopt distill`: load a `graphopt compress` folder, distill it from its source model (or
    `teacher`), write checkpoints and the distilled folder `out` (plus the compress report)."""
    from graphopt.distill.student import teacher_graph
    from graphopt.serialize import load

    folder, out = Path(compressed), Path(out)
    values = read_config(config)
    run = values.setdefault("run", {})
    if not isinstance(run, dict):
        raise GraphoptError(f"[run] must be a table, got {run!r}")
    if checkpoints is not None:
        run["output_dir"] = str(checkpoints)
    run.setdefault("output_dir", str(out) + ".checkpoints")
    # Before anything loads: a bad -o or checkpoint folder fails in a second, not after training.
    protect = [folder, teacher, *_inputs(values, config)]
    check_output_dir(out, protect=protect, overwrite=overwrite)
    check_checkpoint_dir(run["output_dir"])
    student = load(folder)
    config = distill_config(student, values)
    teacher = teacher_graph(student, teacher, dtype=teacher_dtype, trust_pickle=trust_pickle)
    if console is not None:
        console.print(f"distilling {folder} from {teacher.source} ({config.stage1.steps} + "
                      f"{config.stage2.steps} steps); checkpoints in {config.run.output_dir}/")
    graph = distill(student, teacher, config)
    extra = {name: (folder / name).read_text() for name in ("report.json", "report.md")
             if (folder / name).is_file()}      # what compress reported stays with the model
    if int(os.environ.get("RANK", "0")) == 0:
        save_distilled(graph, out, config, extra, overwrite=overwrite, protect=protect)
        report = graph.reports["distill"]
        if console is not None:
            routed = "" if report.exec_fraction_after is None else \
                f", executed FLOPs fraction {report.exec_fraction_after:.3f}"
            console.print(f"output error vs teacher {report.output_error_before:.4f} → "
                          f"{report.output_error_after:.4f}{routed}")
            console.print(f"wrote {out}/ (model.safetensors, recipe.json, distill.json, "
                          f"distill.png)")
    return out
