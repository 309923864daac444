"""-o never destroys what graphopt did not write (issue 15): refusals, --overwrite, atomic swaps,
crashes at every step of the swap, and temporary folders of killed runs."""
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest

from graphopt import GraphoptError
from graphopt.cli import main
from graphopt.io import MARKER, atomic_dir, check_output_dir, mark_dir

COMPRESS = ["compress", "tiny:wan", "--passes", "prune"]


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err


def _unrelated(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("a week of notes")
    return folder / "notes.txt"


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---- refusals: exit 2, one line, nothing touched --------------------------------------------

def test_a_folder_with_unrelated_files_is_refused_and_kept(tmp_path, capsys):
    notes = _unrelated(tmp_path / "mine")
    _fails([*COMPRESS, "-o", str(tmp_path / "mine")], capsys, "holds files graphopt did not write")
    assert notes.read_text() == "a week of notes" and sorted(os.listdir(tmp_path / "mine")) == ["notes.txt"]


def test_the_current_folder_and_its_parents_are_refused_even_with_overwrite(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    notes = _unrelated(work)
    monkeypatch.chdir(work)
    _fails([*COMPRESS, "-o", ".", "--overwrite"], capsys, "is the current folder")
    _fails([*COMPRESS, "-o", "..", "--overwrite"], capsys, "contains the current folder")
    _fails(["demo", "--quick", "-o", ".", "--overwrite"], capsys, "is the current folder")
    assert notes.read_text() == "a week of notes"


def test_home_and_root_are_refused_even_with_overwrite(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    notes = _unrelated(home)
    monkeypatch.setenv("HOME", str(home))
    _fails([*COMPRESS, "-o", str(home), "--overwrite"], capsys, "is your home folder")
    _fails([*COMPRESS, "-o", "/", "--overwrite"], capsys, "is the root folder")
    assert notes.read_text() == "a week of notes"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from graphopt.families import build_model

    folder = tmp_path_factory.mktemp("input") / "model"
    build_model("wan").save_pretrained(folder)
    return folder


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_input_and_a_folder_holding_it_are_refused_even_with_overwrite(model_folder, capsys):
    before = _snapshot(model_folder)
    for verb in (["compress", str(model_folder), "--passes", "prune"],
                 ["export", str(model_folder), "--format", "onnx"]):
        _fails([*verb, "-o", str(model_folder), "--overwrite"], capsys, f"is the input '{model_folder}'")
        _fails([*verb, "-o", str(model_folder.parent), "--overwrite"], capsys,
               f"contains the input '{model_folder}'")
    recipe = model_folder.parent / "recipe.json"
    recipe.write_text("{}")
    _fails(["apply", str(recipe), "--weights", str(model_folder), "-o", str(model_folder), "--overwrite"],
           capsys, "is the input")
    _fails(["apply", str(recipe), "--weights", str(model_folder), "-o", str(model_folder.parent)], capsys,
           "contains the input")
    assert _snapshot(model_folder) == before


def test_apply_reruns_over_its_output_but_leaves_a_foreign_work_folder(model_folder, tmp_path, capsys):
    assert main(["compress", str(model_folder), "--passes", "prune", "-o", str(tmp_path / "c")]) == 0
    apply = ["apply", str(tmp_path / "c" / "recipe.json"), "--weights", str(model_folder),
             "-o", str(tmp_path / "out")]
    notes = _unrelated(tmp_path / ".out.partial")
    capsys.readouterr()
    _fails(apply, capsys, "is in the way")
    assert notes.exists() and not (tmp_path / "out").exists()
    shutil.rmtree(tmp_path / ".out.partial")
    assert main(apply) == 0 and main(apply) == 0
    assert json.loads((tmp_path / "out" / MARKER).read_text())["written_by"] == "graphopt apply"
    assert _hidden(tmp_path) == []


def test_distill_never_replaces_its_inputs_or_foreign_checkpoints(tmp_path, capsys):
    config = Path(__file__).parents[1] / "graphopt" / "assets" / "distill_tiny.toml"
    compressed = tmp_path / "compressed"
    notes = _unrelated(compressed)
    base = ["distill", str(compressed), "--config", str(config)]
    _fails([*base, "-o", str(compressed), "--overwrite"], capsys, "is the input")
    _fails([*base, "-o", str(tmp_path), "--overwrite"], capsys, "contains the input")
    _fails([*base, "-o", str(tmp_path / "d"), "--checkpoints", str(tmp_path / "d" / "ck"), "--overwrite"],
           capsys, "contains the input")       # the checkpoints would go with the old output
    foreign = _unrelated(tmp_path / "ck")
    _fails([*base, "-o", str(tmp_path / "d"), "--checkpoints", str(tmp_path / "ck")], capsys,
           "choose a new or empty checkpoint folder")
    assert notes.exists() and foreign.exists() and not (tmp_path / "d").exists()


def test_checkpoint_folders_from_before_markers_are_adopted(tmp_path):
    from graphopt.distill.trainer import check_checkpoint_dir

    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "log.jsonl").write_text("")
    assert check_checkpoint_dir(tmp_path) == tmp_path
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(GraphoptError, match="'mine.txt'"):
        check_checkpoint_dir(tmp_path)


def test_a_file_and_a_path_under_a_file_are_refused(tmp_path, capsys):
    target = tmp_path / "report"
    target.write_text("not a folder")
    _fails([*COMPRESS, "-o", str(target), "--overwrite"], capsys, "is a file")
    _fails([*COMPRESS, "-o", str(target / "sub" / "out"), "--overwrite"], capsys,
           f"is under '{target}', which is a file")
    assert target.read_text() == "not a folder" and os.listdir(tmp_path) == ["report"]


# ---- what may be replaced --------------------------------------------------------------------

def test_overwrite_replaces_an_unrelated_folder(tmp_path):
    notes = _unrelated(tmp_path / "mine")
    assert main([*COMPRESS, "-o", str(tmp_path / "mine"), "--overwrite"]) == 0
    assert not notes.exists() and (tmp_path / "mine" / "model.safetensors").is_file()
    assert _hidden(tmp_path) == []


def test_rerunning_replaces_its_own_output_but_not_a_file_added_to_it(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*COMPRESS, "-o", str(out)]) == 0
    first = json.loads((out / MARKER).read_text())
    assert first["written_by"] == "graphopt.save" and "report.md" in first["files"]
    assert main([*COMPRESS, "-o", str(out)]) == 0
    assert json.loads((out / MARKER).read_text())["token"] != first["token"]   # replaced
    assert _hidden(tmp_path) == []
    capsys.readouterr()
    notes = _unrelated(out)
    _fails([*COMPRESS, "-o", str(out)], capsys, "(e.g. 'notes.txt')")
    assert notes.read_text() == "a week of notes"


def test_report_pngs_exist_when_the_folder_appears(tmp_path, monkeypatch):
    out, seen = tmp_path / "out", {}
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out and os.path.isdir(src):
            report = (Path(src) / "report.md").read_text()
            seen.update({png: (Path(src) / png).is_file() for png in re.findall(r"\]\(([^)]+\.png)\)", report)})
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["compress", "tiny:wan", "--passes", "prune", "--prune-criterion", "role-aware",
                 "-o", str(out)]) == 0
    assert seen and all(seen.values()), seen


# ---- the swap: a crash at any step leaves the old output or the new one ----------------------

def _write(folder: Path, text: str):
    with atomic_dir(folder) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text(text)


def _contents(folder: Path) -> str:
    """'old' or 'new', and only if complete."""
    a, b = (folder / "a.txt").read_text(), (folder / "sub" / "b.txt").read_text()
    assert a == b
    return a


def _fail_at(point: str, fail, monkeypatch):
    """Make the swap call `fail()` at `point`: before setting the old output aside ("aside"),
    before renaming the new one in ("in"), or before deleting the old one ("delete")."""
    real_replace, real_rmtree, renames = os.replace, shutil.rmtree, []

    def replace(src, dst):
        if os.path.isdir(src):
            renames.append(src)
            if (point, len(renames)) in (("aside", 1), ("in", 2)):
                fail()
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        if point == "delete" and str(path).endswith(".old"):
            fail()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize("point", ["aside", "in", "delete"])
def test_an_error_at_any_step_of_the_swap_leaves_old_or_new(point, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, "old")

    def fail():
        raise OSError("simulated crash")

    with monkeypatch.context() as patch:
        _fail_at(point, fail, patch)
        if point == "delete":
            _write(out, "new")          # the output is in place; the old copy waits for the next run
        else:
            with pytest.raises(OSError, match="simulated crash"):
                _write(out, "new")
    assert _contents(out) == ("new" if point == "delete" else "old")
    _write(out, "next")
    assert _contents(out) == "next" and _hidden(tmp_path) == []


@pytest.mark.parametrize("point", ["aside", "in", "delete"])
def test_a_kill_at_any_step_of_the_swap_leaves_old_or_new(point, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _write(out, "old")
    pid = os.fork()
    if pid == 0:                        # the child dies by SIGKILL mid-swap: no cleanup runs
        try:
            _fail_at(point, lambda: os.kill(os.getpid(), signal.SIGKILL), monkeypatch)
            _write(out, "new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    if point == "in":                   # between the renames: the old output waits, set aside
        assert not out.exists()
        (aside,) = tmp_path.glob(".out.*.old")
        assert _contents(aside) == "old"
    else:
        assert _contents(out) == ("new" if point == "delete" else "old")
    check_output_dir(out)               # what the next run does first
    assert _contents(out) == ("new" if point == "delete" else "old")
    assert _hidden(tmp_path) == []


def test_temporary_folders_of_killed_runs_are_deleted_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    pid = os.fork()
    if pid == 0:
        try:
            with atomic_dir(out) as tmp:
                (tmp / "half.bin").write_bytes(b"\0" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    (stale,) = tmp_path.glob(".out.*.tmp")
    # Look-alikes graphopt did not make, and one a live process is writing, stay.
    lookalike = tmp_path / ".out.0123456789ab.tmp"
    _unrelated(lookalike)
    live = tmp_path / ".out.ba9876543210.tmp"
    live.mkdir()
    mark_dir(live, "test", "ba9876543210")       # this process: still running
    assert main([*COMPRESS, "-o", str(out)]) == 0
    assert not stale.exists() and (out / "model.safetensors").is_file()
    assert _hidden(tmp_path) == sorted([lookalike.name, live.name])
    assert (lookalike / "notes.txt").read_text() == "a week of notes"
