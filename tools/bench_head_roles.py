"""Do the heads head-roles calls temporal carry motion? Roles of the shipped tiny teacher by both
statistics, then mini-VBench with groups of heads masked.

For each statistic (attention density, the default, at --radius; Sparse VideoGen's output error at
radius 0, its published form), the --heads self-attention heads with the highest temporal score and
the --heads with the lowest are masked together (graphopt.passes.prune.mask_heads: their outputs
zeroed, nothing retrained), and each masked teacher samples the same held-out conditions from the same
noise. If a statistic's temporal heads carry motion, masking them costs motion (smoothness, direction)
more than content (colour, shape), and masking its spatial heads the reverse.

Writes <out>/bench_head_roles.md (the table, the roles, the command) and one heat map per statistic.

    python tools/bench_head_roles.py --out out/bench_head_roles      # the README's table (~2 min)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from graphopt.eval import evaluate_clips
from graphopt.io import atomic_write_text
from graphopt.passes.head_roles import HeadRolesOptions, head_roles
from graphopt.passes.prune import mask_heads
from graphopt.tiny.testbed import calibration_inputs, capture_teacher, eval_conditions, quality

METRICS = [("colour_accuracy", "colour", "{:.3f}"), ("shape_accuracy", "shape", "{:.3f}"),
           ("subject_consistency", "subject", "{:.3f}"), ("motion_smoothness", "smooth", "{:.3f}"),
           ("direction_adherence", "direction", "{:.3f}"), ("temporal_flicker", "flicker", "{:.3f}"),
           ("psnr_db", "PSNR dB", "{:.1f}"), ("relative_error", "rel err", "{:.3f}")]


def ranked_heads(roles) -> list[tuple[float, str, int]]:
    """(temporal score, attention, head) of every measured head, most temporal first."""
    return sorted(((float(s), a.name, h) for a in roles.attentions.values() if a.measured
                   for h, s in enumerate(a.temporal_score)), reverse=True)


def masks_without(graph, heads: list[tuple[float, str, int]]) -> dict[str, torch.Tensor]:
    masks = {a.name: torch.ones(a.heads) for a in graph.attentions.values() if a.kind == "self"}
    for _, name, h in heads:
        masks[name][h] = 0.0
    return masks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/bench_head_roles"))
    parser.add_argument("--heads", type=int, default=4, help="heads masked per row")
    parser.add_argument("--radius", type=int, default=1, help="attention density's window (tokens)")
    parser.add_argument("--clips", type=int, default=32, help="held-out conditions per row")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    command = " ".join(["python tools/bench_head_roles.py"] + (argv if argv is not None else sys.argv[1:]))

    teacher, config = capture_teacher()
    calib = calibration_inputs(config)
    statistics = {"attention density": HeadRolesOptions(radius=args.radius),
                  "output error (Sparse VideoGen)": HeadRolesOptions(statistic="output-error", radius=0)}
    args.out.mkdir(parents=True, exist_ok=True)
    roles, rows = {}, [("teacher", "", {})]
    for label, options in statistics.items():
        roles[label] = head_roles(teacher, options, inputs=calib)
        roles[label].plot(args.out / f"head_roles_{options.statistic}.png")
        ranked = ranked_heads(roles[label])
        for kind, heads in (("temporal", ranked[:args.heads]), ("spatial", ranked[-args.heads:])):
            rows.append((f"{label}: {args.heads} most {kind} masked",
                         " ".join(f"{n.split('.')[1]}:{h}" for _, n, h in heads), masks_without(teacher, heads)))

    data = eval_conditions(config, args.clips)
    sampling = {"steps": args.steps, "guidance": args.guidance}
    results, reference = [], None
    for label, heads, masks in tqdm(rows, desc="sampling"):
        model = teacher if not masks else mask_heads(teacher, masks)
        scores, clips = quality(model, config, data, reference, **sampling)
        if reference is None:
            reference = clips
            scores = evaluate_clips(config, clips, data, reference=reference)
        results.append((label, heads, scores))

    header = ["heads masked", "block:head"] + [h for _, h, _ in METRICS]
    table = Table(title=f"tiny-wan with heads masked: {args.clips} held-out conditions, {args.steps} steps, "
                        f"cfg {args.guidance:g}")
    for h in header:
        table.add_column(h, justify="left" if h in header[:2] else "right")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(METRICS)) + "|"]
    for label, heads, scores in results:
        cells = [label, heads] + [fmt.format(scores[key]) for key, _, fmt in METRICS]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    counts = [f"{label}: " + ", ".join(f"{n} {r}" for r, n in r.counts().items()) for label, r in roles.items()]
    console.print("\n".join(counts))

    sections = ["# Head roles of tiny-wan, and what masking them costs (tools/bench_head_roles.py)", "",
                f"command: `{command}`", "", *[f"- {c}" for c in counts], "", *lines, ""]
    for label, r in roles.items():
        sections += [f"## {label}", "", r.to_markdown(), "",
                     f"![{label}](head_roles_{statistics[label].statistic}.png)", ""]
    atomic_write_text(args.out / "bench_head_roles.md", "\n".join(sections))
    console.print(f"wrote {args.out}/bench_head_roles.md and the heat maps")


if __name__ == "__main__":
    main()
