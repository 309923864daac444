"""head-roles: is each attention head spatial (looks inside its frame) or temporal (looks at the
same place in other frames)? PARE's width criterion needs the answer but does not publish its
statistic. Two are offered (`statistic`); both see only the attention rows of sampled queries.

For each video self-attention (and joint video+text attention), head h, calibration input x and
batch row r, n_q query tokens are drawn among the video tokens (`queries`, default 64; seeded,
the same draw for every head and row of one attention and input). Only their attention rows are
formed, (n_q × keys), never the full tokens × tokens map. For a query i at (frame f, y, x):

    S(i) = the video keys of frame f, i itself excepted                      (the frame)
    T(i) = the video keys of the other frames within `radius` of (y, x):
           max(|y' − y|, |x' − x|) ≤ radius                                  (the place, over time)

`radius` (default 1 token) lets a temporal head follow what moves: at radius 0, T is exactly the
same (y, x) in every other frame (Sparse VideoGen's temporal mask), which misses a head that looks
where an object has gone. P = softmax(ℓ), ℓ the scaled q·k logits with the attention's own mask.

"attention-density" (default): where does the head look, compared with looking everywhere alike?

    lift_S = (P(S) / P(K)) / (|S| / |K|)      K: all video keys; 1 for uniform attention
    lift_T = (P(T) / P(K)) / (|T| / |K|)
    s      = (lift_T + ε) / (lift_S + lift_T + 2ε),  ε = 1e-6,  lifts averaged over the queries

A lift is a density, so the two masks compare fairly although the frame holds many more keys than
the place. What it cannot undo: a head that looks at its neighbourhood in space and time alike has
more density on the small place than on the whole frame, so it leans temporal (on tiny-wan such
heads, with 0.3–0.45 of their attention in their own frame and lifts of 2–3 vs 3.3–4, score
0.55–0.66: mixed, or temporal at the margin).

"output-error" (Sparse VideoGen, Xi et al., ICML 2025): which mask reproduces the head's output?
With V the values, O = softmax(ℓ) V, O_S with keys restricted to S ∪ {i} and O_T to T ∪ {i} (text
keys kept in both, as Sparse VideoGen does for joint attention):

    E_S = mean((O_S − O)²),  E_T = mean((O_T − O)²)  over queries and channels
    s   = (E_S + ε') / (E_S + E_T + 2ε'),  ε' = 1e-6 · mean(O²)

Why density is the default: output error asks whether a mask's *values* reproduce the head, and on
slowly changing video a frame's own values are nearly those of its neighbours, so the frame mask
reproduces heads that look elsewhere. On the shipped tiny-wan teacher (objects move half a token per
frame) output error scores every head below 0.5 + margin: 30 spatial, 0 temporal, 2 mixed. Density
finds 12 temporal heads; the clearest put at most 0.10 of their attention on their own frame and
0.37–0.60 of their cross-frame attention on the 3 × 3 place (0.12 for uniform attention). The two
rank heads alike (3 of their 4 most temporal heads are the same); only output error's scale is
shifted. Masking density's 4 most temporal heads keeps colour (1.00) and shape (0.93) while direction
adherence falls to 0.55; masking its 4 most spatial heads drops shape to 0.65 and direction to 0.58
(`python tools/bench_head_roles.py`): the temporal heads carry motion, the spatial ones content and,
through it, motion too.

The temporal score of a head is the mean of s over calibration inputs and batch rows, in [0, 1]:
1 for a head that looks only at the place across frames, 0 for one that looks only inside its
frame, 0.5 for one that looks everywhere alike (density) or whose two masks are equally good
(output error), and for one that attends to its own token only (both). Role: temporal if
score ≥ 0.5 + margin, spatial if score ≤ 0.5 − margin, mixed otherwise; the default margin 0.1 asks
one lift (error) to be at least 1.5× the other.

Diagnostics (means over sampled queries, rows and inputs; every field is computed whichever
statistic decides):
    spatial_mass  = Σ P over video keys in the query's frame (its own token included)
    temporal_mass = Σ P over video keys in other frames
    text_mass     = Σ P over text keys (joint attention; 0 otherwise)
    window_share  = P(T) / temporal_mass: how much of the cross-frame mass is at the place
    spatial_lift, temporal_lift, error_spatial (E_S / mean(O²)), error_temporal (E_T / mean(O²))

Sequence layouts come from the family table (`graph.family`), or, without one, every
self-attention over exactly frames·h·w tokens is taken as video in (frame, y, x) row-major order.
Attentions whose sequences are one frame (Latte spatial blocks, image DiTs) or one place across
frames (Latte temporal blocks) have their role by construction: spatial with score 0, resp.
temporal with score 1 (`measured` False, diagnostics NaN). Cross-attention has no role.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import torch

from graphopt.calibration import (BlockOffload, SdpaCall, calibration_inputs,
                                  check_calibration, require_weights, run_attentions)
from graphopt.errors import GraphoptError
from graphopt.io import atomic_path
from graphopt.pass_manager import Analysis, register

ROLES = ("spatial", "temporal", "mixed")
STATISTICS = ("attention-density", "output-error")
_LOGIT_BUDGET = 1 << 24        # float32 elements per head chunk of (rows, heads, queries, keys)


@dataclass
class HeadRolesOptions:
    statistic: str = "attention-density"       # or "output-error" (Sparse VideoGen's test)
    radius: int = 1                            # the place: tokens around (y, x) in other frames
    queries: int = 64                          # sampled query tokens per attention and input
    margin: float = 0.1                        # mixed band: |score − 0.5| < margin
    timesteps: int | tuple[float, ...] = 4     # calibration: a count (in [50, 950]) or a list
    samples: int = 1                           # calibration latents per timestep
    seed: int = 0
    data: str | None = None                    # calibration inputs from a .safetensors file
    attentions: tuple[str, ...] | None = None  # restrict to these attentions (module paths)
    offload: str | None = None                 # run on this device, one block's weights at a time

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise GraphoptError(f"head-roles statistic must be one of {list(STATISTICS)}, "
                                f"got {self.statistic!r}")
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or self.radius < 0:
            raise GraphoptError(f"head-roles radius must be an int >= 0 (tokens), got "
                                f"{self.radius!r}")
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
    temporal_score: torch.Tensor      # the chosen statistic's score, which gives the roles
    roles: list[str]
    density_score: torch.Tensor
    error_score: torch.Tensor
    spatial_mass: torch.Tensor
    temporal_mass: torch.Tensor
    text_mass: torch.Tensor
    window_share: torch.Tensor
    spatial_lift: torch.Tensor
    temporal_lift: torch.Tensor
    error_spatial: torch.Tensor       # E_S / mean(O²), averaged
    error_temporal: torch.Tensor      # E_T / mean(O²), averaged


@dataclass
class HeadRoles:
    attentions: dict[str, AttentionRoles]
    statistic: str
    radius: int
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
                        f"{c['mixed']} mixed ({self.statistic}, radius {self.radius}, margin "
                        f"{self.margin:g}, {self.inputs} inputs x {self.queries} queries)")
        for col in self._HEADER:
            t.add_column(col, justify="right" if col in ROLES else "left")
        for row in self._rows():
            t.add_row(*row)
        return t

    def to_markdown(self) -> str:
        c = self.counts()
        lines = [f"{c['spatial']} spatial, {c['temporal']} temporal, {c['mixed']} mixed "
                 f"({self.statistic}, radius {self.radius}, margin {self.margin:g}, "
                 f"{self.inputs} inputs x {self.queries} queries)", "",
                 "| " + " | ".join(self._HEADER) + " |",
                 "|" + "|".join("---" for _ in self._HEADER) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """PNG heat map, attentions (layers) × heads, of the temporal score (blue 0 … red 1)."""
        c = self.counts()
        heatmap(path, list(self.attentions),
                [a.temporal_score for a in self.attentions.values()],
                title=f"temporal score per head, {self.statistic} ({c['spatial']} spatial, "
                      f"{c['temporal']} temporal, {c['mixed']} mixed)",
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
    fig_width = min(3 + 0.25 * width, 24)
    fig = Figure(figsize=(fig_width, min(1.5 + 0.22 * len(rows), 40)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(grid.numpy(), aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_title(textwrap.fill(title, int(fig_width * 11)), fontsize=9)   # ~11 chars per inch
    ax.set_xlabel("head")
    ax.set_yticks(range(len(names)), names, fontsize=max(4, min(8, 400 // max(len(names), 1))))
    ax.set_xticks(range(width), [str(h) for h in range(width)], fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, label=label)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


@register
class HeadRolesPass(Analysis):
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
            stats[att.sdpa] = _RoleStatistic(att, q_layout, k_layout, o.queries, o.radius,
                                             (o.seed, ordinal))
    run_attentions(graph, inputs, stats, desc="head roles",
                   offload=BlockOffload(graph, o.offload) if o.offload else None)
    result = {}
    for name, (q_layout, _) in layouts.items():
        att = graph.attentions[name]
        if q_layout.kind == "video":
            result[name] = stats[att.sdpa].finish(o.statistic, o.margin)
        else:
            score = torch.full((att.heads,), 0.0 if q_layout.kind == "frame" else 1.0,
                               dtype=torch.float64)
            nan = lambda: torch.full((att.heads,), math.nan, dtype=torch.float64)  # noqa: E731
            result[name] = AttentionRoles(
                name, att.block, False, score, [role_of(float(score[0]), o.margin)] * att.heads,
                score.clone(), score.clone(), *(nan() for _ in range(8)))
    t_name = graph.timestep_input
    timesteps = [float(x[t_name].reshape(-1)[0]) for x in inputs
                 if isinstance(x.get(t_name), torch.Tensor)]
    return HeadRoles(result, o.statistic, o.radius, o.margin, len(inputs), o.queries, timesteps)


def role_of(score: float, margin: float) -> str:
    if score >= 0.5 + margin:
        return "temporal"
    if score <= 0.5 - margin:
        return "spatial"
    return "mixed"


def video_layouts(graph, names=None) -> dict:
    """(query layout, key layout) of each attention whose query and keys both hold video tokens."""
    from graphopt.layout import SequenceLayout

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

    _SUMS = ("density", "error", "spatial", "temporal", "text", "window", "lift_s", "lift_t",
             "e_s", "e_t")

    def __init__(self, att, q_layout, k_layout, queries: int, radius: int,
                 seed: tuple[int, int]):
        self.name, self.block, self.heads = att.name, att.block, att.heads
        self.q_layout, self.k_layout = q_layout, k_layout
        self.queries, self.radius, self.seed = queries, radius, seed
        self.q_coords = q_layout.coords(0)
        self.k_coords = k_layout.coords(0)
        self.video_queries = torch.nonzero(self.q_coords[:, 0] >= 0).flatten()
        self.sums = {k: torch.zeros(att.heads, dtype=torch.float64) for k in self._SUMS}
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

    def _masks(self, qi: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """(n, keys) boolean masks of the sampled queries: video, frame S, place T, self."""
        qc, kc = self.q_coords[qi].to(device), self.k_coords.to(device)
        video = (kc[:, 0] >= 0).expand(len(qi), -1)
        same_frame = (kc[None, :, 0] == qc[:, None, 0]) & video
        near = (kc[None, :, 1:] - qc[:, None, 1:]).abs().amax(-1) <= self.radius
        own = same_frame & (kc[None, :, 1:] == qc[:, None, 1:]).all(-1)
        return {"video": video, "frame": same_frame, "S": same_frame & ~own,
                "T": near & video & ~same_frame, "own": own}

    def __call__(self, index: int, call: SdpaCall) -> None:
        self._check(call)
        seed, ordinal = self.seed
        g = torch.Generator().manual_seed(seed * 1_000_003 + ordinal * 7_919 + index)
        pick = torch.randperm(len(self.video_queries), generator=g)[:self.queries]
        qi = self.video_queries[pick].sort().values
        m = self._masks(qi, call.q.device)
        # |S|/|V| and |T|/|V| per query: the mass uniform attention over video keys puts there.
        count = {k: m[k].sum(-1).double() for k in ("video", "S", "T")}
        uniform_s = (count["S"] / count["video"]).clamp_min(1e-30)   # a frame of one token
        uniform_t = (count["T"] / count["video"]).clamp_min(1e-30)   # a clip of one frame
        spatial_keep = m["S"] | m["own"] | ~m["video"]
        temporal_keep = m["T"] | m["own"] | ~m["video"]
        qi = qi.to(call.q.device)
        rows = call.q.shape[0]
        chunk = max(1, _LOGIT_BUDGET // (rows * len(qi) * call.k.shape[2]))
        for h0 in range(0, self.heads, chunk):
            heads = slice(h0, min(h0 + chunk, self.heads))
            logits = call.logits(qi, heads)                                  # (rows, h, n, keys)
            p = logits.softmax(-1)
            mass = {k: (p * m[k]).sum(-1).double() for k in ("video", "frame", "S", "T")}
            video = mass["video"].clamp_min(1e-30)
            lift_s = (mass["S"] / video / uniform_s).mean(-1)
            lift_t = (mass["T"] / video / uniform_t).mean(-1)
            v = _values(call, heads)
            out = p @ v
            e_s = _masked_output_error(logits, spatial_keep, v, out)
            e_t = _masked_output_error(logits, temporal_keep, v, out)
            ref = out.pow(2).mean((-1, -2))
            eps = 1e-6 * ref + 1e-30
            cross = mass["video"] - mass["frame"]
            add = {"density": (lift_t + 1e-6) / (lift_s + lift_t + 2e-6),
                   "error": (e_s + eps) / (e_s + e_t + 2 * eps),
                   "spatial": mass["frame"].mean(-1), "temporal": cross.mean(-1),
                   "text": (1 - mass["video"]).mean(-1),
                   "window": (mass["T"] / cross.clamp_min(1e-30)).mean(-1),
                   "lift_s": lift_s, "lift_t": lift_t,
                   "e_s": e_s / (ref + 1e-30), "e_t": e_t / (ref + 1e-30)}
            for k, x in add.items():
                self.sums[k][heads] += _row_sum(x)
        self.rows += rows

    def finish(self, statistic: str, margin: float) -> AttentionRoles:
        if self.rows == 0:
            raise GraphoptError(f"attention '{self.name}' never ran on the calibration inputs")
        mean = {k: v / self.rows for k, v in self.sums.items()}
        score = mean["density" if statistic == "attention-density" else "error"]
        return AttentionRoles(
            self.name, self.block, True, score, [role_of(float(s), margin) for s in score],
            mean["density"], mean["error"], mean["spatial"], mean["temporal"], mean["text"],
            mean["window"], mean["lift_s"], mean["lift_t"], mean["e_s"], mean["e_t"])


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
