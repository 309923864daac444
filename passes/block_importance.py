"""block-importance: how much each block matters at each denoising timestep (VDMini's criterion).

For calibration sample x at timestep t, let y be the model's first output and S the residual stream
leaving the last block; y_b and S_b are the same with block b skipped (its stream outputs replaced
by its stream inputs). Averaged over the calibration samples:

    output[b, t]  = ‖y_b − y‖ / ‖y‖
    content[b, t] = ‖P(S_b) − P(S)‖ / ‖P(S)‖        P = per-frame mean over the frame's tokens
    motion[b, t]  = ‖D(S_b) − D(S)‖ / ‖D(S)‖        D = frame-to-frame differences S[f+1] − S[f]

`content` measures what each frame shows, `motion` how consecutive frames differ: VDMini's
observation is that shallow blocks mostly carry the first and deep blocks the second. The split
needs the video token layout (`graph.token_layout` and, where the stream is not a plain video
sequence, the family's block layout); without it, and for single-frame models, only `output` is
computed. Calibration inputs are the graph's example inputs with a fresh seeded Gaussian latent per
sample and the timestep set to each calibration value.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.blocks import frames_view, insert_tap
from graphopt.errors import GraphoptError
from graphopt.fxutil import first
from graphopt.io import atomic_path
from graphopt.pass_manager import Analysis, register, rel_error

aten = torch.ops.aten
POLICIES = ("hierarchical", "importance")


@dataclass
class BlockImportanceOptions:
    timesteps: tuple[float, ...] = (900.0, 700.0, 500.0, 300.0, 100.0)
    samples: int = 2                   # calibration latents per timestep
    seed: int = 0

    def __post_init__(self):
        self.timesteps = tuple(float(t) for t in self.timesteps)
        if not self.timesteps:
            raise GraphoptError("block-importance needs at least one timestep")
        if self.samples < 1:
            raise GraphoptError(f"block-importance samples must be >= 1, got {self.samples}")


@dataclass
class BlockImportance:
    """Blocks × timesteps matrices (rows follow `graph.blocks`); content/motion None if unknown."""

    names: list[str]
    timesteps: list[float]
    output: torch.Tensor
    content: torch.Tensor | None
    motion: torch.Tensor | None

    def scores(self) -> list[float]:
        """One number per block: `output` averaged over the calibration timesteps."""
        return self.output.mean(1).tolist()

    def at(self, timestep: float) -> list[float]:
        """Per-block `output` at the calibration timestep nearest to `timestep`."""
        column = min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - timestep))
        return self.output[:, column].tolist()

    def to_markdown(self) -> str:
        rows = self._rows()
        return "\n".join(["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] +
                         ["| " + " | ".join(r) + " |" for r in rows[1:]])

    def table(self) -> str:
        rows = self._rows()
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows)

    def _rows(self) -> list[list[str]]:
        head = ["block", "name", "mean"] + [f"t={t:g}" for t in self.timesteps]
        if self.content is not None:
            head += ["content", "motion"]
        rows = [head]
        for i, name in enumerate(self.names):
            row = [str(i), name, f"{self.output[i].mean():.4f}"]
            row += [f"{v:.4f}" for v in self.output[i].tolist()]
            if self.content is not None:
                row += [f"{self.content[i].mean():.4f}", f"{self.motion[i].mean():.4f}"]
            rows.append(row)
        return rows

    def plot(self, path) -> None:
        """Heat maps (blocks × timesteps) of the output, content and motion errors, as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = [("output", self.output)]
        if self.content is not None:
            panels += [("content (per-frame mean)", self.content),
                       ("motion (frame differences)", self.motion)]
        fig = Figure(figsize=(3.2 * len(panels) + 1, 0.35 * len(self.names) + 2))
        FigureCanvasAgg(fig)
        for k, (title, matrix) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), k + 1)
            im = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis")
            ax.set_title(f"{title}\nrel. error when skipped", fontsize=9)
            ax.set_xticks(range(len(self.timesteps)), [f"{t:g}" for t in self.timesteps],
                          fontsize=7)
            ax.set_xlabel("timestep")
            ax.set_yticks(range(len(self.names)), self.names if k == 0 else [], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


@register
class BlockImportancePass(Analysis):
    name = "block-importance"
    Options = BlockImportanceOptions

    def run(self, graph) -> BlockImportance:
        return block_importance(graph, self.options)


def block_importance(graph, options: BlockImportanceOptions | None = None) -> BlockImportance:
    o = options or BlockImportanceOptions()
    if graph.is_meta:
        raise GraphoptError("block importance runs the model, but this graph has no weights "
                            "(meta device): load the weights first, or replay a recipe that "
                            "already holds the drop/route decisions")
    if not graph.blocks:
        raise GraphoptError("the graph has no blocks left to score")
    harness, skip, tap = _skip_harness(graph)
    frames_of = frames_view(graph)
    t_name, x_name = graph.timestep_input, graph.latent_input
    for name in (t_name, x_name):
        if not isinstance(graph.example_inputs.get(name), torch.Tensor):
            raise GraphoptError(f"block importance needs the tensor input '{name}' in the "
                                f"example inputs (it has {sorted(graph.example_inputs)})")
    n, n_t = len(graph.blocks), len(o.timesteps)
    output = torch.zeros(n, n_t, dtype=torch.float64)
    content = torch.zeros(n, n_t, dtype=torch.float64)
    motion = torch.zeros(n, n_t, dtype=torch.float64)
    latent = graph.example_inputs[x_name]
    generator = torch.Generator().manual_seed(o.seed)
    with torch.no_grad():
        for _ in range(o.samples):
            x = torch.randn(latent.shape, generator=generator).to(latent.device, latent.dtype)
            for ti, t in enumerate(o.timesteps):
                ex = graph.example_inputs[t_name]
                inputs = {**graph.example_inputs, x_name: x, t_name: torch.full_like(ex, t)}
                skip.zero_()
                y = first(harness(**inputs))
                stream = frames_of(tap.value) if frames_of else None
                for b in range(n):
                    skip.zero_()
                    skip[b] = True
                    y_b = first(harness(**inputs))
                    output[b, ti] += rel_error(y_b, y)
                    if stream is not None:
                        s_b = frames_of(tap.value)
                        content[b, ti] += rel_error(s_b.mean(2), stream.mean(2))
                        motion[b, ti] += rel_error(s_b.diff(dim=1), stream.diff(dim=1))
    scale = 1.0 / o.samples
    has_split = frames_of is not None
    return BlockImportance([b.name for b in graph.blocks], list(o.timesteps), output * scale,
                           content * scale if has_split else None,
                           motion * scale if has_split else None)


def rank_blocks(scores, policy: str, protect_deep: float) -> list[int]:
    """Block indices from most to least worth keeping.

    importance: by score, highest first. hierarchical (VDMini): the deep blocks, index ≥
    n_shallow = ⌊(1 − protect_deep)·n⌋, all come first (by score), then the shallow ones by score,
    so removing from the end of the list only ever removes shallow blocks. Ties go to the shallower
    block.
    """
    if policy not in POLICIES:
        raise GraphoptError(f"block policy '{policy}' unknown; choose one of {POLICIES}")
    if not 0.0 <= protect_deep <= 1.0:
        raise GraphoptError(f"protect_deep must be in [0, 1], got {protect_deep}")
    n = len(scores)
    by_score = sorted(range(n), key=lambda i: (-float(scores[i]), i))
    if policy == "importance":
        return by_score
    shallow = n_shallow(n, protect_deep)
    return [i for i in by_score if i >= shallow] + [i for i in by_score if i < shallow]


def n_shallow(n_blocks: int, protect_deep: float) -> int:
    """How many leading blocks the hierarchical policy may remove: ⌊(1 − protect_deep)·n⌋."""
    return int(math.floor((1.0 - protect_deep) * n_blocks + 1e-9))


def _skip_harness(graph):
    """(module, skip flags, tap): setting skip[b] makes block b the identity on its stream.

    One module for every block (weights shared with the graph, nothing copied): each stream output
    is read through where(skip[b], stream_in, stream_out), an exact selection.
    """
    gm = fx.GraphModule(graph.gm, copy.deepcopy(graph.gm.graph))
    skip = torch.zeros(len(graph.blocks), dtype=torch.bool)
    gm.register_buffer("graphopt_skip", skip)
    nodes = {n.name: n for n in gm.graph.nodes}
    g = gm.graph
    tap = insert_tap(gm, nodes[graph.blocks[-1].stream_out[0]], "graphopt_tap")
    passes_on = {}                      # stream output -> the selection that replaced it
    for block in graph.blocks:
        inside = {nodes[m] for m in block.nodes}
        for s_in, s_out in zip(block.stream_in, block.stream_out):
            out = nodes[s_out]
            with g.inserting_after(out):
                flags = g.get_attr("graphopt_skip")
                with g.inserting_after(flags):
                    flag = g.call_function(aten.select.int, (flags, 0, block.index))
                with g.inserting_after(flag):
                    chosen = g.call_function(aten.where.self,
                                             (flag, passes_on.get(s_in, nodes[s_in]), out))
            out.replace_all_uses_with(chosen, delete_user_cb=lambda u: u not in inside
                                      and u is not chosen)
            passes_on[s_out] = chosen
    g.lint()
    gm.recompile()
    return gm, skip, tap
