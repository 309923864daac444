"""head-roles finds heads whose role is known by construction; calibration inputs and refusals."""
import functools

import pytest
import torch

from graphopt import GraphoptError, capture
from graphopt.calibration import calibration_inputs, calibration_timesteps
from graphopt.families import build_model
from graphopt.layout import InputSpec
from graphopt.graph import DiTGraph
from graphopt.passes.head_roles import HeadRoles, HeadRolesOptions, head_roles

CONFIG = {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 8,
          "in_channels": 4, "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32,
          "num_layers": 2, "rope_max_seq_len": 32}
SPEC = InputSpec(frames=4, height=8, width=8, text_len=7)      # tokens: 4 frames x 4 x 4
SELF = ["blocks.0.attn1", "blocks.1.attn1"]
TEMPORAL, SPATIAL, WEAK = 0, 1, 3                               # head indices in every layer


@functools.lru_cache(maxsize=None)
def known_role_graph() -> DiTGraph:
    """A tiny Wan whose self-attention heads have roles fixed by their weights (copy to edit).

    In each self-attention (head_dim 8; Wan's rotary channels: 0-3 frame, 4-5 row, 6-7 column,
    rotated in adjacent pairs with frequency 1 rad per position for channels 0-1, 4-5 and 6-7),
    heads 0 and 1 get zero q/k weight rows and a constant q/k bias: B = 100 on chosen channels,
    0 elsewhere. Those biases dominate the q/k RMS norm over all heads (so every token's
    normalised q and k are the same constant, and the random heads' q/k are ~0: near-uniform
    attention), and the norm weight 2.5 on those channels makes them ≈ a = 8.2. After rotation,
    q_m·k_n = a² cos(Δ) per pair, Δ the position difference on that pair's axis, so with
    scale 1/√8 the logit falls by ≥ 10.8 for any |Δ| ≥ 1 (positions 0..3):
      head 0 (temporal): row and column pairs (channels 4 and 6): attends to the same (y, x) in all
        4 frames, uniformly over frames; its v rows and out-projection columns are scaled by 0.25,
        so its weight norm is the smallest of the layer;
      head 1 (spatial): frame pair (channel 0): attends uniformly over its own frame;
      heads 2, 3: untouched random weights (near-uniform attention over all tokens); head 3's v
        rows and out columns are scaled by 0.5 so it matters less than head 2.
    """
    g = capture(build_model("wan", CONFIG), spec=SPEC)
    d, bias, gain = 8, 100.0, 2.5
    with torch.no_grad():
        for name in SELF:
            p = lambda leaf: g.param(f"{name}.{leaf}")  # noqa: E731
            for proj, norm in (("to_q", "norm_q"), ("to_k", "norm_k")):
                p(f"{proj}.weight")[:2 * d] = 0.0
                p(f"{proj}.bias")[:2 * d] = 0.0
                for channel in (TEMPORAL * d + 4, TEMPORAL * d + 6, SPATIAL * d + 0):
                    p(f"{proj}.bias")[channel] = bias
                    p(f"{norm}.weight")[channel] = gain
            for head, scale in ((TEMPORAL, 0.25), (WEAK, 0.5)):
                rows = slice(head * d, (head + 1) * d)
                p("to_v.weight")[rows] *= scale
                p("to_v.bias")[rows] *= scale
                p("to_out.0.weight")[:, rows] *= scale
    return g


@functools.lru_cache(maxsize=None)
def known_roles(statistic: str = "attention-density", radius: int = 1) -> HeadRoles:
    return head_roles(known_role_graph(), HeadRolesOptions(statistic=statistic, radius=radius))


def test_constructed_roles_are_found():
    roles = known_roles()
    assert set(roles.attentions) == set(SELF)          # cross-attention has no role
    for name in SELF:
        a = roles.attentions[name]
        assert a.measured and torch.equal(a.temporal_score, a.density_score)
        assert a.roles[TEMPORAL] == "temporal" and a.temporal_score[TEMPORAL] > 0.95
        assert a.roles[SPATIAL] == "spatial" and a.temporal_score[SPATIAL] < 0.05
        # Near-uniform heads look everywhere alike: neither role.
        assert a.roles[2] == a.roles[3] == "mixed"
        assert ((a.temporal_score[2:] - 0.5).abs() < 0.05).all()
        # The temporal head puts 3/4 of its mass on the other 3 frames, all at its own (y, x).
        assert abs(float(a.temporal_mass[TEMPORAL]) - 0.75) < 0.01
        assert a.window_share[TEMPORAL] > 0.99
        assert a.spatial_mass[SPATIAL] > 0.99
        # Uniform over its own frame (self excepted, 15 of 64 video keys): 4x uniform density.
        assert abs(float(a.spatial_lift[SPATIAL]) - 4.0) < 0.05
        assert a.temporal_lift[TEMPORAL] > 1.5 and a.spatial_lift[TEMPORAL] < 1e-3
        total = a.spatial_mass + a.temporal_mass + a.text_mass
        assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
        assert a.error_temporal[TEMPORAL] < 1e-6 < a.error_spatial[TEMPORAL]
    assert roles.counts() == {"spatial": 2, "temporal": 2, "mixed": 4}


def test_output_error_at_radius_zero_is_sparse_videogens_test():
    roles = known_roles("output-error", 0)
    for name in SELF:
        a = roles.attentions[name]
        assert torch.equal(a.temporal_score, a.error_score)
        assert a.temporal_score[TEMPORAL] > 0.95 and a.temporal_score[SPATIAL] < 0.05
        assert a.roles[2] == a.roles[3] == "spatial"    # uniform: the frame mask is closer
        # Radius 0: the place is the query's own (y, x), 1 of the 16 positions of each frame.
        assert abs(float(a.window_share[2]) - 1 / 16) < 0.01
    assert roles.counts() == {"spatial": 6, "temporal": 2, "mixed": 0}


def test_shipped_teacher_has_temporal_heads():
    """On the trained tiny-wan (calibration clips of its data) density finds temporal heads whose
    own frame gets less than uniform attention; Sparse VideoGen's same-place output test finds none."""
    from graphopt.tiny.testbed import calibration_inputs as clips, capture_teacher

    graph, config = capture_teacher()
    inputs = clips(config, timesteps=(875.0, 375.0))
    density = head_roles(graph, inputs=inputs)
    assert density.counts()["temporal"] >= 4
    temporal = [(a, h) for a in density.attentions.values() for h, r in enumerate(a.roles)
                if r == "temporal"]
    assert min(float(a.spatial_lift[h]) for a, h in temporal) < 0.5
    assert max(float(a.temporal_lift[h]) for a, h in temporal) > 4.0
    svg = head_roles(graph, HeadRolesOptions(statistic="output-error", radius=0), inputs=inputs)
    assert svg.counts()["temporal"] == 0


def test_without_family_the_token_layout_suffices():
    g = known_role_graph()
    bare = DiTGraph(g.gm, g.example_inputs, token_layout=(4, 4, 4))
    inputs = calibration_inputs(g, timesteps=2)
    a = head_roles(bare, inputs=inputs).attentions
    b = head_roles(g, inputs=inputs).attentions
    for name in SELF:
        assert torch.equal(a[name].temporal_score, b[name].temporal_score)
    with pytest.raises(GraphoptError, match="video token layout"):
        head_roles(DiTGraph(g.gm, g.example_inputs))


def test_layout_roles_and_joint_attention(tiny_graphs):
    latte = head_roles(tiny_graphs("latte"), HeadRolesOptions(timesteps=1))
    kinds = {n: (a.measured, a.roles[0]) for n, a in latte.attentions.items()}
    assert kinds["transformer_blocks.0.attn1"] == (False, "spatial")
    assert kinds["temporal_transformer_blocks.0.attn1"] == (False, "temporal")
    assert not any(n.endswith("attn2") for n in kinds)
    joint = head_roles(tiny_graphs("hunyuan-video"), HeadRolesOptions(timesteps=1))
    a = joint.attentions["transformer_blocks.0.attn"]
    assert a.measured and bool((a.text_mass > 0.01).all())
    total = a.spatial_mass + a.temporal_mass + a.text_mass
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_calibration_refused_on_meta_graph():
    g = capture(build_model("wan", device="meta"))
    with pytest.raises(GraphoptError, match="calibration needs weights.*recipe computed elsewhere"):
        head_roles(g)


def test_plot_table_and_cached_analysis(tmp_path):
    roles = known_roles()
    path = tmp_path / "roles.png"
    roles.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    assert [p.name for p in tmp_path.iterdir()] == ["roles.png"]    # no temp file left behind
    assert roles.to_table().row_count == 2
    assert "| blocks.0.attn1 | 0 | measured | 1 | 1 | 2 | T1.00 S0.00 M0.5" in roles.to_markdown()
    g = known_role_graph().copy()
    first = g.analysis("head-roles", timesteps=1)
    assert g.analysis("head-roles", timesteps=1) is first


def test_options_are_validated():
    with pytest.raises(GraphoptError, match="margin"):
        HeadRolesOptions(margin=0.5)
    with pytest.raises(GraphoptError, match="at least 1 timestep"):
        HeadRolesOptions(timesteps=0)
    with pytest.raises(GraphoptError, match="queries"):
        HeadRolesOptions(queries=0)
    with pytest.raises(GraphoptError, match="statistic must be one of"):
        HeadRolesOptions(statistic="svg")
    with pytest.raises(GraphoptError, match="radius must be an int >= 0"):
        HeadRolesOptions(radius=-1)


def test_calibration_inputs_are_seeded_and_spread():
    ts = calibration_timesteps(4, seed=3)
    assert ts == sorted(ts, reverse=True) == calibration_timesteps(4, seed=3)
    assert [int((t - 50) // 225) for t in ts] == [3, 2, 1, 0]       # one per bin of [50, 950]
    g = known_role_graph()
    xs = calibration_inputs(g, timesteps=(900.0, 100.0), samples=2, seed=1)
    assert [float(x["timestep"][0]) for x in xs] == [900.0, 100.0, 900.0, 100.0]
    assert torch.equal(xs[0]["hidden_states"], xs[1]["hidden_states"])
    assert not torch.equal(xs[0]["hidden_states"], xs[2]["hidden_states"])
    text = "encoder_hidden_states"
    assert not torch.equal(xs[0][text], g.example_inputs[text])
    again = calibration_inputs(g, timesteps=(900.0, 100.0), samples=2, seed=1)
    assert all(torch.equal(a["hidden_states"], b["hidden_states"]) for a, b in zip(xs, again))


def test_calibration_file(tmp_path):
    from safetensors.torch import save_file

    g = known_role_graph()
    ex = g.example_inputs
    latents = torch.randn(3, *ex["hidden_states"].shape[1:])
    path = tmp_path / "calib.safetensors"
    save_file({"hidden_states": latents, "timestep": torch.tensor([800.0, 500.0, 200.0])}, path)
    xs = calibration_inputs(g, data=path)
    assert len(xs) == 3 and torch.equal(xs[1]["hidden_states"][0], latents[1])
    assert float(xs[2]["timestep"]) == 200.0
    assert torch.equal(xs[0]["encoder_hidden_states"], ex["encoder_hidden_states"])
    head_roles(g, HeadRolesOptions(data=str(path)))
    save_file({"hidden_states": latents}, path)
    with pytest.raises(GraphoptError, match="lacks \\['timestep'\\]"):
        calibration_inputs(g, data=path)
    save_file({"hidden_states": latents[:, :, :2].contiguous(), "timestep": torch.ones(3)}, path)
    with pytest.raises(GraphoptError, match="hidden_states' has shape"):
        calibration_inputs(g, data=path)
    with pytest.raises(GraphoptError, match="must be a .safetensors file"):
        calibration_inputs(g, data=tmp_path / "calib.pt")
