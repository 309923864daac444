"""The card's command, literally (issue 15, part 6): `graphopt compress model.pt --passes prune,route`
on an ExportedProgram saved with torch.export.save, for Wan, HunyuanVideo and LTX-Video. With the
defaults: -o is MODEL-compressed in the current folder, role-aware pruning finds the token layout
in the archive itself, and the output loads with graphopt.load."""
import json

import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.families import FAMILIES, build_model

# Four blocks, so that the default route budget (0.5) fits at least one block.
DEEPER = {"wan": {"num_layers": 4}, "hunyuan-video": {}, "ltx-video": {"num_layers": 4}}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """name -> a folder holding model.pt, torch.export.save of that family's tiny model."""
    root = tmp_path_factory.mktemp("archives")
    out = {}
    for name, extra in DEEPER.items():
        family = FAMILIES[name]
        model = build_model(name, {**family.tiny_config, **extra})
        inputs = family.example_inputs(dict(model.config), family.default_spec)
        folder = root / name
        folder.mkdir()
        torch.export.save(torch.export.export(model, (), inputs, strict=False), folder / "model.pt")
        out[name] = folder
    return out


@pytest.mark.parametrize("name", list(DEEPER))
def test_an_archive_names_its_family_config_and_input_size(archives, name):
    from graphopt import pt2
    from graphopt.capture import load_model

    ep = load_model(archives[name] / "model.pt")
    family, config, spec = pt2.identify(ep, pt2.example_inputs(ep))
    assert family is FAMILIES[name]
    expected = {**family.tiny_config, **DEEPER[name]}
    assert {k: config[k] for k in expected} == expected
    default = family.default_spec
    assert (spec.batch, spec.frames, spec.height, spec.width, spec.text_len) == (
        default.batch, default.frames, default.height, default.width, default.text_len)


def test_the_default_output_is_never_replaced_without_overwrite(archives, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model-compressed").mkdir()
    assert main(["compress", str(archives["wan"] / "model.pt"), "--passes", "prune"]) == 2
    err = capsys.readouterr().err
    assert "default output folder 'model-compressed' exists" in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DEEPER))
def test_the_literal_card_command_works_and_its_output_loads(archives, name, monkeypatch):
    monkeypatch.chdir(archives[name])
    assert main(["compress", "model.pt", "--passes", "prune,route"]) == 0
    out = archives[name] / "model-compressed"
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["steps"][0]["options"]["criterion"] == "role-aware"
    assert "## head-roles" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert 0 < report["after"]["executed_flops_per_step"] < report["after"]["flops_per_step"]
    graph = graphopt.load(out)
    assert hasattr(graph.gm, "router")
    out_shape = graph.gm(**graph.example_inputs)[0].shape
    with torch.no_grad():      # the uncompressed architecture's output on the same inputs
        (expected,) = build_model(name, {**FAMILIES[name].tiny_config, **DEEPER[name]})(**graph.example_inputs)
    assert tuple(out_shape) == tuple(expected.shape)
