"""Every bad input exits 2 with one line and writes nothing (issue 15, parts 4 and 5).

Table-driven: each case mutates one field of a recipe, an index, a config, a manifest, an archive
or a command-line option, by type or by value, and the CLI (run in-process) must answer with exit
code 2, one `error: ...` line on stderr, no traceback, and no output folder. Inputs are built once
per module from tiny:wan.
"""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from graphopt import GraphoptError
from graphopt.cli import main

DROP = object()      # a mutation value: remove the key


# ---- inputs, built once -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A compressed folder (prune by magnitude: no model runs), a diffusers folder and a
    torch.export archive, all of tiny:wan."""
    from graphopt import capture
    from graphopt.compress import compress
    from graphopt.families import FAMILIES, build_model

    root = tmp_path_factory.mktemp("made")
    compress(capture("tiny:wan"), ["prune"], {"prune": {"criterion": "magnitude"}},
             out=root / "compressed")
    model = build_model("wan")
    model.save_pretrained(root / "diffusers")
    family = FAMILIES["wan"]
    inputs = family.example_inputs(dict(model.config), family.default_spec)
    torch.export.save(torch.export.export(model, (), inputs, strict=False), root / "wan.pt2")
    return root


@pytest.fixture(scope="module")
def segmented(made):
    """`made`, with the compressed folder's segmented ONNX export in it (made / "segmented")."""
    from graphopt.exporters.onnx import export_onnx
    from graphopt.serialize import load

    export_onnx(load(made / "compressed"), made / "segmented", layout="segmented")
    return made


def _copy(made, name, tmp_path) -> Path:
    dst = tmp_path / name
    if (made / name).is_dir():
        shutil.copytree(made / name, dst)
    else:
        shutil.copy(made / name, dst)
    return dst


def _refused(argv, capsys, out: Path | None = None, message: str = ""):
    """Exit 2, one `error:` line naming the problem, no traceback, nothing written at `out`."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and message in err, err
    if out is not None:
        assert not os.path.lexists(out), f"partial output at {out}"
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


def _mutate_json(path: Path, keys: tuple, value):
    data = json.loads(path.read_text())
    node = data
    for k in keys[:-1]:
        node = node[k]
    if value is DROP:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    path.write_text(json.dumps(data))


# ---- recipes: every field, wrong type or value --------------------------------------------------

RECIPE_CASES = [
    (("schema",), "graphopt.other", "not a graphopt recipe"),
    (("version",), "1", "version"),
    (("model",), "tiny:wan", "model must be an object"),
    (("model", "class_name"), 5, "class_name"),
    (("model", "class_name"), "NoSuchTransformer", "not a supported model family"),
    (("model", "config"), [1, 2], "config"),
    (("model", "input_spec"), "3x8x12", "input_spec"),
    (("model", "input_spec", "frames"), "3", "frames"),
    (("model", "input_spec", "frames"), 0, "frames"),
    (("model", "input_spec", "height"), 2.5, "height"),
    (("model", "input_spec", "batch"), True, "batch"),
    (("model", "input_spec", "dtype"), 32, "dtype"),
    (("model", "input_spec", "dtype"), "torch.int64", "dtype"),
    (("model", "input_spec", "dtype"), "float128", "dtype"),
    (("model", "source"), ["a"], "source"),
    (("steps",), {"pass": "prune"}, "'steps' must be a list"),
    (("steps", 0), "prune", "step 0 must be an object"),
    (("steps", 0, "pass"), 7, "'pass' must be a str"),
    (("steps", 0, "pass"), "nosuch", "unknown pass 'nosuch'"),
    (("steps", 0, "options"), [], "'options' must be a dict"),
    (("steps", 0, "options", "ratio"), "0.3", "option 'ratio' must be a number"),
    (("steps", 0, "options", "ratio"), 7.0, "ratio"),
    (("steps", 0, "options", "min_heads"), 1.5, "option 'min_heads' must be an integer"),
    (("steps", 0, "options", "min_heads"), True, "min_heads"),
    (("steps", 0, "options", "kinds"), "self", "option 'kinds' must be a list of strings"),
    (("steps", 0, "options", "criterion"), 3, "criterion"),
    (("steps", 0, "options", "bogus"), 1, "no option(s) ['bogus']"),
    (("steps", 0, "decisions"), [], "'decisions' must be a dict"),
    (("steps", 0, "decisions", "heads"), "all", "decisions"),
    (("steps", 0, "decisions", "heads"), DROP, "decisions"),
    (("steps", 0, "decisions", "original_heads"), 4, "decisions"),
]


@pytest.mark.parametrize("keys,value,message", RECIPE_CASES,
                         ids=[f"{'.'.join(map(str, k))}={v!r:.20}" if v is not DROP else
                              f"{'.'.join(map(str, k))}-dropped" for k, v, _ in RECIPE_CASES])
def test_a_bad_recipe_field_is_refused(made, tmp_path, capsys, keys, value, message):
    folder = _copy(made, "compressed", tmp_path)
    _mutate_json(folder / "recipe.json", keys, value)
    out = tmp_path / "out"
    _refused(["export", folder, "--format", "onnx", "-o", out], capsys, out, message)


def test_recipe_decisions_naming_heads_that_do_not_exist_are_refused(made, tmp_path, capsys):
    folder = _copy(made, "compressed", tmp_path)
    recipe = json.loads((folder / "recipe.json").read_text())
    heads = recipe["steps"][0]["decisions"]["heads"]
    for bad in ("x", [99], [0.5], []):
        heads[next(iter(heads))] = bad
        (folder / "recipe.json").write_text(json.dumps(recipe))
        _refused(["export", folder, "--format", "onnx", "-o", tmp_path / "out"], capsys,
                 tmp_path / "out")


@pytest.mark.parametrize("text", ["{", "[]", "null", "\xff\xfe", ""])
def test_a_recipe_that_is_not_a_json_object_is_refused(made, tmp_path, capsys, text):
    folder = _copy(made, "compressed", tmp_path)
    (folder / "recipe.json").write_bytes(text.encode("latin-1"))
    _refused(["export", folder, "--format", "onnx", "-o", tmp_path / "out"], capsys,
             tmp_path / "out", "recipe")


# ---- weights and indexes ------------------------------------------------------------------------

def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero_header_length(path: Path):
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])


@pytest.mark.parametrize("damage", [_truncate, _zero_header_length,
                                    lambda p: p.write_bytes(b""),
                                    lambda p: p.write_bytes(b"not safetensors at all")],
                         ids=["truncated", "bad-header-length", "empty", "garbage"])
def test_a_damaged_weight_file_is_refused(made, tmp_path, capsys, damage):
    folder = _copy(made, "compressed", tmp_path)
    damage(folder / "model.safetensors")
    _refused(["export", folder, "--format", "onnx", "-o", tmp_path / "out"], capsys,
             tmp_path / "out", "model.safetensors")


def _sharded(made, tmp_path) -> Path:
    """The compressed folder with its weights as one shard behind an index."""
    folder = _copy(made, "compressed", tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(folder / "model-00001-of-00001.safetensors", "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_a_sharded_folder_loads(made, tmp_path):
    from graphopt import load

    assert load(_sharded(made, tmp_path)).blocks


INDEX_CASES = [
    ("{", "not valid JSON"),
    ("[]", "weight_map"),
    (json.dumps({"weight_map": ["a"]}), "weight_map"),
    (json.dumps({"weight_map": {"w": 5}}), "weight_map"),
    (json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}, "metadata": []}),
     "metadata"),
    (json.dumps({"weight_map": {"w": "/etc/hostname"}}), "outside its folder"),
    (json.dumps({"weight_map": {"w": "../model-00001-of-00001.safetensors"}}), "outside its folder"),
    (json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"},
                 "metadata": {"made_by_recipe": "router"}}), "made_by_recipe"),
]


@pytest.mark.parametrize("text,message", INDEX_CASES, ids=[m for _, m in INDEX_CASES])
def test_a_bad_index_is_refused(made, tmp_path, capsys, text, message):
    folder = _sharded(made, tmp_path)
    (folder / "model.safetensors.index.json").write_text(text)
    _refused(["export", folder, "--format", "onnx", "-o", tmp_path / "out"], capsys,
             tmp_path / "out", message)


def test_an_index_naming_a_link_that_leads_out_is_refused(made, tmp_path, capsys):
    folder = _sharded(made, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "model-00001-of-00001.safetensors").rename(outside)
    (folder / "model-00001-of-00001.safetensors").symlink_to(outside)
    _refused(["export", folder, "--format", "onnx", "-o", tmp_path / "out"], capsys,
             tmp_path / "out", "a link leading out")


@pytest.mark.parametrize("keys,value", [((), "[1]"), ((), "{"), (("_class_name",), 5),
                                        (("num_layers",), "two"), (("patch_size",), "x")],
                         ids=["list", "not-json", "class-name", "num-layers", "patch-size"])
@pytest.mark.parametrize("meta", [False, True], ids=["weights", "meta"])
def test_a_bad_diffusers_config_is_refused(made, tmp_path, capsys, keys, value, meta):
    folder = _copy(made, "diffusers", tmp_path)
    if keys:
        _mutate_json(folder / "config.json", keys, value)
    else:
        (folder / "config.json").write_text(value)
    _refused(["inspect", folder, *(["--meta"] if meta else [])], capsys)


def test_a_diffusers_index_naming_files_outside_is_refused(made, tmp_path, capsys):
    folder = _copy(made, "diffusers", tmp_path)
    index = {"weight_map": {"proj_out.weight": "../../secret.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _refused(["inspect", folder], capsys, message="outside its folder")


# ---- torch.export archives ----------------------------------------------------------------------

def _rewrite_member(path: Path, member_suffix: str, change):
    with zipfile.ZipFile(path) as zf:
        items = [(i, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in items:
            zf.writestr(info, change(data) if info.filename.endswith(member_suffix) else data)


def _flip_stored_byte(path: Path, member_suffix: str):
    """Corrupt one byte of a member's data in place: its CRC no longer matches."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


ARCHIVE_CASES = {
    "truncated": _truncate,
    "weights-config-not-json": lambda p: _rewrite_member(p, "model_weights_config.json",
                                                         lambda d: b"{"),
    "weights-config-a-list": lambda p: _rewrite_member(p, "model_weights_config.json",
                                                       lambda d: b"[]"),
    "weights-config-entry-a-string": lambda p: _rewrite_member(
        p, "model_weights_config.json", lambda d: json.dumps({"config": {"w": "x"}}).encode()),
    "graph-not-json": lambda p: _rewrite_member(p, "models/model.json", lambda d: b"{"),
    "crc-error-in-a-weight": lambda p: _flip_stored_byte(p, "weight_0"),
}


@pytest.mark.parametrize("damage", list(ARCHIVE_CASES.values()), ids=list(ARCHIVE_CASES))
def test_a_damaged_archive_is_refused(made, tmp_path, capsys, damage):
    archive = _copy(made, "wan.pt2", tmp_path)
    damage(archive)
    out = tmp_path / "out"
    _refused(["compress", archive, "--passes", "prune", "-o", out], capsys, out)


def test_frames_on_an_exported_program_is_refused(made, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(["compress", made / "wan.pt2", "--passes", "prune", "--frames", "5", "-o", out],
             capsys, out, "input shapes")


# ---- command-line options ------------------------------------------------------------------------

def _not_writable(tmp_path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked


OPTION_CASES = [
    # (verb arguments after the model/folder, message)
    (["compress", "{model}", "--passes", "", "-o", "{out}"], "no pass to run"),
    (["compress", "{model}", "--passes", ",", "-o", "{out}"], "no pass to run"),
    (["compress", "{model}", "--passes", "nosuch", "-o", "{out}"], "unknown pass"),
    (["compress", "{model}", "--passes", "prune", "--option", "prune.min_heads=1.5", "-o", "{out}"],
     "must be an integer"),
    (["compress", "{model}", "--passes", "prune", "--option", 'prune.min_heads="2"', "-o", "{out}"],
     "must be an integer"),
    (["compress", "{model}", "--passes", "prune", "--option", "prune.ratio=abc", "-o", "{out}"],
     "must be a number"),
    (["compress", "{model}", "--passes", "prune", "--option", "prune.ratio=[0.3]", "-o", "{out}"],
     "must be a number"),
    (["compress", "{model}", "--passes", "prune", "--option", "prune.kinds=self", "-o", "{out}"],
     "list of strings"),
    (["compress", "{model}", "--passes", "prune", "--option", "prune.per_layer=1", "-o", "{out}"],
     "boolean"),
    (["compress", "{model}", "--passes", "route", "--option", "route.blocks=1", "-o", "{out}"],
     "list of integers"),
    (["compress", "{model}", "--passes", "route", "--option", "route.hidden=64.5", "-o", "{out}"],
     "must be an integer"),
    (["compress", "{model}", "--passes", "prune", "--option", "prune.bogus=1", "-o", "{out}"],
     "no option(s) ['bogus']"),
    (["compress", "{model}", "--passes", "prune", "--option", "noequals", "-o", "{out}"],
     "PASS.OPTION=VALUE"),
    (["compress", "{model}", "--passes", "prune", "--option", "drop.fraction=0.2", "-o", "{out}"],
     "not in --passes"),
    (["compress", "{model}", "--passes", "prune", "--prune-ratio", "1.5", "-o", "{out}"],
     "prune ratio"),
    (["compress", "{model}", "--passes", "prune", "--prune-ratio", "lots", "-o", "{out}"],
     "--prune-ratio"),
    (["compress", "{model}", "--passes", "route", "--route-budget", "0", "-o", "{out}"], "budget"),
    (["compress", "{model}", "--passes", "route", "--route-budget", "0.1", "-o", "{out}"],
     "fits no block"),
    (["compress", "{model}", "--passes", "drop", "--drop-fraction", "-1", "-o", "{out}"],
     "drop fraction"),
    (["compress", "{model}", "--passes", "prune", "--frames", "0", "-o", "{out}"], "--frames"),
    (["compress", "{model}", "--passes", "prune", "--frames", "three", "-o", "{out}"], "--frames"),
    (["compress", "{model}", "--passes", "prune", "-o", "{file}/out"], "which is a file"),
    (["compress", "{model}", "--passes", "prune", "-o", "{locked}/out"], "no write permission"),
    (["export", "{model}", "--format", "onnx", "--opset", "5", "-o", "{out}"], "opset 5"),
    (["export", "{model}", "--format", "onnx", "--opset", "99", "-o", "{out}"], "opset 99"),
    (["export", "{model}", "--format", "onnx", "--opset", "x", "-o", "{out}"], "--opset"),
    (["export", "{model}", "--format", "onnx", "-o", "{locked}/out"], "no write permission"),
    (["bench", "{compressed}", "--threads", "0"], "--threads"),
    (["bench", "{compressed}", "--threads", "-2"], "--threads"),
    (["bench", "{compressed}", "--steps", "0"], "--steps"),
    (["bench", "{compressed}", "--warmup", "-1"], "--warmup"),
    (["bench", "{compressed}", "--device", "tpu"], "--device 'tpu' is unknown"),
    (["bench", "{compressed}", "--device", "cuda:7"], "--device cuda:7"),
    (["bench", "{compressed}", "--device", "cpu", "--plot", "{file}/plot.png"], "which is a file"),
    (["bench", "{compressed}", "--plot", "{tmp}"], "is a folder"),
    (["bench", "{compressed}", "--plot", "{locked}/plot.png"], "no write permission"),
    (["bench", "{compressed}", "--backends", "nosuch"], "unknown backend"),
    (["demo", "--threads", "0", "-o", "{out}"], "--threads"),
]


@pytest.mark.parametrize("argv,message", OPTION_CASES,
                         ids=[" ".join(a[2:] if a[0] != "demo" else a[1:]) for a, _ in OPTION_CASES])
def test_a_bad_option_is_refused_before_any_work(made, tmp_path, capsys, argv, message):
    if "{locked}" in " ".join(argv) and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp_path / "file").write_text("a file")
    places = {"model": "tiny:wan", "out": tmp_path / "out", "file": tmp_path / "file",
              "tmp": tmp_path, "compressed": made / "compressed", "locked": _not_writable(tmp_path)}
    argv = [a.format(**places) for a in argv]
    _refused(argv, capsys, tmp_path / "out", message)


def test_debug_works_after_the_verb_and_shows_the_traceback():
    with pytest.raises(GraphoptError, match="no pass to run"):
        main(["compress", "tiny:wan", "--passes", "", "-o", "x", "--debug"])
    with pytest.raises(GraphoptError, match="no pass to run"):
        main(["--debug", "compress", "tiny:wan", "--passes", "", "-o", "x"])


def test_the_real_entry_point_answers_the_same(made, tmp_path):
    """Two cases through `python -m graphopt.cli`: exit 2, one line, no warning noise either."""
    for argv in (["compress", "tiny:wan", "--passes", ",", "-o", str(tmp_path / "out")],
                 ["bench", str(made / "compressed"), "--threads", "0"]):
        run = subprocess.run([sys.executable, "-m", "graphopt.cli", *argv], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 2, run.stderr
        assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, \
            run.stderr
    assert not (tmp_path / "out").exists()


# ---- segmented manifests and what they reference -------------------------------------------------

MANIFEST_CASES = [
    ((), "[]", "format"),
    (("inputs",), {"hidden_states": 1}, "'inputs' must be a list"),
    (("stream",), "x", "'stream' must be a list"),
    (("gates",), 5, "'gates'"),
    (("dims",), [1], "'dims' must be an object"),
    (("config",), "wan", "'config' must be an object"),
    (("batch_dim",), 0, "batch_dim"),
    (("segments",), {}, "'segments' must be a list"),
    (("segments", 0), "prologue.onnx", "must be a JSON object"),
    (("segments", 0, "file"), 3, "'file'"),
    (("segments", 0, "file"), "/etc/hostname", "outside its folder"),
    (("segments", 0, "file"), "../segmented/prologue.onnx", "outside its folder"),
    (("segments", 1, "block"), "0", "block index"),
    (("segments", 1, "gate"), -1, "gate column"),
    (("segments", 1, "inputs"), "x", "'inputs' must be a list"),
    (("inputs", 0, "shape"), "batch", "'shape' must be a list"),
    (("inputs", 0, "dtype"), 5, "dtype"),
    (("inputs", 0, "shape", 0), -1, "negative"),
    (("files",), ["x"], "'files' must be an object"),
]


@pytest.mark.parametrize("keys,value,message", MANIFEST_CASES,
                         ids=[f"{'.'.join(map(str, k)) or 'whole'}={v!r:.20}"
                              for k, v, _ in MANIFEST_CASES])
def test_a_bad_manifest_field_is_refused(segmented, tmp_path, keys, value, message):
    from graphopt.exporters.onnx import load_onnx

    folder = _copy(segmented, "segmented", tmp_path)
    if keys:
        _mutate_json(folder / "manifest.json", keys, value)
    else:
        (folder / "manifest.json").write_text(value)
    with pytest.raises(GraphoptError, match=None) as caught:
        load_onnx(folder)
    text = str(caught.value)
    assert len(text.splitlines()) == 1 and message in text, text


def test_the_manifest_records_a_hash_of_every_file_it_reads(segmented):
    manifest = json.loads((segmented / "segmented" / "manifest.json").read_text())
    files = {s["file"] for s in manifest["segments"]}
    assert files <= set(manifest["files"])
    assert all(h.startswith("sha256:") and len(h) == 7 + 64 for h in manifest["files"].values())


def test_swapped_block_files_are_refused(segmented, tmp_path):
    from graphopt.exporters.onnx import load_onnx

    folder = _copy(segmented, "segmented", tmp_path)
    load_onnx(folder)                       # as exported: loads
    a, b = folder / "block_00.onnx", folder / "block_01.onnx"
    a.rename(folder / "swap")
    b.rename(a)
    (folder / "swap").rename(b)
    with pytest.raises(GraphoptError, match="does not match the hash"):
        load_onnx(folder)


def test_an_edited_hash_or_an_unlisted_file_is_refused(segmented, tmp_path):
    from graphopt.exporters.onnx import load_onnx

    folder = _copy(segmented, "segmented", tmp_path)
    _mutate_json(folder / "manifest.json", ("files", "epilogue.onnx"), "sha256:" + "0" * 64)
    with pytest.raises(GraphoptError, match="does not match the hash"):
        load_onnx(folder)
    _mutate_json(folder / "manifest.json", ("files", "epilogue.onnx"), DROP)
    with pytest.raises(GraphoptError, match="no recorded hash"):
        load_onnx(folder)


def test_a_segment_file_that_is_a_link_leading_out_is_refused(segmented, tmp_path):
    from graphopt.exporters.onnx import load_onnx

    folder = _copy(segmented, "segmented", tmp_path)
    outside = tmp_path / "outside.onnx"
    (folder / "epilogue.onnx").rename(outside)
    (folder / "epilogue.onnx").symlink_to(outside)
    with pytest.raises(GraphoptError, match="a link leading out"):
        load_onnx(folder)


def test_onnx_external_data_outside_the_folder_is_refused(segmented, tmp_path):
    import onnx

    from graphopt.exporters.manifest import SegmentedManifest

    folder = _copy(segmented, "segmented", tmp_path)
    block = folder / "block_00.onnx"
    model = onnx.load(str(block))
    onnx.save(model, str(block), save_as_external_data=True, all_tensors_to_one_file=True,
              location="block_00.data", size_threshold=0)
    manifest = SegmentedManifest.load(folder, check_files=False)
    manifest.save(folder / "manifest.json")          # records the new files' hashes
    assert "block_00.data" in json.loads((folder / "manifest.json").read_text())["files"]
    SegmentedManifest.load(folder)
    for location in ("/etc/hostname", "../outside.data"):
        model = onnx.load(str(block), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(block))
        with pytest.raises(GraphoptError, match="outside its folder"):
            SegmentedManifest.load(folder)


# ---- calls of a loaded ONNX model ------------------------------------------------------------------

def test_calls_with_an_empty_batch_or_a_non_tensor_timestep_are_refused(segmented):
    from graphopt.exporters.manifest import SegmentedManifest
    from graphopt.exporters.specs import check_call_inputs

    manifest = SegmentedManifest.load(segmented / "segmented")
    specs = {s.name: s for s in manifest.inputs}
    good = {name: torch.zeros([2 if isinstance(d, str) else d for d in s.shape])
            for name, s in specs.items()}
    check_call_inputs(manifest.inputs, manifest.batch_dim, good, "segmented model")
    check_call_inputs(manifest.inputs, manifest.batch_dim, {**good, "timestep": 500.0}, "m")
    empty = {**good, "hidden_states": good["hidden_states"][:0]}
    with pytest.raises(GraphoptError, match="empty batch"):
        check_call_inputs(manifest.inputs, manifest.batch_dim, empty, "segmented model")
    for timestep in ("500", [500], object(), True):
        with pytest.raises(GraphoptError, match="'timestep' must be a tensor"):
            check_call_inputs(manifest.inputs, manifest.batch_dim, {**good, "timestep": timestep},
                              "segmented model")


def test_malformed_onnx_metadata_is_refused_by_name(segmented, tmp_path):
    import onnx

    from graphopt.exporters.specs import onnx_metadata

    path = _copy(segmented, "segmented", tmp_path) / "prologue.onnx"
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"graphopt.blocks": "[0, 1]", "other": "{"})
    onnx.save(model, str(path))
    assert onnx_metadata(path) == {"graphopt.blocks": [0, 1]}
    onnx.helper.set_model_props(model, {"graphopt.blocks": "[0, "})
    onnx.save(model, str(path))
    with pytest.raises(GraphoptError, match="metadata 'graphopt.blocks' is not valid JSON"):
        onnx_metadata(path)
