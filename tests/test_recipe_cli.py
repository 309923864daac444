"""Recipe replay, save/load, and the CLI's answers to bad input (one line, exit 2, no output)."""
import json

import pytest
import torch

from graphopt import GraphoptError, capture, load, rel_error, save
from graphopt.cli import main
from graphopt.families import build_model
from graphopt.passes.prune import Prune
from graphopt.recipe import Recipe


def _pruned(model):
    g = capture(model)
    p = Prune(ratio=0.5)
    decisions = {"heads": {"blocks.0.attn1": [1, 3], "blocks.1.attn2": [0]},
                 "original_heads": {"blocks.0.attn1": 4, "blocks.1.attn2": 4}}
    p.apply(g, decisions)
    g.recipe.add(p.name, p.options_dict(), decisions)
    return g


def test_replay_gives_the_same_graph_and_load_round_trips(tmp_path):
    model = build_model("wan")
    g = _pruned(model)
    g.recipe.save(tmp_path / "recipe.json")
    fresh = capture(model)
    Recipe.load(tmp_path / "recipe.json").replay(fresh)
    assert str(fresh.gm.graph) == str(g.gm.graph)
    for (k, a), (k2, b) in zip(g.gm.state_dict().items(), fresh.gm.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    save(g, tmp_path / "out")
    loaded = load(tmp_path / "out")
    with torch.no_grad():
        assert rel_error(loaded(**g.example_inputs)[0], g(**g.example_inputs)[0]) < 1e-6


def test_rebuild_captures_the_recorded_architecture_with_each_option():
    model = build_model("wan")
    g = _pruned(model)
    seeded = g.recipe.rebuild(seeded=True)           # the same seed build_model draws from
    assert str(seeded.gm.graph) == str(g.gm.graph)
    with torch.no_grad():
        assert rel_error(seeded(**g.example_inputs)[0], g(**g.example_inputs)[0]) < 1e-6
    original = g.recipe.rebuild(seeded=True, replay=False)
    with torch.no_grad():
        assert rel_error(original(**g.example_inputs)[0], model(**g.example_inputs)[0]) < 1e-6

    bf16 = g.recipe.rebuild(dtypes={k: torch.bfloat16 for k in g.gm.state_dict()})
    assert {v.dtype for v in bf16.gm.parameters()} == {torch.bfloat16} and bf16.spec.dtype == torch.bfloat16
    assert {k: v.shape for k, v in bf16.gm.state_dict().items()} == {k: v.shape for k, v in g.gm.state_dict().items()}
    meta = g.recipe.rebuild("meta", replay=False)
    assert meta.is_meta and not meta.recipe.steps
    assert {k: v.shape for k, v in meta.gm.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    dynamic = g.recipe.rebuild(batch=2, dynamic_batch=True)
    assert dynamic.spec.batch == 2 and dynamic.recipe.steps == g.recipe.steps


def test_replay_on_other_architecture_is_refused(tmp_path):
    g = _pruned(build_model("wan"))
    g.recipe.save(tmp_path / "recipe.json")
    cfg = dict(build_model("wan").config, num_attention_heads=2, attention_head_dim=32)
    other = capture(build_model("wan", cfg))
    with pytest.raises(GraphoptError, match="recipe expects attention 'blocks.0.attn1' with 4 heads"):
        Recipe.load(tmp_path / "recipe.json").replay(other)


def test_inspect_json(capsys):
    assert main(["inspect", "tiny:latte", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["totals"]["blocks"] == 4 and info["token_layout"] == [3, 4, 4]


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_missing_model(capsys, tmp_path):
    _fails(["inspect", str(tmp_path / "nope")], capsys, "not found")


def test_corrupt_archive(capsys, tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a zip at all")
    _fails(["inspect", str(bad)], capsys, "not a torch.export archive")


def test_folder_without_config(capsys, tmp_path):
    _fails(["inspect", str(tmp_path)], capsys, "no config.json")


def test_pickled_weights_need_trust(capsys, tmp_path):
    model = build_model("wan")
    model.save_pretrained(tmp_path / "m", safe_serialization=False)
    _fails(["inspect", str(tmp_path / "m")], capsys, "--trust-pickle")


def test_pickled_archive_needs_trust(capsys, tmp_path):
    import zipfile
    path = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/.data/version", "6\n")
        z.writestr("m/archive_format", "pt2")
        z.writestr("m/models/model.json", "{}")
        z.writestr("m/data/weights/model.pt", b"pickle")
    _fails(["inspect", str(path)], capsys, "--trust-pickle")


def test_not_a_dit(capsys, tmp_path):
    from diffusers import AutoencoderKL
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(tmp_path / "vae")
    _fails(["inspect", str(tmp_path / "vae")], capsys, "not a supported model family")


def test_bad_input_shape_leaves_no_output(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(["compress", "tiny:wan", "--height", "7", "--passes", "prune", "-o", str(out)],
           capsys, "")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_option_leaves_no_output(capsys, tmp_path):
    out = tmp_path / "out"
    _fails(["compress", "tiny:wan", "--passes", "prune", "--prune-ratio", "1.5", "-o", str(out)],
           capsys, "prune ratio must be in [0, 1)")
    assert list(tmp_path.iterdir()) == []


def test_compress_writes_model_recipe_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", "tiny:wan", "--passes", "prune,route", "--prune-ratio", "0.25",
                 "--prune-criterion", "magnitude", "--route-budget", "0.8", "--verify",
                 "-o", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "removed heads" in report and "routed 2 of 2 blocks" in report
    assert "![head-importance](head-importance.png)" in report
    assert (out / "head-importance.png").stat().st_size > 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["after"]["flops_per_step"] < summary["before"]["flops_per_step"]
    g = load(out)
    assert [s["pass"] for s in g.recipe.steps] == ["prune", "route"]
