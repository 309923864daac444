"""Head importance: the magnitude formula, Taylor (Fisher) agrees with exact masking, role-aware
normalisation, and role-aware pruning keeps the temporal heads that magnitude pruning removes."""
import pytest
import torch

from graphopt import GraphoptError, capture
from graphopt.calibration import calibration_inputs
from graphopt.families import build_model
from graphopt.passes.importance import HeadImportance, HeadImportanceOptions, head_importance
from graphopt.passes.prune import Prune
from test_head_roles import SELF, SPATIAL, TEMPORAL, WEAK, known_role_graph, known_roles


def test_magnitude_is_the_norm_of_the_heads_weights():
    g = known_role_graph()
    scores = head_importance(g, "magnitude", attentions=SELF)
    d = 8
    for name in SELF:
        for h in range(4):
            rows = slice(h * d, (h + 1) * d)
            w = {p: g.param(f"{name}.{p}.weight").detach().double()
                 for p in ("to_q", "to_k", "to_v", "to_out.0")}
            sq = sum(float(w[p][rows].pow(2).sum()) for p in ("to_q", "to_k", "to_v"))
            sq += float(w["to_out.0"][:, rows].pow(2).sum())
            assert abs(float(scores[name][h]) - sq ** 0.5) < 1e-9 * sq ** 0.5
        assert int(scores[name].argmin()) == TEMPORAL


def test_taylor_estimate_agrees_with_exact_masking(tiny_graphs):
    g = tiny_graphs("wan")
    names = [a.name for a in g.attentions.values() if a.block is not None]
    inputs = calibration_inputs(g)
    taylor = head_importance(g, "sensitivity", attentions=names, inputs=inputs, probes=16)
    exact = head_importance(g, "sensitivity", attentions=names, inputs=inputs, method="exact")
    a = torch.cat([taylor[n] for n in names])
    b = torch.cat([exact[n] for n in names])
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.95
    assert 0.85 < float((a / b).mean()) < 1.15          # same quantity, not just the same order


def test_role_aware_is_sensitivity_normalised_per_role():
    g = known_role_graph()
    inputs = calibration_inputs(g, timesteps=2)
    sens = head_importance(g, "sensitivity", attentions=SELF, inputs=inputs)
    aware = head_importance(g, "role-aware", attentions=SELF, inputs=inputs, temporal_factor=1.5)
    roles = known_roles()
    groups = {r: [float(sens[n][h]) for n in SELF for h in range(4)
                  if roles.roles(n)[h] == r] for r in ("spatial", "temporal", "mixed")}
    for name in SELF:
        for h in range(4):
            role = roles.roles(name)[h]
            expected = float(sens[name][h]) / (sum(groups[role]) / len(groups[role]))
            expected *= 1.5 if role == "temporal" else 1.0
            assert abs(float(aware[name][h]) - expected) < 1e-9 * expected


def _kept(graph, criterion):
    p = graph.copy()
    result = Prune(ratio=0.25, kinds=("self",), criterion=criterion).run(p)
    assert all(p.attentions[n].heads == 3 for n in SELF)
    return result.decisions["heads"]


def test_role_aware_pruning_keeps_temporal_heads_magnitude_removes():
    g = known_role_graph()
    for criterion in ("magnitude", "sensitivity"):
        assert all(TEMPORAL not in _kept(g, criterion)[n] for n in SELF), criterion
    kept = _kept(g, "role-aware")
    assert all(kept[n] == sorted({TEMPORAL, SPATIAL, 2}) for n in SELF)   # WEAK went instead


def test_head_importance_pass_and_plot(tmp_path):
    g = known_role_graph().copy()
    result = g.analysis("head-importance", criterion="role-aware", timesteps=2,
                        attentions=tuple(SELF))
    assert isinstance(result, HeadImportance) and set(result.scores) == set(SELF)
    assert result.groups["blocks.0.attn1"] == ["temporal", "spatial", "mixed", "mixed"]
    assert int(result.scores["blocks.0.attn1"].argmin()) == WEAK
    result.plot(tmp_path / "importance.png")
    assert (tmp_path / "importance.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_options_and_meta_graph():
    with pytest.raises(GraphoptError, match="criterion 'taylor' unknown"):
        HeadImportanceOptions(criterion="taylor")
    with pytest.raises(GraphoptError, match="method 'fisher' unknown"):
        head_importance(known_role_graph(), "sensitivity", method="fisher")
    meta = capture(build_model("wan", device="meta"))
    with pytest.raises(GraphoptError, match="calibration needs weights"):
        head_importance(meta, "role-aware")
    with pytest.raises(GraphoptError, match="meta device"):
        head_importance(meta, "magnitude")


def test_role_aware_takes_head_roles_options():
    g = known_role_graph().copy()
    svg = g.analysis("head-importance", criterion="role-aware", timesteps=2, attentions=tuple(SELF),
                     roles={"statistic": "output-error", "radius": 0})
    assert svg.groups["blocks.0.attn1"] == ["temporal", "spatial", "spatial", "spatial"]
    p = g.copy()
    Prune(ratio=0.25, kinds=("self",), roles={"statistic": "output-error", "radius": 0}).run(p)
    assert p.reports["head-roles"].statistic == "output-error" and p.reports["head-roles"].radius == 0
    with pytest.raises(GraphoptError, match=r"roles option\(s\) \['statistc'\] unknown"):
        Prune(roles={"statistc": "output-error"})
    with pytest.raises(GraphoptError, match="statistic must be one of"):
        HeadImportanceOptions(roles={"statistic": "svg"})
