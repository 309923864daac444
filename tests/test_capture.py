"""Capture and structure discovery on tiny configs of every supported family."""
import pytest
import torch

from graphopt import GraphoptError, capture, rel_error
from graphopt.families import build_model

# family → (blocks, {(kind, heads, head_dim): count}, token layout frames×h×w)
EXPECTED = {
    "wan": (2, {("self", 4, 16): 2, ("cross", 4, 16): 2}, (3, 4, 6)),
    "skyreels-v2": (2, {("self", 4, 16): 2, ("cross", 4, 16): 2}, (3, 4, 6)),
    "hunyuan-video": (4, {("joint", 4, 16): 2, ("self", 4, 16): 2}, (3, 4, 6)),
    "ltx-video": (2, {("self", 4, 8): 2, ("cross", 4, 8): 2}, (3, 8, 12)),
    "mochi": (2, {("joint", 4, 8): 2}, (3, 4, 6)),
    "latte": (4, {("self", 4, 8): 4, ("cross", 4, 8): 2}, (3, 4, 4)),
    "dit": (2, {("self", 4, 8): 2}, (1, 4, 4)),
    "pixart": (2, {("self", 4, 12): 2, ("cross", 4, 12): 2}, (1, 4, 4)),
    "cogvideox": (2, {("self", 4, 16): 2}, (3, 4, 6)),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_structure(family, tiny_graphs):
    g = tiny_graphs(family)
    n_blocks, kinds, layout = EXPECTED[family]
    assert len(g.blocks) == n_blocks
    found = {}
    for a in g.attentions.values():
        if a.block is not None:
            key = (a.kind, a.heads, a.head_dim)
            found[key] = found.get(key, 0) + 1
            assert a.prunable, a.why_not
    assert found == kinds
    assert tuple(g.token_layout) == layout
    for b in g.blocks:
        assert len(b.stream_in) == len(b.stream_out) >= 1


# DiT embeds the timestep inside each block (with the class label): routing reads the raw timestep.
RAW_TIMESTEP = {"dit"}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_timestep_embedding_is_found_before_the_blocks(family, tiny_graphs):
    """The router's input: a (rows, dim) float the timestep feeds and the latent does not, rows a
    multiple of the batch (Latte's is repeated per place for its temporal blocks; the router
    averages the rows of a sample). The capture falls back to the raw timestep input when it finds
    none, so only the families that embed inside their blocks may end there."""
    g = tiny_graphs(family)
    if family in RAW_TIMESTEP:
        assert g.timestep_embedding == g.timestep_input
        return
    node = g.node(g.timestep_embedding)
    assert node.op != "placeholder"
    value, batch = node.meta["val"], g.example_inputs[g.latent_input].shape[0]
    assert value.is_floating_point() and value.dim() == 2 and value.shape[0] % batch == 0
    assert value.shape[1] > 1


def test_hunyuan_double_and_single_stream_blocks(tiny_graphs):
    g = tiny_graphs("hunyuan-video")
    names = [b.name for b in g.blocks]
    assert names == ["transformer_blocks.0", "transformer_blocks.1",
                     "single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert len(g.blocks[0].stream_out) == 2          # video and text streams
    single = g.attentions["single_transformer_blocks.0.attn"]
    assert single.consumers == ["single_transformer_blocks.0.proj_out.weight"]  # fused attn+mlp out


def test_latte_alternates_spatial_and_temporal_blocks(tiny_graphs):
    names = [b.name for b in tiny_graphs("latte").blocks]
    assert names == ["transformer_blocks.0", "temporal_transformer_blocks.0",
                     "transformer_blocks.1", "temporal_transformer_blocks.1"]


def test_captured_graph_equals_model():
    model = build_model("wan")
    g = capture(model)
    with torch.no_grad():
        assert rel_error(g(**g.example_inputs)[0], model(**g.example_inputs)[0]) < 1e-6


def test_meta_capture_has_no_weights():
    g = capture(build_model("wan", device="meta"))
    assert g.is_meta and len(g.blocks) == 2


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_meta_capture_state_dict_is_the_models(family):
    """`graphopt apply` reads what a checkpoint of the architecture holds (the persistent tensors)
    from the state_dict of a meta capture (Recipe.rebuild)."""
    model = build_model(family, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    graph = capture(model)
    assert {k: tuple(v.shape) for k, v in graph.gm.state_dict().items()} == expected


def test_export_archive_round_trip(tmp_path):
    model = build_model("wan")
    g = capture(model)
    ep = torch.export.export(model, (), g.example_inputs, strict=False)
    torch.export.save(ep, tmp_path / "m.pt2")
    g2 = capture(str(tmp_path / "m.pt2"))
    assert len(g2.blocks) == 2
    with torch.no_grad():
        assert rel_error(g2(**g.example_inputs)[0], g(**g.example_inputs)[0]) < 1e-6


def test_diffusers_folder(tmp_path):
    model = build_model("ltx-video")
    model.save_pretrained(tmp_path / "ltx")
    g = capture(str(tmp_path / "ltx"))
    assert len(g.blocks) == 2 and g.family.name == "ltx-video"


def test_not_a_dit_is_refused():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

        def forward(self, x):
            for l in self.layers:
                x = l(x)
            return x

    with pytest.raises(GraphoptError, match="no transformer blocks"):
        capture(MLP(), {"x": torch.randn(2, 4)})
