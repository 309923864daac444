"""`graphopt apply` on forged or incomplete checkpoints: every safetensors header is checked against
its file before a byte of tensor data is read (apply reads with positioned reads, so a header that
lies would copy another tensor's bytes, or uninitialised memory, into the output). Each forgery
exits 2 with one line naming the file, the tensor and what is wrong, and writes no output."""
import json
import shutil
import struct

import pytest
import torch

from graphopt import capture, rel_error
from graphopt.apply import checkpoint_tensors
from graphopt.cli import main
from graphopt.families import build_model
from graphopt.pass_manager import PassManager, get_pass

from conftest import random_inputs

SHARD = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Wan checkpoint (one safetensors file) and a recipe made for it."""
    tmp = tmp_path_factory.mktemp("hardening")
    model = build_model("wan", dict(build_model("wan").config, num_layers=2))
    model.save_pretrained(tmp / "ckpt")
    graph = capture(model)
    PassManager([get_pass("drop")(removed=[1])]).run(graph)
    graph.recipe.save(tmp / "recipe.json")
    return tmp, model, graph


def _parse(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data: bytes, *, length: int | None = None, raw_header: bytes | None = None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _by_offset(header):
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


def _overlap(header, data):
    """A tensor moved to start 4 bytes into another of its size (its length still right)."""
    names = _by_offset(header)
    a, b = next((x, y) for i, x in enumerate(names) for y in names[i + 1:]
                if header[x]["shape"] == header[y]["shape"] and header[x]["dtype"] == header[y]["dtype"])
    begin, end = header[a]["data_offsets"]
    header[b]["data_offsets"] = [begin + 4, end + 4]
    return header, data, b, "they overlap"


def _past_eof(header, data):
    """The file ends 4 bytes before the last tensor the header describes (a truncated download)."""
    return header, data[:-4], _by_offset(header)[-1], "past the end of the file"


def _gap(header, data):
    """16 unclaimed bytes before the third tensor; every later offset shifted past them."""
    names = _by_offset(header)
    cut = header[names[2]]["data_offsets"][0]
    for k in names[2:]:
        header[k]["data_offsets"] = [o + 16 for o in header[k]["data_offsets"]]
    return header, data[:cut] + bytes(16) + data[cut:], names[2], "gap of 16 bytes"


def _wrong_length(header, data):
    """A float32 tensor relabelled float16: its shape still matches config.json, but its offsets
    span twice the bytes that shape of float16 needs (read as is: half of it, the wrong half)."""
    name = next(k for k in _by_offset(header) if len(header[k]["shape"]) == 2)
    header[name]["dtype"] = "F16"
    return header, data, name, "needs"


def _unknown_dtype(header, data):
    name = _by_offset(header)[0]
    header[name]["dtype"] = "F4"
    return header, data, name, "dtype 'F4'"


def _negative_shape(header, data):
    name = _by_offset(header)[0]
    header[name]["shape"] = [-1] + header[name]["shape"][1:]
    return header, data, name, "not a list of sizes >= 0"


def _absurd_shape(header, data):
    """2^80 elements: the bytes it would need are nowhere near the 8-byte span it claims."""
    name = _by_offset(header)[0]
    begin = header[name]["data_offsets"][0]
    header[name]["shape"], header[name]["data_offsets"] = [2 ** 40, 2 ** 40], [begin, begin + 8]
    return header, data, name, "needs"


FORGERIES = [_overlap, _past_eof, _gap, _wrong_length, _unknown_dtype, _negative_shape, _absurd_shape]


def _apply(tmp, weights, out):
    return main(["apply", str(tmp / "recipe.json"), "--weights", str(weights), "-o", str(out)])


def _forged_copy(tmp, tmp_path, forge):
    """A copy of the checkpoint whose file `forge` altered; (folder, tensor named, what)."""
    weights = tmp_path / "forged"
    weights.mkdir()
    shutil.copy(tmp / "ckpt" / "config.json", weights)
    header, data = _parse(tmp / "ckpt" / SHARD)
    header, data, name, what = forge(header, data)
    _write(weights / SHARD, header, data)
    return weights, name, what


def _refused(capsys, tmp_path, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


@pytest.mark.parametrize("forge", FORGERIES, ids=lambda f: f.__name__.strip("_"))
def test_forged_header_exits_2_naming_file_and_tensor(source, tmp_path, capsys, forge):
    tmp = source[0]
    weights, name, what = _forged_copy(tmp, tmp_path, forge)
    assert _apply(tmp, weights, tmp_path / "out") == 2
    _refused(capsys, tmp_path, SHARD, f"'{name}'", what)


@pytest.mark.parametrize("case", ["length_past_eof", "not_json", "deeply_nested", "duplicate_name",
                                  "too_short"])
def test_unreadable_header_exits_2(source, tmp_path, capsys, case):
    tmp = source[0]
    weights = tmp_path / "forged"
    weights.mkdir()
    shutil.copy(tmp / "ckpt" / "config.json", weights)
    header, data = _parse(tmp / "ckpt" / SHARD)
    first = _by_offset(header)[0]
    if case == "length_past_eof":
        _write(weights / SHARD, header, data, length=2 ** 40)
        words = ("header length field says 1099511627776 bytes",)
    elif case == "not_json":
        _write(weights / SHARD, header, data, raw_header=b'{"' + first.encode() + b'": {')
        words = ("header does not parse as JSON",)
    elif case == "deeply_nested":
        _write(weights / SHARD, header, data, raw_header=b"[" * 100_000)
        words = ("header does not parse as JSON",)
    elif case == "duplicate_name":
        text = json.dumps(header).encode()
        duplicate = json.dumps({first: header[first]}).encode()[1:-1]
        _write(weights / SHARD, header, data, raw_header=text[:-1] + b", " + duplicate + b"}")
        words = (f"'{first}' appears twice",)
    else:
        (weights / SHARD).write_bytes(b"\x01\x00")
        words = ("shorter than the 8-byte header length",)
    assert _apply(tmp, weights, tmp_path / "out") == 2
    _refused(capsys, tmp_path, SHARD, *words)


def test_index_naming_another_shard_is_refused(source, tmp_path, capsys):
    """Two shards, and an index that puts a tensor in the wrong one."""
    tmp, model, _ = source
    weights = tmp_path / "sharded"
    model.save_pretrained(weights, max_shard_size="60KB")
    index_path = weights / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = list(index["weight_map"].values())
    name, shard = next((k, v) for k, v in index["weight_map"].items() if shards.count(v) > 1)
    index["weight_map"][name] = next(s for s in index["weight_map"].values() if s != shard)
    index_path.write_text(json.dumps(index))
    assert _apply(tmp, weights, tmp_path / "out") == 2
    _refused(capsys, tmp_path, f"'{name}'", shard)


def _rewritten(tmp, tmp_path, edit):
    """A copy of the checkpoint with its tensors edited by `edit(dict of tensors)`."""
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "edited"
    weights.mkdir()
    shutil.copy(tmp / "ckpt" / "config.json", weights)
    tensors = load_file(str(tmp / "ckpt" / SHARD))
    edit(tensors)
    save_file(tensors, str(weights / SHARD), metadata={"format": "pt"})
    return weights


def test_missing_tensor_is_named(source, tmp_path, capsys):
    tmp, model, _ = source
    assert "blocks.0.ffn.net.2.weight" in model.state_dict()
    weights = _rewritten(tmp, tmp_path, lambda t: t.pop("blocks.0.ffn.net.2.weight"))
    assert _apply(tmp, weights, tmp_path / "out") == 2
    _refused(capsys, tmp_path, "lacks tensor 'blocks.0.ffn.net.2.weight'")


def test_extra_tensor_is_named_in_a_warning_and_left_out(source, tmp_path, capsys):
    """An extra tensor (a leftover of another tool) does not stop apply: the warning names it, the
    output leaves it out and still equals the in-memory compressed model."""
    tmp, _, graph = source
    weights = _rewritten(tmp, tmp_path, lambda t: t.update({"lora.extra.weight": torch.ones(3)}))
    assert _apply(tmp, weights, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "'lora.extra.weight'" in err and "left out" in err
    assert "lora.extra.weight" not in checkpoint_tensors(tmp_path / "out")
    from diffusers import WanTransformer3DModel

    smaller = WanTransformer3DModel.from_pretrained(tmp_path / "out")
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(smaller(**x)[0], graph(**x)[0]) < 1e-6


def test_an_unforged_rewrite_applies(source, tmp_path):
    """The file rewritten by this module's own writer, unchanged, is accepted: the forgeries above
    fail for their forgery, not for the rewriting."""
    tmp = source[0]
    weights, _, _ = _forged_copy(tmp, tmp_path, lambda header, data: (header, data, None, None))
    assert _apply(tmp, weights, tmp_path / "out") == 0


def test_load_of_a_truncated_weights_file_exits_2(source, tmp_path, capsys):
    """graphopt.load (here behind `graphopt export`) refuses a damaged weights file in one line."""
    from graphopt import save

    folder = save(source[2], tmp_path / "compressed")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert main(["export", str(folder), "--format", "onnx", "-o", str(tmp_path / "out")]) == 2
    _refused(capsys, tmp_path, "model.safetensors", "not a valid safetensors file")
