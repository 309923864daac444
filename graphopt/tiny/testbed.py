"""The shipped tiny teacher as a compression testbed: its graph, real calibration inputs, distillation
data and mini-VBench scores of anything that samples like it.

    graph, config = capture_teacher()                  # at the real clip shape, batch dynamic
    inputs = calibration_inputs(config)                # noised held-out clips + their conditions
    scores, clips = quality(graph, config, clips=16)   # mini-VBench of sampled clips

Calibration inputs and distillation data are the generator's clips, not N(0, I) latents: the teacher
was trained on them, so its heads and blocks show there the roles they learned (on random latents a
spatial/temporal test sees mostly how heads treat noise). Seeds are disjoint from training
(seed·1000003 + step) and from the evaluation conditions (`EVAL_SEED`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from graphopt.eval import evaluate_clips
from graphopt.tiny import embed_tokens, generate, load_tiny_teacher, sample
from graphopt.tiny.data import ClipBatch, GeneratorConfig

EVAL_SEED = 2_000_000_007          # the conditions tools/eval_tiny_teacher.py scores on
CALIBRATION_SEED = 3_000_000_019
DISTILL_SEED = 4_000_000_007
CALIBRATION_TIMESTEPS = (875.0, 625.0, 375.0, 125.0)


def capture_teacher(name: str = "tiny-wan", batch: int = 2):
    """(DiTGraph of the shipped teacher `name` captured at its clip shape with a dynamic batch, its
    GeneratorConfig). The example batch (2: a conditional/unconditional pair) sets only what the cost
    model counts per step; the graph runs at any batch, so the sampler can call it with 2·clips.
    Its example inputs are the family's random ones; pass `calibration_inputs` to analyses."""
    from graphopt.capture import capture
    from graphopt.layout import InputSpec

    model, config = load_tiny_teacher(name)
    # An InputSpec (not example tensors), so the graph knows its video token layout (head roles need it).
    spec = InputSpec(batch=batch, frames=config.num_frames, height=config.height, width=config.width,
                     text_len=config.num_tokens)
    graph = capture(model, spec=spec, dynamic_batch=True)
    graph.source = graph.recipe.model["source"] = name
    return graph, config


def noised(x0: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
    """x_s = (1 − s)·x0 + s·ε, the trainer's and the sampler's convention."""
    return (1 - s) * x0 + s * torch.randn(x0.shape, generator=generator)


def calibration_inputs(config: GeneratorConfig, *, batch: int = 2, timesteps=CALIBRATION_TIMESTEPS,
                       seed: int = CALIBRATION_SEED) -> list[dict]:
    """One model-input dict per timestep: `batch` held-out clips noised to it, with their conditions."""
    clips = generate(config, batch, seed=seed)
    x0 = torch.from_numpy(clips.videos)
    cond = embed_tokens(config, clips.tokens)
    gen = torch.Generator().manual_seed(seed)
    return [{"hidden_states": noised(x0, t / 1000.0, gen), "timestep": torch.full((batch,), float(t)),
             "encoder_hidden_states": cond, "return_dict": False} for t in timesteps]


def write_distill_data(config: GeneratorConfig, folder: str | Path, *, clips: int = 256,
                       uncond_fraction: float = 0.1, seed: int = DISTILL_SEED) -> Path:
    """The distillation trainer's data folder: one safetensors file per clip (`latents`,
    `encoder_hidden_states`). A `uncond_fraction` of them carry the all-zero condition, as the
    teacher's training did, so the student also learns the unconditional branch that guidance uses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = generate(config, clips, seed=seed)
    cond = embed_tokens(config, batch.tokens)
    drop = np.random.default_rng(seed).random(clips) < uncond_fraction
    cond[torch.from_numpy(drop)] = 0.0
    for i in range(clips):
        save_file({"latents": torch.from_numpy(batch.videos[i]).contiguous(),
                   "encoder_hidden_states": cond[i].contiguous()}, str(folder / f"clip{i:05d}.safetensors"))
    return folder


def distill_settings(data_folder: str | Path, run_dir: str | Path, steps: int, *, routed: bool,
                     recover_width: bool = True, lr: float = 3e-4, progress: bool = True) -> dict:
    """A `graphopt.distill` config (TOML-shaped dict) for a student of the tiny teacher: output + ICD
    losses (no MCA: on a 1 M-parameter model the adversarial term swamps the output loss) on
    `data_folder` (`write_distill_data`), noise levels drawn as the teacher's were; a routed student
    spends the second half of the steps training its router under the budget loss, or every step when
    there is no width to recover first (`recover_width=False`: the teacher's own blocks under a router,
    where stage 1, gates on, would match the teacher exactly and learn nothing)."""
    stage2 = (steps - steps // 2 if recover_width else steps) if routed else 0
    return {"run": {"seed": 0, "checkpoint_every": max(steps, 1), "device": "cpu", "output_dir": str(run_dir),
                    "resume": False, "progress": progress},
            "data": {"folder": str(data_folder), "batch_size": 8, "timestep_sampling": "logit_normal",
                     "shift": 3.0},
            "stage1": {"steps": steps - stage2}, "stage2": {"steps": stage2},
            "loss": {"output_weight": 1.0, "icd_weight": 0.1, "mca_weight": 0.0},
            "optim": {"student": {"lr": lr, "schedule": "cosine"}, "router": {"lr": 1e-2}}}


def eval_conditions(config: GeneratorConfig, clips: int) -> ClipBatch:
    """The held-out conditions (and their ground-truth clips) every quality row is scored on."""
    return generate(config, clips, seed=EVAL_SEED)


def sample_clips(transformer, config: GeneratorConfig, data: ClipBatch, *, steps: int = 10,
                 guidance: float = 4.0, seed: int = 0, step_callback=None) -> np.ndarray:
    """Clips (B, 3, F, H, W) for `data`'s conditions from seeded noise, with guidance."""
    cond = embed_tokens(config, data.tokens)
    clips = sample(transformer, cond, video_shape=data.videos.shape[1:], seed=seed, num_steps=steps,
                   guidance_scale=guidance, step_callback=step_callback)
    return clips.numpy()


def quality(transformer, config: GeneratorConfig, data: ClipBatch, reference: np.ndarray | None = None,
            **sampling) -> tuple[dict[str, float], np.ndarray]:
    """(mini-VBench means, the clips) of `transformer` on `data`'s conditions; fidelity vs `reference`."""
    clips = sample_clips(transformer, config, data, **sampling)
    return evaluate_clips(config, clips, data, reference=reference), clips


def save_frame_grid(path: str | Path, rows: list[tuple[str, np.ndarray]], clip: int = 0) -> None:
    """PNG: one row of frames per (label, clips) pair, clip `clip` of each (same seed and condition)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.io import atomic_path

    frames = rows[0][1].shape[2]
    fig = Figure(figsize=(frames * 0.75 + 2.6, len(rows) * 0.8 + 0.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), frames, squeeze=False)
    for r, (label, clips) in enumerate(rows):
        for f in range(frames):
            ax = axes[r, f]
            ax.imshow(((clips[clip, :, f].transpose(1, 2, 0) + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    for f in range(frames):
        axes[0, f].set_title(f"t={f}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
