"""head-roles: is each attention head spatial (attends inside its frame) or temporal (attends
across frames at the same place)? PARE's width criterion needs the answer but does not publish its
statistic; this is Sparse VideoGen's test (Xi et al., ICML 2025) plus attention-mass diagnostics.

For each video self-attention (and joint video+text attention), head h, calibration input x and
batch row r, n_q query tokens are drawn among the video tokens (`queries`, default 64; seeded,
the same draw for every head and row of one attention and input).
Only their attention rows are formed, (n_q × keys), never the full tokens × tokens map. With
logits ℓ (scaled q·k plus the attention's own mask) and V the values:

    O   = softmax(ℓ) V                               the head's output for the sampled queries
    O_S = softmax(ℓ restricted to keys in the query's frame, and text keys) V      spatial mask
    O_T = softmax(ℓ restricted to keys at the query's (y, x) in any frame, and text keys) V
    E_S = mean((O_S − O)²),  E_T = mean((O_T − O)²)  over queries and channels
    ε   = 1e-6 · mean(O²)
    s   = (E_S + ε) / (E_S + E_T + 2ε)

The temporal score of a head is the mean of s over calibration inputs and batch rows, in [0, 1]:
1 when keeping only the same-place keys reproduces the head and keeping only its frame does not,
0 for the reverse, 0.5 when both masks are equally good (or both exact, as for a head that attends
to its own token only). Role: temporal if score ≥ 0.5 + margin, spatial if score ≤ 0.5 − margin,
mixed otherwise; the default margin 0.1 asks one mask's error to be at least 1.5× the other's.

Diagnostics (means over sampled queries, rows and inputs; P = softmax(ℓ)):
    spatial_mass  = Σ P over video keys in the query's frame (its own token included)
    temporal_mass = Σ P over video keys in other frames
    text_mass     = Σ P over text keys (joint attention; 0 otherwise)
    same_position = Σ P over other-frame keys at the query's (y, x) / temporal_mass: how
                    concentrated the cross-frame mass is at the same place (1: pure temporal head)

Text keys are kept in both masks (as Sparse VideoGen does for joint attention): the test is about
how a head mixes video tokens. Sequence layouts come from the family table (`graph.family`), or,
without one, every self-attention over exactly frames·h·w tokens is taken as video in (frame, y, x)
row-major order. Attentions whose sequences are one frame (Latte spatial blocks, image DiTs) or one
place across frames (Latte temporal blocks) have their role by construction: spatial with score 0,
resp. temporal with score 1 (`measured` False, diagnostics NaN). Cross-attention has no role.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from graphopt.calibration import (BlockOffload, SdpaCall, calibration_inputs,
                                  check_calibration, require_weights, run_attentions)
from graphopt.errors import GraphoptError
from graphopt.io import atomic_path
from graphopt.pass_manager import Pass, register

ROLES = ("spatial", "temporal", "mixed")
_LOGIT_BUDGET = 1 << 24        # float32 elements per head chunk of (rows, heads, queries, keys)


@dataclass
class HeadRolesOptions:
    queries: int = 64                          # sampled query tokens per attention and input
    margin: float = 0.1                        # mixed band: |score − 0.5| < margin
    timesteps: int | tuple[float, ...] = 4     # calibration: a count (in [50, 950]) or a list
    samples: int = 1                           # calibration latents per timestep
    seed: int = 0
    data: str | None = None                    # calibration inputs from a .safetensors file
    attentions: tuple[str, ...] | None = None  # restrict to these attentions (module paths)
    offload: str | None = None                 # run on this device, one block's weights at a time

    def __post_init__(self):
        if not isinstance(self.queries, int) or self.queries < 1:
            raise GraphoptError(f"head-roles queries must be an int >= 1, got {self.queries!r}")
        if not 0.0 <= self.margin < 0.5:
            raise GraphoptError(f"head-roles margin must be in [0, 0.5), got {self.margin}")
        if isinstance(self.timesteps, list):
            self.timesteps = tuple(self.timesteps)
        check_calibration(self.timesteps, self.samples)
        if self.attentions is not None:
            self.attentions = tuple(self.attentions)


@dataclass
class AttentionRoles:
    """Per-head results of one attention (tensors of shape (heads,), float64)."""

    name: str
    block: int | None
    measured: bool                    # False: role fixed by the sequence layout
    temporal_score: torch.Tensor
    roles: list[str]
    spatial_mass: torch.Tensor
    temporal_mass: torch.Tensor
    text_mass: torch.Tensor
    same_position: torch.Tensor
    error_spatial: torch.Tensor       # E_S / mean(O²), averaged
    error_temporal: torch.Tensor      # E_T / mean(O²), averaged


@dataclass
class HeadRoles:
    attentions: dict[str, AttentionRoles]
    margin: float
    inputs: int                       # calibration inputs the statistics average over
    queries: int
    timesteps: list[float] = field(default_factory=list)

    def roles(self, name: str) -> list[str]:
        return self.attentions[name].roles

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ROLES, 0)
        for a in self.attentions.values():
            for r in a.roles:
                out[r] += 1
        return out

    def _rows(self):
        for a in self.attentions.values():
            n = {r: a.roles.count(r) for r in ROLES}
            per_head = " ".join(f"{r[0].upper()}{s:.2f}" for r, s in
                                zip(a.roles, a.temporal_score.tolist()))
            yield (a.name, "-" if a.block is None else str(a.block),
                   "measured" if a.measured else "by layout", str(n["spatial"]),
                   str(n["temporal"]), str(n["mixed"]), per_head)

    _HEADER = ("attention", "block", "how", "spatial", "temporal", "mixed",
               "per head: role, temporal score")

    def to_table(self):
        """A rich Table: one row per attention, each head as role initial + temporal score."""
        from rich.table import Table

        c = self.counts()
        t = Table(title=f"head roles: {c['spatial']} spatial, {c['temporal']} temporal, "
                        f"{c['mixed']} mixed (margin {self.margin:g}, {self.inputs} inputs x "
                        f"{self.queries} queries)")
        for col in self._HEADER:
            t.add_column(col, justify="right" if col in ROLES else "left")
        for row in self._rows():
            t.add_row(*row)
        return t

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self._HEADER) + " |",
                 "|" + "|".join("---" for _ in self._HEADER) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """PNG heat map, attentions (layers) × heads, of the temporal score (blue 0 … red 1)."""
        c = self.counts()
        heatmap(path, list(self.attentions),
                [a.temporal_score for a in self.attentions.values()],
                title=f"temporal score per head ({c['spatial']} spatial, {c['temporal']} temporal, "
                      f"{c['mixed']} mixed)",
                label="temporal score", vmin=0.0, vmax=1.0, cmap="coolwarm")


def heatmap(path, names: list[str], rows: list[torch.Tensor], *, title: str, label: str,
            vmin=None, vmax=None, cmap: str = "viridis") -> None:
    """Write a rows × heads heat map as a PNG, atomically (rows of unequal length padded blank)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise GraphoptError(f"nothing to plot for '{title}': no attention was analysed")
    width = max(len(r) for r in rows)
    grid = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        grid[i, :len(r)] = r.double()
    fig = Figure(figsize=(min(3 + 0.25 * width, 24), min(1.5 + 0.22 * len(rows), 40)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_yticks(range(len(names)), names, fontsize=max(4, min(8, 400 // max(len(names), 1))))
    ax.set_xticks(range(width), [str(h) for h in range(width)], fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, label=label)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


@register
class HeadRolesPass(Pass):
    name = "head-roles"
    Options = HeadRolesOptions

    def run(self, graph) -> HeadRoles:
        return head_roles(graph, self.options)


def head_roles(graph, options: HeadRolesOptions | None = None, *,
               inputs: list[dict] | None = None) -> HeadRoles:
    """Role and temporal score of every head of the video self-attentions (see module docstring).

    `inputs` (model kwargs) replaces the calibration inputs the options describe.
    """
    o = options or HeadRolesOptions()
    require_weights(graph, "head-roles")
    layouts = video_layouts(graph, o.attentions)
    if inputs is None:
        inputs = calibration_inputs(graph, timesteps=o.timesteps, samples=o.samples, seed=o.seed,
                                    data=o.data)
    if not inputs:
        raise GraphoptError("head-roles got no calibration inputs")
    stats = {}
    for ordinal, (name, (q_layout, k_layout)) in enumerate(layouts.items()):
        att = graph.attentions[name]
        if q_layout.kind == "video":
            stats[att.sdpa] = _RoleStatistic(att, q_layout, k_layout, o.queries,
                                             (o.seed, ordinal))
    run_attentions(graph, inputs, stats, desc="head roles",
                   offload=BlockOffload(graph, o.offload) if o.offload else None)
    result = {}
    for name, (q_layout, _) in layouts.items():
        att = graph.attentions[name]
        if q_layout.kind == "video":
            result[name] = stats[att.sdpa].finish(o.margin, len(inputs))
        else:
            score = 0.0 if q_layout.kind == "frame" else 1.0
            nan = torch.full((att.heads,), float("nan"), dtype=torch.float64)
            result[name] = AttentionRoles(
                name, att.block, False, torch.full((att.heads,), score, dtype=torch.float64),
                [role_of(score, o.margin)] * att.heads, nan, nan.clone(), nan.clone(),
                nan.clone(), nan.clone(), nan.clone())
    t_name = graph.family.timestep_input if graph.family is not None else "timestep"
    timesteps = [float(x[t_name].reshape(-1)[0]) for x in inputs
                 if isinstance(x.get(t_name), torch.Tensor)]
    return HeadRoles(result, o.margin, len(inputs), o.queries, timesteps)


def role_of(score: float, margin: float) -> str:
    if score >= 0.5 + margin:
        return "temporal"
    if score <= 0.5 - margin:
        return "spatial"
    return "mixed"


def video_layouts(graph, names=None) -> dict:
    """(query layout, key layout) of each attention whose query and keys both hold video tokens."""
    from graphopt.families import SequenceLayout

    if names is not None:
        unknown = sorted(set(names) - set(graph.attentions))
        if unknown:
            raise GraphoptError(f"no attention(s) {unknown} in the graph; it has "
                                f"{sorted(graph.attentions)}")
    chosen = [a for a in graph.attentions.values() if names is None or a.name in names]
    out = {}
    if graph.family is not None and graph.spec is not None:
        for a in chosen:
            q, k = graph.family.sequence_layouts(a.name, graph.config, graph.spec)
            if q.kind != "text" and k.kind != "text":
                out[a.name] = (q, k)
    elif graph.token_layout is not None:
        frames, h, w = graph.token_layout
        for a in chosen:
            if a.kind == "self" and a.q_tokens == a.kv_tokens == frames * h * w:
                rows = graph.node(a.sdpa).args[0].meta["val"].shape[0]
                layout = SequenceLayout("video", rows, frames, h, w)
                out[a.name] = (layout, layout)
    else:
        raise GraphoptError(
            "head roles need the video token layout (frames x h x w), and this graph does not know "
            "it: capture the model from a supported family with an InputSpec "
            "(graphopt.capture(model, spec=...)), or use prune criterion 'sensitivity' or "
            "'magnitude', which need no roles")
    if names is not None and not out:
        raise GraphoptError(f"none of the attentions {list(names)} attends over video tokens; "
                            f"head roles are defined for video self-attention only")
    return out


class _RoleStatistic:
    """Accumulates the module docstring's sums for one attention, input by input."""

    def __init__(self, att, q_layout, k_layout, queries: int, seed: tuple[int, int]):
        self.name, self.block, self.heads = att.name, att.block, att.heads
        self.q_layout, self.k_layout = q_layout, k_layout
        self.queries, self.seed = queries, seed
        self.q_coords = q_layout.coords(0)
        self.k_coords = k_layout.coords(0)
        self.video_queries = torch.nonzero(self.q_coords[:, 0] >= 0).flatten()
        zeros = lambda: torch.zeros(att.heads, dtype=torch.float64)  # noqa: E731
        self.score, self.e_s, self.e_t = zeros(), zeros(), zeros()
        self.spatial, self.temporal, self.text, self.same_pos = zeros(), zeros(), zeros(), zeros()
        self.rows = 0

    def _check(self, call: SdpaCall):
        q_len, k_len = call.q.shape[2], call.k.shape[2]
        if (q_len, k_len) != (self.q_layout.length, self.k_layout.length) \
                or call.q.shape[1] != self.heads:
            raise GraphoptError(
                f"attention '{self.name}' runs on {q_len} query and {k_len} key tokens with "
                f"{call.q.shape[1]} heads, but its layout says {self.q_layout.length} and "
                f"{self.k_layout.length} tokens with {self.heads} heads: the calibration inputs "
                f"must have the shape the model was captured with")

    def __call__(self, index: int, call: SdpaCall) -> None:
        self._check(call)
        seed, ordinal = self.seed
        g = torch.Generator().manual_seed(seed * 1_000_003 + ordinal * 7_919 + index)
        pick = torch.randperm(len(self.video_queries), generator=g)[:self.queries]
        qi = self.video_queries[pick].sort().values
        dev = call.q.device
        qc, kc = self.q_coords[qi].to(dev), self.k_coords.to(dev)
        video_key = kc[:, 0] >= 0
        same_frame = kc[None, :, 0] == qc[:, None, 0]                        # (n, keys)
        same_place = (kc[None, :, 1:] == qc[:, None, 1:]).all(-1) & video_key
        other_frame = video_key & ~same_frame
        spatial_keep = same_frame | ~video_key
        temporal_keep = same_place | ~video_key
        qi = qi.to(dev)
        rows = call.q.shape[0]
        chunk = max(1, _LOGIT_BUDGET // (rows * len(qi) * call.k.shape[2]))
        for h0 in range(0, self.heads, chunk):
            heads = slice(h0, min(h0 + chunk, self.heads))
            logits = call.logits(qi, heads)                                  # (rows, h, n, keys)
            v = _values(call, heads)
            p = logits.softmax(-1)
            out = p @ v
            e_s = _masked_output_error(logits, spatial_keep, v, out)
            e_t = _masked_output_error(logits, temporal_keep, v, out)
            ref = out.pow(2).mean((-1, -2))
            eps = 1e-6 * ref + 1e-30
            s = (e_s + eps) / (e_s + e_t + 2 * eps)
            self.score[heads] += _row_sum(s)
            self.e_s[heads] += _row_sum(e_s / (ref + 1e-30))
            self.e_t[heads] += _row_sum(e_t / (ref + 1e-30))
            self.spatial[heads] += _row_sum((p * same_frame).sum(-1).mean(-1))
            self.temporal[heads] += _row_sum((p * other_frame).sum(-1).mean(-1))
            self.text[heads] += _row_sum((p * ~video_key).sum(-1).mean(-1))
            self.same_pos[heads] += _row_sum((p * (same_place & other_frame)).sum(-1).mean(-1))
        self.rows += rows

    def finish(self, margin: float, n_inputs: int) -> AttentionRoles:
        if self.rows == 0:
            raise GraphoptError(f"attention '{self.name}' never ran on the calibration inputs")
        mean = lambda t: t / self.rows  # noqa: E731
        temporal = mean(self.temporal)
        same = torch.where(temporal > 0, mean(self.same_pos) / temporal.clamp_min(1e-30),
                           torch.full_like(temporal, math.nan))
        score = mean(self.score)
        return AttentionRoles(self.name, self.block, True, score,
                              [role_of(float(s), margin) for s in score], mean(self.spatial),
                              temporal, mean(self.text), same, mean(self.e_s), mean(self.e_t))


def _values(call: SdpaCall, heads: slice) -> torch.Tensor:
    v = call.v
    if call.enable_gqa and v.shape[1] != call.q.shape[1]:
        v = v.repeat_interleave(call.q.shape[1] // v.shape[1], dim=1)
    return v[:, heads].float()


def _masked_output_error(logits, keep, v, out) -> torch.Tensor:
    """mean((softmax(logits where keep) V − out)²) per (row, head)."""
    p = logits.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (p @ v - out).pow(2).mean((-1, -2))


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """(rows, heads) → (heads,) float64 on the CPU, summed over rows."""
    return x.double().sum(0).cpu()
