"""Quality per executed FLOP: count what a sampling run really computed, and plot score against it.

- `count_flops(fn)`: run `fn()` under torch's `FlopCounterMode` and return (its result, the FLOPs
  counted). That counter sees every aten matmul, convolution and attention kernel that executes, so
  a cache that skips a block, a pruned head, a dropped block and a routed block whose conditional
  did not run are all counted as what they are: work not done. It is the measurement the cost
  model (`graphopt.cost`, a static estimate) and a router's own report of its decisions are not.
  Two things make that true here: torch's counter has no formula for the CPU flash-attention
  kernel (`aten._scaled_dot_product_flash_attention_for_cpu`), which `count_flops` adds (the same
  4·b·h·s_q·s_k·d as the GPU kernels); and `graphopt.router.cond_block` runs only the taken branch
  eagerly, where a real `torch.cond` would be counted at the larger branch's FLOPs.
  Elementwise ops (norms, activations, the caches' own comparisons) count 0, as in torch's counter.
- `pareto_front(points)`: the rows no other row beats on both FLOPs (lower) and score (higher).
- `plot_pareto(rows, path)`: PNG, two panels (aggregate mini-VBench score and PSNR vs the teacher)
  against executed FLOPs, one marker per family of rows, every point labelled, the front drawn.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

T = TypeVar("T")

MARKERS = ("*", "o", "s", "^", "D", "v", "P", "X")


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """(fn(), the FLOPs its execution counted) — see the module docstring for what counts."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with counter:
        result = fn()
    return result, counter.get_total_flops()


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (flops, score) points not dominated by another (lower-or-equal FLOPs and
    higher-or-equal score, one of them strictly), sorted by FLOPs."""
    front = []
    for i, (f, s) in enumerate(points):
        dominated = any((f2 <= f and s2 >= s) and (f2 < f or s2 > s) for j, (f2, s2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot_pareto(rows: Sequence[dict], path: str | Path, *, title: str = "") -> None:
    """PNG: `aggregate` and `psnr_db` of each row (a dict with name, family, flops) against `flops`.

    Rows whose PSNR is the metric's 100 dB cap (identical to the reference: the teacher itself) are
    left out of the PSNR panel, which would otherwise be scaled to them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from graphopt.io import atomic_path

    families = list(dict.fromkeys(r["family"] for r in rows))
    fig = Figure(figsize=(13, 5.5))
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2)
    for ax, key, label in ((panels[0], "aggregate", "aggregate mini-VBench (vs teacher, capped at 1)"),
                           (panels[1], "psnr_db", "PSNR vs teacher (dB; rows identical to it left out)")):
        shown = [r for r in rows if r.get(key) is not None and not (key == "psnr_db" and r[key] >= 100.0)]
        for k, family in enumerate(families):
            mine = [r for r in shown if r["family"] == family]
            if mine:                                 # a family keeps its marker and colour in both panels
                marker = MARKERS[k % len(MARKERS)]
                ax.scatter([r["flops"] for r in mine], [r[key] for r in mine], marker=marker, color=f"C{k % 10}",
                           s=160 if marker == "*" else 60, label=family, zorder=3)
        for r in shown:
            ax.annotate(r["name"], (r["flops"], r[key]), textcoords="offset points", xytext=(4, 3), fontsize=6)
        front = [shown[i] for i in pareto_front([(r["flops"], r[key]) for r in shown])]
        if front:
            ax.step([r["flops"] for r in front], [r[key] for r in front], where="post", color="grey",
                    linewidth=0.8, linestyle="--", zorder=1, label="Pareto front")
        ax.set_xlabel("executed FLOPs (fraction of the teacher's sampling run)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
