"""Block importance measures skipping; drop equals the diffusers class built with fewer layers."""
import re

import pytest
import torch

from conftest import PRUNE_FAMILIES, random_inputs
from graphopt import GraphoptError, PassManager, capture, model_cost, rel_error
from graphopt.blocks import skip_blocks
from graphopt.families import FAMILIES, build_model
from graphopt.passes.block_importance import BlockImportanceOptions, block_importance, rank_blocks
from graphopt.passes.drop import Drop, drop_blocks

# Dropped sets that cross block kinds: HunyuanVideo's last double and first single block, a Latte
# spatial and temporal pair.
DROPPED = {"wan": [0], "hunyuan-video": [1, 2], "ltx-video": [1], "latte": [0, 1]}


@pytest.mark.parametrize("family", ["wan", "hunyuan-video"])
def test_importance_is_the_output_change_when_skipping(family, tiny_graphs):
    g = tiny_graphs(family)
    options = BlockImportanceOptions(timesteps=(500.0, 100.0), samples=1, seed=3)
    imp = block_importance(g, options)
    assert imp.output.shape == imp.content.shape == imp.motion.shape == (len(g.blocks), 2)
    latent = g.example_inputs["hidden_states"]
    x = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    for ti, t in enumerate(options.timesteps):
        inputs = {**g.example_inputs, "hidden_states": x,
                  "timestep": torch.full_like(g.example_inputs["timestep"], t)}
        with torch.no_grad():
            y = g(**inputs)[0]
            for b in range(len(g.blocks)):
                expected = rel_error(skip_blocks(g, [b])(**inputs)[0], y)
                assert imp.output[b, ti].item() == pytest.approx(expected, rel=1e-9)
    assert (imp.content > 0).all() and (imp.motion > 0).all()


def test_importance_report(tiny_graphs, tmp_path):
    imp = block_importance(tiny_graphs("latte"), BlockImportanceOptions(timesteps=(900, 100)))
    lines = imp.table().splitlines()
    assert len(lines) == 1 + 4 and "motion" in lines[0]
    assert "temporal_transformer_blocks.1" in lines[-1]
    imp.plot(tmp_path / "importance.png")
    assert (tmp_path / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["importance.png"]     # no temp file left


def test_rank_blocks_policies():
    scores = [0.5, 0.1, 0.3, 0.05, 0.2, 0.4]
    assert rank_blocks(scores, "importance", 0.5) == [0, 5, 2, 4, 1, 3]
    # hierarchical: deep half (3, 4, 5) first, so removal from the end only takes shallow blocks
    assert rank_blocks(scores, "hierarchical", 0.5) == [5, 4, 3, 0, 2, 1]


# The oracle: diffusers' own class with the config's layer counts lowered to the kept blocks, and
# the kept blocks' weights renumbered into it. Per family, which config key counts each block list
# and which blocks to drop so that the smaller config builds the same computation:
# - mochi: the last block is built `context_pre_only` (no text-stream output), so the last block
#   must stay (dropping it would leave a full block where the class builds a context-only one);
# - dit: the output layer is conditioned by `transformer_blocks[0].norm1.emb`, which drop keeps
#   (the output reads it) while a smaller DiT takes the new first block's: the first block stays;
# - latte: spatial and temporal blocks come in pairs counted by one `num_layers`, and the temporal
#   position embedding is added inside pair 0 (after its spatial block): only whole pairs after
#   the first can be dropped and still match a smaller Latte.
FEWER_LAYERS = {
    "wan": ({"blocks": "num_layers"}, [0]),
    "skyreels-v2": ({"blocks": "num_layers"}, [1]),
    "hunyuan-video": ({"transformer_blocks": "num_layers",
                       "single_transformer_blocks": "num_single_layers"}, [1, 2]),
    "ltx-video": ({"transformer_blocks": "num_layers"}, [1]),
    "mochi": ({"transformer_blocks": "num_layers"}, [0]),
    "latte": ({"transformer_blocks": "num_layers", "temporal_transformer_blocks": "num_layers"},
              [2, 3]),
    "dit": ({"transformer_blocks": "num_layers"}, [1]),
    "pixart": ({"transformer_blocks": "num_layers"}, [1]),
    "cogvideox": ({"transformer_blocks": "num_layers"}, [0]),
}


def test_every_family_has_a_fewer_layers_oracle():
    assert sorted(FEWER_LAYERS) == sorted(FAMILIES)


def fewer_layers(family: str, names: list[str], removed: list[int]):
    """build_model(family) with only the blocks `names` not in `removed`, renumbered per list."""
    counts, _ = FEWER_LAYERS[family]
    model = build_model(family)
    kept: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        lst, index = name.rsplit(".", 1)
        if i not in removed:
            kept.setdefault(lst, []).append(int(index))
    config = dict(model.config)
    for lst, indices in kept.items():
        config[counts[lst]] = len(indices)
    assert len({len(v) for k, v in kept.items() if counts[k] == "num_layers"}) == 1   # latte pairs
    smaller = build_model(family, config)
    renamed = {}
    for key, value in model.state_dict().items():
        m = re.match(r"^(.+?)\.(\d+)\.(.+)$", key)
        if m and m.group(1) in counts:
            if int(m.group(2)) not in kept[m.group(1)]:
                continue
            key = f"{m.group(1)}.{kept[m.group(1)].index(int(m.group(2)))}.{m.group(3)}"
        renamed[key] = value
    smaller.load_state_dict(renamed, strict=True)
    return model, smaller


# Known bug: dropping a Mochi block fails in DiTGraph.refresh, where fake-tensor propagation
# rebinds the unbacked sizes of the attention's `nonzero` (text mask) and finds no value range.
MOCHI_REFRESH = pytest.mark.xfail(raises=AttributeError, strict=True,
                                  reason="drop on mochi: refresh's FakeTensorProp loses the range "
                                         "of nonzero's unbacked size")


@pytest.mark.parametrize("family", [pytest.param(f, marks=MOCHI_REFRESH) if f == "mochi" else f
                                    for f in sorted(FEWER_LAYERS)])
def test_drop_equals_the_class_with_fewer_layers(family, tiny_graphs):
    g = tiny_graphs(family)
    _, removed = FEWER_LAYERS[family]
    model, smaller = fewer_layers(family, [b.name for b in g.blocks], removed)
    inputs = random_inputs(g)
    d = g.copy()
    drop_blocks(d, removed)
    with torch.no_grad():
        dropped, original = d(**inputs)[0], g(**inputs)[0]
        assert rel_error(model(**inputs)[0], original) < 1e-6      # the oracle's weights are g's
        expected = smaller(**inputs)[0]
        skipped = skip_blocks(g, removed)(**inputs)[0]
    assert rel_error(dropped, expected) < 1e-5
    assert rel_error(dropped, original) > 1e-3          # the test can fail: blocks really went away
    assert rel_error(dropped, skipped) < 1e-6           # and drop.ensures' reference agrees
    assert [b.name for b in d.blocks] == [b.name for b in g.blocks if b.index not in removed]


@pytest.mark.parametrize("family", PRUNE_FAMILIES)
def test_drop_frees_the_dropped_blocks_cost(family, tiny_graphs):
    g = tiny_graphs(family)
    removed = DROPPED[family]
    d = g.copy()
    drop_blocks(d, removed)
    before, after = model_cost(g), model_cost(d)
    assert after.flops == before.flops - sum(before.blocks[i]["flops"] for i in removed)
    assert after.params == before.params - sum(before.blocks[i]["params"] for i in removed)
    assert sum(p.numel() for p in d.gm.parameters()) == after.params


def test_drop_pass_is_hierarchical_verified_and_replayable(tiny_graphs):
    g = tiny_graphs("hunyuan-video")
    d = g.copy()
    [result] = PassManager([Drop(blocks=2)], verify=True).run(d)
    assert set(result.decisions["removed"]) <= {0, 1}     # the deep half is protected
    assert result.verified_error == 0.0
    replayed = d.recipe.copy()
    replayed.steps = replayed.steps[-1:]
    fresh = replayed.replay(g.copy())
    inputs = random_inputs(g, seed=5)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs)[0], d(**inputs)[0])


def test_drop_importance_policy_removes_the_least_important(tiny_graphs):
    g = tiny_graphs("latte")
    scores = g.analysis("block-importance").scores()
    d = g.copy()
    [result] = PassManager([Drop(policy="importance", fraction=0.25)], verify=True).run(d)
    assert result.decisions["removed"] == [min(range(4), key=lambda i: scores[i])]


def test_drop_rejects_bad_requests(tiny_graphs):
    with pytest.raises(GraphoptError, match="not both"):
        Drop(blocks=1, fraction=0.5)
    with pytest.raises(GraphoptError, match="policy"):
        Drop(policy="random")
    with pytest.raises(GraphoptError, match="shallow"):
        Drop(blocks=3).decide(tiny_graphs("hunyuan-video"))
    with pytest.raises(GraphoptError, match="another architecture"):
        Drop().apply(tiny_graphs("wan").copy(), {"removed": [1], "n_blocks": 4,
                                                  "names": ["transformer_blocks.1"]})


def test_drop_works_on_meta_graph():
    g = capture(build_model("wan", device="meta"))
    before = model_cost(g)
    drop_blocks(g, [0])
    assert [b.name for b in g.blocks] == ["blocks.1"]
    assert model_cost(g).flops == before.flops - before.blocks[0]["flops"]


def test_random_inputs_keep_masks_and_guidance(tiny_graphs):
    """The test inputs vary the activations only: HunyuanVideo's float text mask and its guidance
    scale stay the example's (an N(0, 1) mask is no mask)."""
    g = tiny_graphs("hunyuan-video")
    inputs, example = random_inputs(g), g.example_inputs
    for k in ("encoder_attention_mask", "guidance", "timestep"):
        assert torch.equal(inputs[k], example[k]), k
    for k in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        assert not torch.equal(inputs[k], example[k]) and inputs[k].std() > 0.5, k
