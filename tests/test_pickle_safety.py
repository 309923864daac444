"""Nothing from a model file runs without --trust-pickle (issue 15).

Each attack is a real archive: a pickle whose __reduce__ writes a marker file and then returns what the
loader expects (so the load looks normal), or a graph JSON string that torch evaluates. Each test
shows torch.export.load running the payload, then graphopt refusing the file in one line (exit 2)
without creating the marker; honest archives written by torch.export.save load without the flag.
"""
import io
import json
import operator
import pathlib
import pickle
import zipfile

import pytest
import torch

from graphopt import capture, rel_error, save
from graphopt.cli import main
from graphopt.families import build_model

DISTILL_CONFIG = str(pathlib.Path(__file__).parents[1] / "graphopt" / "assets" / "distill_tiny.toml")


class _WriteMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (pathlib.Path(self.marker), "payload ran")


class _Payload:
    """Unpickles to `value`, after writing `marker`: nothing else shows that code ran."""

    def __init__(self, marker, value):
        self.marker, self.value = marker, value

    def __reduce__(self):
        return operator.getitem, ((_WriteMarker(self.marker), self.value), 1)


def _torch_save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """torch.export.save of the tiny Wan, and the model and example inputs it was exported with."""
    model = build_model("wan")
    inputs = capture(model).example_inputs
    path = tmp_path_factory.mktemp("honest") / "wan.pt2"
    torch.export.save(torch.export.export(model, (), inputs, strict=False), path)
    return path, model, inputs


def _member(path, name) -> bytes:
    """A member of the archive, named without the archive's root folder."""
    with zipfile.ZipFile(path) as z:
        root = z.namelist()[0].partition("/")[0]
        return z.read(f"{root}/{name}")


def _rewrite(src, dst, changes: dict):
    """Copy the archive with `changes` (member name without the root folder -> new bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        root = zin.namelist()[0].partition("/")[0]
        for info in zin.infolist():
            name = info.filename.partition("/")[2]
            zout.writestr(info.filename, changes.get(name, zin.read(info.filename)))
        for name in changes.keys() - {i.filename.partition("/")[2] for i in zin.infolist()}:
            zout.writestr(f"{root}/{name}", changes[name])
    return dst


def _with_pickled_weight(path, dst, marker) -> str:
    """`path` with its first weight stored as a pickle (use_pickle), as torch writes tensor
    subclasses; returns that member's name."""
    config_name = "data/weights/model_weights_config.json"
    config = json.loads(_member(path, config_name))
    meta = next(iter(config["config"].values()))
    meta["use_pickle"] = True
    member = f"data/weights/{meta['path_name']}"
    _rewrite(path, dst, {config_name: json.dumps(config).encode(),
                         member: _torch_save(_Payload(marker, torch.zeros(1)))})
    return member


def _refused(argv, capsys, member):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert member in err and "--trust-pickle if you trust" in err
    return err


def _torch_runs(path, marker, run=False):
    """torch.export.load (and, for payloads in the generated code, a forward call) runs it."""
    try:
        ep = torch.export.load(path)
        if run:
            args, kwargs = ep.example_inputs
            ep.module()(*args, **kwargs)
    except Exception:   # the payload ran before whatever broke
        pass
    assert marker.read_text() == "payload ran"
    marker.unlink()


def test_honest_archive_loads_without_the_flag(honest, capsys):
    path, model, inputs = honest
    weights = json.loads(_member(path, "data/weights/model_weights_config.json"))["config"]
    constants = json.loads(_member(path, "data/constants/model_constants_config.json"))["config"]
    sample_inputs = _member(path, "data/sample_inputs/model.pt")
    # torch 2.13 writes weights and constants as raw bytes; only the sample inputs are a pickle
    # (a torch.save zip), which graphopt never reads.
    assert not any(m["use_pickle"] for m in [*weights.values(), *constants.values()])
    assert sample_inputs[:2] == b"PK"
    assert main(["inspect", str(path)]) == 0
    assert main(["inspect", str(path), "--trust-pickle"]) == 0
    graph = capture(str(path))
    assert {k: v.shape for k, v in graph.example_inputs.items() if isinstance(v, torch.Tensor)} == \
        {k: v.shape for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    generator = torch.Generator().manual_seed(1)
    fresh = {k: torch.randn(v.shape, generator=generator) if k in ("hidden_states",
             "encoder_hidden_states") else v for k, v in inputs.items()}
    with torch.no_grad():
        assert rel_error(graph(**fresh)[0], model(**fresh)[0]) < 1e-6


def test_sample_inputs_are_never_unpickled(honest, tmp_path, capsys):
    path, model, inputs = honest
    marker = tmp_path / "marker"
    member = "data/sample_inputs/model.pt"
    real = torch.load(io.BytesIO(_member(path, member)), weights_only=True)
    evil = _rewrite(path, tmp_path / "evil.pt2", {member: _torch_save(_Payload(marker, real))})
    _torch_runs(evil, marker)
    assert main(["inspect", str(evil)]) == 0 and not marker.exists()
    graph = capture(str(evil))          # example inputs of the graph's own shapes
    assert graph.example_inputs["hidden_states"].shape == inputs["hidden_states"].shape
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["weight", "constant", "opaque object", "older weights file"])
def test_pickled_member_is_refused(honest, tmp_path, capsys, kind):
    path, _, _ = honest
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"
    if kind == "weight":          # torch.export.load: torch.load(weights_only=False)
        member = _with_pickled_weight(path, evil, marker)
    elif kind == "constant":
        config_name = "data/constants/model_constants_config.json"
        config = json.loads(_member(path, config_name))
        meta = next(iter(config["config"].values()))
        meta["use_pickle"] = True
        member = f"data/constants/{meta['path_name']}"
        _rewrite(path, evil, {config_name: json.dumps(config).encode(),
                              member: _torch_save(_Payload(marker, torch.zeros(1)))})
    elif kind == "opaque object":  # torch.export.load: pickle.loads
        config_name = "data/constants/model_constants_config.json"
        config = json.loads(_member(path, config_name))
        config["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False,
                                    "use_pickle": True, "tensor_meta": None}
        member = "data/constants/opaque_obj_0"
        _rewrite(path, evil, {config_name: json.dumps(config).encode(),
                              member: pickle.dumps(_Payload(marker, 1))})
    else:                          # read before the weights config, by the same fallback as inputs
        member = "data/weights/model.pt"
        state_dict = torch.export.load(path).state_dict
        _rewrite(path, evil, {member: _torch_save(_Payload(marker, state_dict))})
    _torch_runs(evil, marker)
    _refused(["inspect", str(evil)], capsys, member)
    assert not marker.exists()


def test_legacy_format_is_refused(honest, tmp_path, capsys):
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize

    path, _, _ = honest
    marker = tmp_path / "marker"
    artifact = serialize(torch.export.load(path))
    state_dict = torch.load(io.BytesIO(artifact.state_dict), weights_only=True)
    evil = tmp_path / "legacy.pt2"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", artifact.exported_program)
        z.writestr("serialized_state_dict.pt", _torch_save(_Payload(marker, state_dict)))
        z.writestr("serialized_constants.pt", artifact.constants)
        z.writestr("serialized_example_inputs.pt", artifact.example_inputs)
    _torch_runs(evil, marker)
    _refused(["inspect", str(evil)], capsys, "serialized_state_dict.pt")
    assert not marker.exists()


def _edit_graph(path, dst, change):
    graph = json.loads(_member(path, "models/model.json"))
    change(graph)
    return _rewrite(path, dst, {"models/model.json": json.dumps(graph).encode()})


def _write_marker_code(marker):
    return f"__import__('pathlib').Path('{marker}').write_text('payload ran')"


def test_shape_expression_is_not_evaluated(honest, tmp_path, capsys):
    path, _, _ = honest
    marker = tmp_path / "marker"

    def change(graph):           # sympy.sympify evaluates it while deserializing
        value = next(iter(graph["graph_module"]["graph"]["tensor_values"].values()))
        value["sizes"][0] = {"as_expr": {"expr_str": _write_marker_code(marker),
                                         "hint": {"as_int": 1}}}

    evil = _edit_graph(path, tmp_path / "evil.pt2", change)
    _torch_runs(evil, marker)
    assert "shape expression" in _refused(["inspect", str(evil)], capsys, "models/model.json")
    assert not marker.exists()


def test_guard_is_not_compiled(honest, tmp_path, capsys):
    path, _, _ = honest
    marker = tmp_path / "marker"

    def change(graph):           # exec'd into the guard function the module calls first
        graph["guards_code"] = [f"L['hidden_states'].size()[0] == 1 and "
                                f"({_write_marker_code(marker)}) is not None"]

    evil = _edit_graph(path, tmp_path / "evil.pt2", change)
    _torch_runs(evil, marker, run=True)
    assert "guard" in _refused(["inspect", str(evil)], capsys, "models/model.json")
    assert not marker.exists()


def test_treespec_context_imports_nothing(honest, tmp_path, capsys, monkeypatch):
    path, _, _ = honest
    marker = tmp_path / "marker"
    modules = tmp_path / "modules"       # a module an attacker placed where Python finds it
    modules.mkdir()
    (modules / "graphopt_test_payload.py").write_text(_write_marker_code(marker) + "\nX = {}\n")
    monkeypatch.syspath_prepend(str(modules))

    def change(graph):           # torch's object hook imports the module the context names
        signature = graph["graph_module"]["module_call_graph"][0]["signature"]
        protocol, spec = json.loads(signature["in_spec"])
        kwargs = spec["children_spec"][1]
        keys = json.loads(kwargs["context"])
        keys[0] = {"__enum__": True, "fqn": "graphopt_test_payload:X", "name": keys[0]}
        kwargs["context"] = json.dumps(keys)
        signature["in_spec"] = json.dumps([protocol, spec])

    evil = _edit_graph(path, tmp_path / "evil.pt2", change)
    _torch_runs(evil, marker)
    monkeypatch.delitem(__import__("sys").modules, "graphopt_test_payload")
    assert "input/output" in _refused(["inspect", str(evil)], capsys, "models/model.json")
    assert not marker.exists()


def test_names_are_not_pasted_into_code(honest, tmp_path, capsys):
    path, _, _ = honest
    marker = tmp_path / "marker"
    assert "." not in str(marker)           # the name is split at dots into attribute paths
    write = f'getattr(getattr(__import__("pathlib"), "Path")("{marker}"), "write_text")("payload ran")'
    name = f'x", None) or {write} or getattr(self, "x'
    config_name = "data/weights/model_weights_config.json"
    config = json.loads(_member(path, config_name))
    config["config"] = {(name if k == "scale_shift_table" else k): v
                        for k, v in config["config"].items()}
    graph = json.loads(_member(path, "models/model.json"))
    graph["graph_module"]["signature"]["input_specs"][0]["parameter"]["parameter_name"] = name
    evil = _rewrite(path, tmp_path / "evil.pt2", {config_name: json.dumps(config).encode(),
                                                  "models/model.json": json.dumps(graph).encode()})
    _torch_runs(evil, marker, run=True)     # the parameter's name lands in the generated forward
    _refused(["inspect", str(evil)], capsys, config_name)
    assert not marker.exists()


def test_diffusers_index_naming_pickled_shards_is_refused(tmp_path, capsys):
    model = build_model("wan")
    folder = tmp_path / "wan"
    model.save_pretrained(folder, safe_serialization=False)
    keys = model.state_dict()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "diffusion_pytorch_model.bin" for k in keys}}))
    (folder / "unused.safetensors").write_bytes(b"")
    _refused(["inspect", str(folder)], capsys, "diffusion_pytorch_model.bin")
    assert main(["inspect", str(folder), "--trust-pickle"]) == 0


# --------------------------------------------------------------------------------------------------
# A compressed folder is data: the recipe's model.source gets the checks of a path the user typed.

@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compressed") / "out"
    save(capture(build_model("wan")), folder)
    return folder


def _with_source(compressed, tmp_path, source):
    folder = tmp_path / "compressed"
    folder.mkdir()
    for f in compressed.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["model"]["source"] = source
    (folder / "recipe.json").write_text(json.dumps(recipe))
    return folder


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("verb", ["bench", "distill"])
def test_recipe_source_gets_the_same_checks(honest, compressed, tmp_path, capsys, monkeypatch,
                                            verb, relative):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt2"                      # next to the compressed folder
    member = _with_pickled_weight(honest[0], evil, marker)
    folder = _with_source(compressed, tmp_path, "../evil.pt2" if relative else str(evil))
    elsewhere = tmp_path / "elsewhere"                # the source resolves from the folder, not here
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    argv = ["bench", str(folder), "--backends", "torch"] if verb == "bench" else \
        ["distill", str(folder), "--config", DISTILL_CONFIG, "-o", str(tmp_path / "distilled")]
    err = _refused(argv, capsys, member)
    assert str(evil.resolve()) in err and not marker.exists()
    assert not (tmp_path / "distilled").exists() and not (tmp_path / "distilled.checkpoints").exists()


def test_relative_source_is_next_to_the_recipe(tmp_path, monkeypatch):
    from graphopt.bench import load_pair

    build_model("wan").save_pretrained(tmp_path / "original")
    save(capture(str(tmp_path / "original")), tmp_path / "from_original")
    folder = _with_source(tmp_path / "from_original", tmp_path, "../original")
    monkeypatch.chdir(folder)                  # from here, ../original would be another folder
    original, _ = load_pair(folder)
    assert original.source == str((tmp_path / "original").resolve())
