"""Mini-VBench table of the tiny teacher against its training data (the ceiling).

Conditions come from a held-out seed of the generator; the teacher samples one clip per condition
from the same seeded noise in every row. Rows:

- training data: the generator's own clips for those conditions (every [0, 1] metric is 1);
- teacher at --steps steps and guidance --guidance (the reference of the fidelity columns);
- the same with fewer steps (--fewer-steps) and without guidance: how far the fidelity metrics move.

    python tools/eval_tiny_teacher.py                          # shipped weights, 32 clips, 20 steps
    python tools/eval_tiny_teacher.py --weights /tmp/tiny_wan --grid /tmp/teacher.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from graphopt.eval import evaluate_clips
from graphopt.io import atomic_path
from graphopt.tiny import describe, embed_tokens, generate, load_teacher_folder, load_tiny_teacher, sample

HELD_OUT_SEED = 2_000_000_007  # the trainer draws seeds seed·1000003 + step, far below this

COLUMNS = [
    ("colour_accuracy", "colour", "{:.3f}"),
    ("shape_accuracy", "shape", "{:.3f}"),
    ("subject_consistency", "subject", "{:.3f}"),
    ("motion_smoothness", "smooth", "{:.3f}"),
    ("motion_rmse_px", "rmse px", "{:.2f}"),
    ("direction_adherence", "direction", "{:.3f}"),
    ("temporal_flicker", "flicker", "{:.3f}"),
    ("psnr_db", "PSNR dB", "{:.1f}"),
    ("relative_error", "rel err", "{:.3f}"),
]


def save_grid(path: Path, clips: np.ndarray, captions: list[str], rows: int) -> None:
    """PNG of the first `rows` clips, one row of frames each (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = clips.shape[2]
    fig, axes = plt.subplots(rows, frames, figsize=(frames * 1.0, rows * 1.15), squeeze=False)
    for r in range(rows):
        for f in range(frames):
            ax = axes[r, f]
            ax.imshow(((clips[r, :, f].transpose(1, 2, 0) + 1) / 2).clip(0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_title(captions[r], fontsize=6, loc="left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="a trained folder; default: the shipped teacher")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fewer-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG of the first clips: data | teacher")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, config = load_tiny_teacher() if args.weights is None else load_teacher_folder(args.weights)
    data = generate(config, args.clips, seed=HELD_OUT_SEED)
    cond = embed_tokens(config, data.tokens)
    video_shape = data.videos.shape[1:]

    def run(steps: int, guidance: float) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        clips = sample(model, cond, video_shape=video_shape, seed=args.seed, num_steps=steps, guidance_scale=guidance)
        return clips.numpy(), time.perf_counter() - start

    teacher, seconds = run(args.steps, args.guidance)
    rows = [("training data (ceiling)", evaluate_clips(config, data.videos, data, reference=data.videos), None),
            (f"teacher {args.steps} steps, cfg {args.guidance:g}",
             evaluate_clips(config, teacher, data, reference=teacher), seconds)]
    for steps, guidance in ((args.fewer_steps, args.guidance), (args.steps, 1.0)):
        clips, secs = run(steps, guidance)
        rows.append((f"teacher {steps} steps, cfg {guidance:g}",
                     evaluate_clips(config, clips, data, reference=teacher), secs))

    table = Table(title=f"mini-VBench, {args.clips} held-out conditions (fidelity columns: vs the first teacher row)")
    table.add_column("clips")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("sample s", justify="right")
    for name, scores, secs in rows:
        table.add_row(name, *[fmt.format(scores[key]) for key, _, fmt in COLUMNS],
                      "" if secs is None else f"{secs:.1f}")
    Console(width=200).print(table)
    print("command:", " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])))

    if args.grid is not None:
        count = min(8, args.clips)
        pairs = np.stack([data.videos[:count], teacher[:count]], axis=1).reshape(2 * count, *video_shape)
        captions = [f"{kind}: {describe(config, data, i)}" for i in range(count) for kind in ("data", "teacher")]
        save_grid(args.grid, pairs, captions, 2 * count)
        print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
