"""What a CLI user sees (issue 15, part 7): every option's help says what it is, its range and its
default; library deprecation noise never reaches stderr, graphopt's own warnings do."""
import argparse
import json
import subprocess
import sys
import warnings

import pytest

from graphopt.cli import build_parser, quiet_libraries


def _verbs():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


@pytest.mark.parametrize("verb", sorted(_verbs()))
def test_every_option_says_what_it_is_and_its_default(verb):
    for action in _verbs()[verb]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 15, f"{verb} {name} has no help"
        takes_value = action.option_strings and action.nargs != 0 and not action.required
        if takes_value:
            assert "default" in action.help, f"{verb} {name}: help names no default: {action.help}"


def test_number_options_state_their_range():
    verbs = _verbs()
    for verb, option in (("compress", "--prune-ratio"), ("compress", "--drop-fraction"),
                         ("compress", "--route-budget"), ("bench", "--threads"),
                         ("export", "--opset"), ("compress", "--frames")):
        action = next(a for a in verbs[verb]._actions if option in a.option_strings)
        assert any(s in action.help for s in ("[0, 1)", "(0, 1]", ">= 1", "..")), action.help


def test_library_deprecations_are_hidden_and_graphopts_warnings_shown():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_libraries():
            warnings.warn_explicit("old torch api", FutureWarning, "torch/x.py", 1, module="torch.x")
            warnings.warn_explicit("pickle api", DeprecationWarning, "copyreg.py", 1, module="copyreg")
            warnings.warn_explicit("diffusers says", UserWarning, "d.py", 1, module="diffusers.models")
            warnings.warn_explicit("extra tensors ignored", UserWarning, "apply.py", 1,
                                   module="graphopt.apply")
    assert [str(w.message) for w in seen] == ["extra tensors ignored"]


@pytest.mark.slow
def test_inspect_of_an_archive_prints_no_library_noise(tmp_path):
    """The real entry point on a `.pt` archive (torch warns about the extension) and a diffusers
    folder whose weights do not fit its config (diffusers logs pages first): stdout is the answer,
    stderr is empty or graphopt's one line."""
    import torch

    from graphopt.families import FAMILIES, build_model

    model = build_model("wan")
    family = FAMILIES["wan"]
    inputs = family.example_inputs(dict(model.config), family.default_spec)
    torch.export.save(torch.export.export(model, (), inputs, strict=False), tmp_path / "model.pt")
    model.save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    (tmp_path / "folder" / "config.json").write_text(json.dumps({**config, "ffn_dim": 40}))
    run = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(tmp_path / "model.pt"),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-2000:]
    assert json.loads(run.stdout)["blocks"]
    run = subprocess.run([sys.executable, "-m", "graphopt.cli", "inspect", str(tmp_path / "folder")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, \
        run.stderr[-2000:]
