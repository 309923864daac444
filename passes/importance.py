"""head-importance: how much each attention head is worth keeping (prune's ranking; PARE's width).

One score per head, higher = keep. f is the model's first output, m the head masks of
`prune.mask_heads` (head h of an attention scaled by m_h; m = 1 is the model itself), x runs over
the calibration inputs.

magnitude     M_h = sqrt( Σ_P ‖W_P[rows of h]‖² + Σ_C ‖W_C[:, columns of h]‖² )
              over the attention's q/k/v projections P (separate or fused, video and text streams)
              and its output projections C; a head's rows/columns come from the head-axis labels
              (`headflow.kept_indices`). Biases and norm weights are not counted. Needs no data.

sensitivity   S_h = sqrt( Σ_x ‖Δ_h(x)‖² / Σ_x ‖f(x)‖² ): the relative change of the output when
              head h alone is removed.
              method "taylor" (default) takes the first-order change Δ_h = ∂f/∂m_h at m = 1 and
              estimates its squared norm with random probes: ‖∂f/∂m_h‖² = E_r[(∂⟨f, r⟩/∂m_h)²],
              r ~ N(0, I), `probes` backward passes per input after one forward pass. This is the
              Fisher information of the mask under a unit-variance Gaussian output model (the
              head-mask Fisher of Kwon et al., 2022, "A Fast Post-Training Pruning Framework for
              Transformers"). We use it rather than |m·∂L/∂m| with L = ‖f(m) − f(1)‖², whose
              gradient at m = 1 is zero, and rather than a loss against an arbitrary target, which
              only sees Δ_h along that target. Relative standard deviation of the estimate per head
              ≈ sqrt(2 / (inputs × probes)).
              method "exact" measures Δ_h = f(m with m_h = 0) − f(1): one forward per head and
              input.

role-aware    (default, PARE)  I_h = φ_h · S_h / mean{ S_h' : h' in group(h) }
              group(h) is the head's role from head-roles (spatial, temporal or mixed) for heads of
              video self/joint attentions, "other" for heads of attentions without a role (cross-
              attention); the mean runs over that group's heads in all scored attentions (a group
              whose mean is 0 scores 0). φ_h = temporal_factor (PARE: 1.5) for temporal heads,
              else 1.
              Dividing by the group mean compares temporal heads with temporal heads and spatial
              with spatial; the factor then keeps motion-carrying temporal heads ahead of spatial
              heads of equal standing.

FFN hidden channels (`channel_importance`, prune's ffn_ratio) are scored by the same magnitude
and sensitivity formulas with a channel in place of a head: its up-projection rows (both halves
of a gated unit), its down-projection column, and a mask on its input to the down projection.

Sensitivity and role-aware run the model (calibration, refused on a meta graph); by default on
`calibration.calibration_inputs(graph)`, the same inputs head-roles uses by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from graphopt import headflow
from graphopt.calibration import (BlockOffload, calibration_inputs, check_calibration,
                                  require_weights)
from graphopt.errors import GraphoptError
from graphopt.fxutil import first
from graphopt.pass_manager import Analysis, register
from graphopt.passes.head_roles import HeadRoles, HeadRolesOptions, head_roles, heatmap

CRITERIA = ("magnitude", "sensitivity", "role-aware")
METHODS = ("taylor", "exact")
OTHER = "other"                       # the group of heads that have no role (cross-attention)


@dataclass
class HeadImportanceOptions:
    criterion: str = "role-aware"
    temporal_factor: float = 1.5               # role-aware: multiplier of temporal heads
    method: str = "taylor"                     # sensitivity: "taylor" (Fisher) or "exact" masking
    probes: int = 4                            # taylor: random output projections per input
    timesteps: int | tuple[float, ...] = 4     # calibration: a count (in [50, 950]) or a list
    samples: int = 1                           # calibration latents per timestep
    seed: int = 0
    data: str | None = None                    # calibration inputs from a .safetensors file
    attentions: tuple[str, ...] | None = None  # score these attentions (default: all prunable)
    offload: str | None = None                 # run on this device, one block's weights at a time
    roles: dict | None = None                  # role-aware: head-roles options, e.g. {"radius": 2}

    def __post_init__(self):
        _check(self.criterion, self.temporal_factor, self.method, self.probes)
        self.roles = role_options(self.roles)
        if isinstance(self.timesteps, list):
            self.timesteps = tuple(self.timesteps)
        check_calibration(self.timesteps, self.samples)
        if self.attentions is not None:
            self.attentions = tuple(self.attentions)


def role_options(roles: dict | None) -> dict:
    """Validated head-roles options for role-aware ranking (`HeadRolesOptions` fields)."""
    if roles is None:
        return {}
    if not isinstance(roles, dict):
        raise GraphoptError(f"roles must be a dict of head-roles options, e.g. "
                            f"{{\"statistic\": \"output-error\", \"radius\": 0}}, got {roles!r}")
    fields = set(HeadRolesOptions.__dataclass_fields__)
    unknown = sorted(set(roles) - fields)
    if unknown:
        raise GraphoptError(f"roles option(s) {unknown} unknown; head-roles takes {sorted(fields)}")
    HeadRolesOptions(**roles)
    return dict(roles)


def _check(criterion, temporal_factor, method, probes):
    if criterion not in CRITERIA:
        raise GraphoptError(f"head importance criterion '{criterion}' unknown; choose one of "
                            f"{', '.join(CRITERIA)}")
    if not temporal_factor > 0:
        raise GraphoptError(f"temporal_factor must be > 0, got {temporal_factor}")
    if method not in METHODS:
        raise GraphoptError(f"sensitivity method '{method}' unknown; choose taylor or exact")
    if not isinstance(probes, int) or probes < 1:
        raise GraphoptError(f"probes must be an int >= 1, got {probes!r}")


@dataclass
class HeadImportance:
    criterion: str
    scores: dict[str, torch.Tensor]              # attention → (heads,) float64
    groups: dict[str, list[str]] | None = None   # role-aware: each head's group

    def to_table(self):
        from rich.table import Table

        t = Table(title=f"head importance ({self.criterion})")
        for col in ("attention", "min", "mean", "max", "per head"):
            t.add_column(col, justify="left" if col in ("attention", "per head") else "right")
        for name, s in self.scores.items():
            t.add_row(name, f"{s.min():.4g}", f"{s.mean():.4g}", f"{s.max():.4g}",
                      " ".join(f"{v:.3g}" for v in s.tolist()))
        return t

    def to_markdown(self) -> str:
        lines = [f"| attention | {self.criterion} importance per head |", "|---|---|"]
        lines += [f"| {name} | {' '.join(f'{v:.3g}' for v in s.tolist())} |"
                  for name, s in self.scores.items()]
        return "\n".join(lines)

    def plot(self, path) -> None:
        """PNG heat map, attentions × heads, of the importance scores."""
        heatmap(path, list(self.scores), list(self.scores.values()),
                title=f"head importance ({self.criterion})", label="importance")


@register
class HeadImportancePass(Analysis):
    name = "head-importance"
    Options = HeadImportanceOptions

    def run(self, graph) -> HeadImportance:
        o = self.options
        inputs = None
        if o.criterion != "magnitude":
            require_weights(graph, f"head importance ({o.criterion})")
            inputs = calibration_inputs(graph, timesteps=o.timesteps, samples=o.samples,
                                        seed=o.seed, data=o.data)
        roles = None
        if o.criterion == "role-aware":
            roles = head_roles(graph, HeadRolesOptions(**{
                "timesteps": o.timesteps, "samples": o.samples, "seed": o.seed, "data": o.data,
                "offload": o.offload, **o.roles}), inputs=inputs)
        scores = head_importance(graph, o.criterion, temporal_factor=o.temporal_factor,
                                 attentions=o.attentions, inputs=inputs, method=o.method,
                                 probes=o.probes, seed=o.seed, roles=roles, offload=o.offload)
        groups = _groups(roles, scores) if roles is not None else None
        return HeadImportance(o.criterion, scores, groups)


def head_importance(graph, criterion: str = "role-aware", *, temporal_factor: float = 1.5,
                    attentions=None, inputs: list[dict] | None = None, method: str = "taylor",
                    probes: int = 4, seed: int = 0, roles: HeadRoles | None = None,
                    role_options: dict | None = None,
                    offload: str | None = None) -> dict[str, torch.Tensor]:
    """Importance of each head of `attentions` (default: every prunable one) by `criterion`.

    `inputs` (model kwargs) replaces the default calibration inputs; `roles` a head-roles result
    (default: `graph.analysis("head-roles", **role_options)`, or head-roles with `role_options`
    on `inputs` when they are given).
    `offload`: run on that device with one block's weights there at a time (calibration.py).
    """
    _check(criterion, temporal_factor, method, probes)
    names = _attention_names(graph, attentions)
    if criterion == "magnitude":
        return head_magnitude(graph, names)
    require_weights(graph, f"head importance ({criterion})")
    own_inputs = inputs is not None
    if roles is None and criterion == "role-aware":
        # Roles first: a graph without a video token layout fails before the costly part.
        role_options = role_options or {}
        roles = head_roles(graph, HeadRolesOptions(**{"offload": offload, **role_options}),
                           inputs=inputs) \
            if own_inputs or offload else graph.analysis("head-roles", **role_options)
    if not own_inputs:
        inputs = calibration_inputs(graph)
    sensitivity = head_sensitivity(graph, names, inputs, method=method, probes=probes, seed=seed,
                                   offload=offload)
    if criterion == "sensitivity":
        return sensitivity
    return role_aware(sensitivity, _groups(roles, sensitivity), temporal_factor)


def _attention_names(graph, attentions) -> list[str]:
    if attentions is None:
        names = [a.name for a in graph.attentions.values() if a.prunable and a.name in graph.flows]
    else:
        names = list(attentions)
        for n in names:
            if n not in graph.attentions:
                raise GraphoptError(f"no attention '{n}' in the graph; it has "
                                    f"{sorted(graph.attentions)}")
            if n not in graph.flows:
                raise GraphoptError(f"attention '{n}' cannot be scored per head: "
                                    f"{graph.attentions[n].why_not}")
    if not names:
        raise GraphoptError("no attention with separable heads to score")
    return names


def head_magnitude(graph, names: list[str]) -> dict[str, torch.Tensor]:
    """M_h of the module docstring, per attention."""
    if graph.is_meta:
        raise GraphoptError("magnitude importance reads the weights, but this graph was captured "
                            "on the meta device (no weights): load weights, or pass a recipe "
                            "computed elsewhere")
    out = {}
    for name in names:
        flow = graph.flows[name]
        sq = torch.zeros(flow.heads, dtype=torch.float64)
        for linears, axis in ((flow.producers, 0), (flow.consumers, 1)):
            for lin, dim in linears:
                w = graph.param(lin.args[1].target).detach()
                for h in range(flow.heads):
                    idx = headflow.kept_indices(dim, [h]).to(w.device)
                    sq[h] += float(w.index_select(axis, idx).double().pow(2).sum())
        out[name] = sq.sqrt()
    return out


def head_sensitivity(graph, names: list[str], inputs: list[dict], *, method: str = "taylor",
                     probes: int = 4, seed: int = 0,
                     offload: str | None = None) -> dict[str, torch.Tensor]:
    """S_h of the module docstring, per attention, on `inputs`."""
    from graphopt.passes.prune import mask_heads

    require_weights(graph, "head sensitivity")
    if not inputs:
        raise GraphoptError("head sensitivity got no calibration inputs")
    masked = mask_heads(graph, {n: torch.ones(graph.attentions[n].heads) for n in names})
    # mask_heads names its mask buffers graphopt_head_mask_<i>, in the order of the dict it gets.
    weight = graph.param(graph.flows[names[0]].consumers[0][0].args[1].target)
    return dict(zip(names, _mask_sensitivity(graph, masked, weight, "graphopt_head_mask_",
                                             len(names), inputs, method, probes, seed, offload,
                                             "head")))


def _mask_sensitivity(graph, masked, weight: torch.Tensor, prefix: str, count: int,
                      inputs: list[dict], method: str, probes: int, seed: int,
                      offload: str | None, what: str) -> list[torch.Tensor]:
    """Relative output change per mask entry of `masked` (buffers prefix0 .. prefix<count-1>);
    `weight` is a weight the masks multiply into, whose device and dtype they take."""
    from tqdm.auto import tqdm

    masked.to(weight.device)
    # The masks are float32; a half-precision model needs them (and their padding) in its dtype.
    for name, buf in list(masked.named_buffers()):
        if name.startswith(prefix) and buf.dtype != weight.dtype:
            masked.register_buffer(name, buf.to(weight.dtype))
    for p in masked.parameters():
        p.requires_grad_(False)
    masks = [masked.get_buffer(f"{prefix}{i}") for i in range(count)]
    change = [torch.zeros(len(m), dtype=torch.float64) for m in masks]
    total = 0.0
    run = (lambda x: masked(**x)) if offload is None else \
        (lambda x: BlockOffload(graph, offload).run(masked, x))
    generator = torch.Generator().manual_seed(seed)
    for x in tqdm(inputs, desc=f"{what} sensitivity ({method})", unit="input", disable=None,
                  leave=False):
        if method == "taylor":
            for m in masks:
                m.requires_grad_(True)
            out = first(run(x)).float()
            total += float(out.detach().double().pow(2).sum())
            for k in range(probes):
                r = torch.randn(out.shape, generator=generator).to(out.device)
                grads = torch.autograd.grad((out * r).sum(), masks, retain_graph=k < probes - 1)
                for acc, g in zip(change, grads):
                    acc += g.detach().double().cpu().pow(2) / probes
            del out
        else:
            with torch.no_grad():
                ref = first(run(x)).float()
                total += float(ref.double().pow(2).sum())
                for m, acc in zip(masks, change):
                    for h in range(len(m)):
                        m[h] = 0.0
                        acc[h] += float((first(run(x)).float() - ref).double().pow(2).sum())
                        m[h] = 1.0
    if total == 0.0:
        raise GraphoptError("the model output is zero on every calibration input: sensitivity "
                            "is undefined; check the weights and the calibration inputs")
    return [(acc / total).sqrt() for acc in change]


def channel_importance(graph, criterion: str = "sensitivity", *, ffns=None,
                       inputs: list[dict] | None = None, method: str = "taylor", probes: int = 4,
                       seed: int = 0, offload: str | None = None) -> dict[str, torch.Tensor]:
    """Importance of each hidden channel of `ffns` (default: every prunable FFN), higher = keep.

    The head criteria with an FFN channel in place of a head (module docstring): magnitude is
    sqrt(‖W_up[rows of c]‖² + ‖W_down[:, column of c]‖²), the rows of c being both halves of a
    gated unit; sensitivity masks the channel's input to the down projection
    (`prune.mask_channels`). Channels have no roles, so there is no role-aware variant.
    """
    from graphopt import ffnflow

    if criterion not in ("magnitude", "sensitivity"):
        raise GraphoptError(f"channel importance criterion '{criterion}' unknown; choose "
                            f"magnitude or sensitivity")
    _check("sensitivity", 1.0, method, probes)
    flows = ffnflow.find(graph)
    names = list(flows) if ffns is None else list(ffns)
    unknown = sorted(set(names) - set(flows))
    if unknown or not names:
        raise GraphoptError(f"no prunable FFN {unknown[:3] if unknown else ''} to score; "
                            f"prunable ones: {sorted(flows)[:4]}")
    require_weights(graph, f"channel importance ({criterion})")
    if criterion == "magnitude":
        return {n: channel_magnitude(graph, flows[n]) for n in names}
    from graphopt.passes.prune import mask_channels

    inputs = calibration_inputs(graph) if inputs is None else inputs
    if not inputs:
        raise GraphoptError("channel sensitivity got no calibration inputs")
    masked = mask_channels(graph, {n: torch.ones(flows[n].hidden) for n in names})
    weight = graph.param(flows[names[0]].down.args[1].target)
    return dict(zip(names, _mask_sensitivity(graph, masked, weight, "graphopt_channel_mask_",
                                             len(names), inputs, method, probes, seed, offload,
                                             "channel")))


def channel_magnitude(graph, flow) -> torch.Tensor:
    up = graph.param(flow.up.args[1].target).detach().double()
    down = graph.param(flow.down.args[1].target).detach().double()
    rows = up.pow(2).sum(1)
    sq = sum(rows[o:o + flow.hidden] for o in flow.offsets)
    sq = sq + down[:, flow.start:flow.start + flow.hidden].pow(2).sum(0)
    return sq.sqrt().cpu()


def _groups(roles: HeadRoles, scores: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Each scored head's group: its role where head-roles gave one, else 'other'."""
    out = {}
    for name, s in scores.items():
        found = roles.attentions.get(name)
        if found is not None and len(found.roles) != len(s):
            raise GraphoptError(f"head roles of '{name}' are for {len(found.roles)} heads, the "
                                f"attention has {len(s)}: recompute them on this graph")
        out[name] = list(found.roles) if found is not None else [OTHER] * len(s)
    return out


def role_aware(sensitivity: dict[str, torch.Tensor], groups: dict[str, list[str]],
               temporal_factor: float) -> dict[str, torch.Tensor]:
    """I_h = φ_h · S_h / mean of S over the head's group (module docstring)."""
    members: dict[str, list[float]] = {}
    for name, s in sensitivity.items():
        for g, v in zip(groups[name], s.tolist()):
            members.setdefault(g, []).append(v)
    mean = {g: sum(v) / len(v) for g, v in members.items()}
    out = {}
    for name, s in sensitivity.items():
        out[name] = torch.tensor(
            [(v / mean[g] if mean[g] > 0 else 0.0) * (temporal_factor if g == "temporal" else 1.0)
             for g, v in zip(groups[name], s.tolist())], dtype=torch.float64)
    return out

