"""`graphopt apply`: a recipe streamed onto a sharded diffusers checkpoint equals the in-memory
compressed model, in bounded memory, and resumes after a kill without redoing finished shards."""
import json
import re
import signal
import subprocess
import sys
import time

import diffusers
import pytest
import torch

from graphopt import GraphoptError, capture, load, rel_error
from graphopt.apply import apply_recipe, checkpoint_tensors
from graphopt.cli import main
from graphopt.families import build_model
from graphopt.pass_manager import PassManager, get_pass

from conftest import random_inputs

# Mid-size Wan: 12 blocks of width 640, about 80 M parameters (≈ 320 MB of float32).
MID_WAN = {"patch_size": [1, 2, 2], "num_attention_heads": 10, "attention_head_dim": 64,
           "in_channels": 4, "out_channels": 4, "text_dim": 64, "freq_dim": 32,
           "ffn_dim": 2560, "num_layers": 12, "rope_max_seq_len": 64}


def _checkpoint(tmp, config, shard_size):
    model = build_model("wan", config)
    model.save_pretrained(tmp / "ckpt", max_shard_size=shard_size)
    return model, tmp / "ckpt"


def _compress(model, passes, path):
    """The in-memory compressed graph, and its recipe saved at `path`."""
    graph = capture(model)
    PassManager(passes).run(graph)
    graph.recipe.save(path)
    return graph


def _kept(graph, keep):
    return {a.name: keep(a.heads) for a in graph.attentions.values()
            if a.prunable and a.block is not None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply")
    config = dict(build_model("wan").config, num_layers=4)
    return (tmp,) + _checkpoint(tmp, config, "60KB")


def test_prune_and_drop_stream_to_graphopt_layout(tiny, capsys):
    tmp, model, ckpt = tiny
    assert len({s.file for s in checkpoint_tensors(ckpt).values()}) > 4
    heads = _kept(capture(model), lambda n: [0, 2, 3])
    graph = _compress(model, [get_pass("prune")(heads=heads), get_pass("drop")(removed=[1])],
                      tmp / "r1.json")
    assert main(["apply", str(tmp / "r1.json"), "--weights", str(ckpt), "-o",
                 str(tmp / "out1")]) == 0
    assert "graphopt layout (heads pruned" in capsys.readouterr().err
    index = json.loads((tmp / "out1" / "model.safetensors.index.json").read_text())
    assert not any(k.startswith("blocks.1.") for k in index["weight_map"])
    loaded = load(tmp / "out1")
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(loaded(**x)[0], graph(**x)[0]) < 1e-6


def test_drop_only_loads_with_diffusers_from_pretrained(tiny):
    tmp, model, ckpt = tiny
    graph = _compress(model, [get_pass("drop")(removed=[0, 2])], tmp / "r2.json")
    apply_recipe(tmp / "r2.json", ckpt, tmp / "out2")
    smaller = diffusers.WanTransformer3DModel.from_pretrained(tmp / "out2")
    assert smaller.config.num_layers == 2 and len(smaller.blocks) == 2
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(smaller(**x)[0], graph(**x)[0]) < 1e-6


def test_routed_recipe_loads_with_graphopt(tiny):
    tmp, model, ckpt = tiny
    heads = _kept(capture(model), lambda n: [1, 2])
    graph = _compress(model, [get_pass("prune")(heads=heads),
                              get_pass("route")(ranking=[3, 1, 2, 0], budget=0.8)],
                      tmp / "r3.json")
    apply_recipe(tmp / "r3.json", ckpt, tmp / "out3")
    loaded = load(tmp / "out3")
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(loaded(**x)[0], graph(**x)[0]) < 1e-6


def test_recipe_for_another_checkpoint_is_refused(tiny, tmp_path, capsys):
    tmp, model, ckpt = tiny
    other = build_model("wan", dict(model.config, num_layers=3))
    _compress(other, [get_pass("drop")(removed=[0])], tmp_path / "r.json")
    assert main(["apply", str(tmp_path / "r.json"), "--weights", str(ckpt), "-o",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "num_layers=3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_meta_graph_needs_given_decisions():
    graph = capture(build_model("wan", device="meta"))
    with pytest.raises(GraphoptError, match="give the kept heads"):
        get_pass("prune")(ratio=0.3).decide(graph)
    with pytest.raises(GraphoptError, match="removed=\\[block indices\\]"):
        get_pass("drop")(blocks=1).decide(graph)
    PassManager([get_pass("prune")(heads={"blocks.0.attn1": [0, 1]}),
                 get_pass("drop")(removed=[1]), get_pass("route")(ranking=[0])]).run(graph)
    assert graph.is_meta and graph.recipe.steps[0]["decisions"]["original_heads"] == {
        "blocks.0.attn1": 4}


# ---- mid-size checkpoint, in a child process -------------------------------------------------

# A child's own peak memory: VmHWM of its address space, printed as it exits. (wait4's ru_maxrss
# is no use here: Linux carries the forking parent's high-water mark across exec, and the test
# process holds the whole model.)
_PEAK_AT_EXIT = ("import atexit, re, sys; atexit.register(lambda: print('VmHWM', re.search("
                 "r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1), file=sys.stderr));")


def _peak_from(err: str) -> int:
    return int(re.findall(r"^VmHWM (\d+)$", err, re.M)[-1]) * 1024


def _apply_child(recipe, ckpt, out, *, kill_when_done=None):
    """Run `graphopt apply` in a child; its peak RSS in bytes (None if killed on purpose)."""
    code = _PEAK_AT_EXIT + "from graphopt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "apply", str(recipe),
                             "--weights", str(ckpt), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if kill_when_done is not None:
        journal = out.parent / f".{out.name}.partial" / "journal.json"
        while proc.poll() is None:
            try:
                if len(json.loads(journal.read_text())["done"]) >= kill_when_done:
                    proc.send_signal(signal.SIGKILL)
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.002)
    err = proc.communicate()[1].decode()
    if kill_when_done is not None:
        assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {err}"
        return None
    assert proc.returncode == 0, err
    return _peak_from(err)


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("apply_mid")
    torch.manual_seed(0)
    model, ckpt = _checkpoint(tmp, MID_WAN, "24MB")
    heads = _kept(capture(build_model("wan", MID_WAN, "meta")), lambda n: list(range(0, n, 2)))
    graph = _compress(model, [get_pass("prune")(heads=heads), get_pass("drop")(removed=[2, 5])],
                      tmp / "recipe.json")
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return tmp, ckpt, graph, size


@pytest.mark.slow
def test_mid_size_apply_in_bounded_memory_equals_in_memory(mid):
    tmp, ckpt, graph, size = mid
    assert size > 300e6
    baseline = _baseline_rss(tmp)
    peak = _apply_child(tmp / "recipe.json", ckpt, tmp / "out")
    largest = max(s.nbytes for s in checkpoint_tensors(ckpt).values())
    # The streaming itself holds about two copies of the largest tensor, not the checkpoint.
    assert peak - baseline < size / 8, (peak, baseline, size)
    assert peak - baseline < 3 * largest + 64e6, (peak, baseline, largest)
    loaded = load(tmp / "out")
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(loaded(**x)[0], graph(**x)[0]) < 1e-6


# Large enough that the apply process's whole peak (Python, torch and the meta capture come to
# about 0.9 GB) sits well below the checkpoint: 30 blocks of width 1024, ≈ 500 M parameters, 2 GB.
BIG_WAN = {**MID_WAN, "num_attention_heads": 16, "ffn_dim": 4096, "num_layers": 30}


@pytest.mark.slow
def test_apply_peak_memory_is_well_below_a_2gb_checkpoint(tmp_path):
    torch.manual_seed(0)
    model, ckpt = _checkpoint(tmp_path, BIG_WAN, "200MB")
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    heads = _kept(capture(build_model("wan", BIG_WAN, "meta")), lambda n: list(range(0, n, 2)))
    graph = _compress(model, [get_pass("prune")(heads=heads), get_pass("drop")(removed=[1, 4, 7])],
                      tmp_path / "recipe.json")
    peak = _apply_child(tmp_path / "recipe.json", ckpt, tmp_path / "out")
    assert size > 1.9e9 and peak < size / 2, (peak, size)
    loaded = load(tmp_path / "out")
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(loaded(**x)[0], graph(**x)[0]) < 1e-6


def _baseline_rss(tmp) -> int:
    """Peak RSS of a child that imports what `graphopt apply` imports and captures the same
    architecture on the meta device: the part of apply's memory that is not streaming."""
    code = (_PEAK_AT_EXIT + "from graphopt.apply import plan; from graphopt.recipe import Recipe;"
            "Recipe.load(sys.argv[1]).rebuild('meta', replay=False)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp / "recipe.json")],
                          stderr=subprocess.PIPE, check=True)
    return _peak_from(proc.stderr.decode())


@pytest.mark.slow
def test_killed_apply_resumes_without_rewriting_finished_shards(mid):
    tmp, ckpt, graph, _ = mid
    out = tmp / "out_killed"
    _apply_child(tmp / "recipe.json", ckpt, out, kill_when_done=2)
    work = tmp / f".{out.name}.partial"
    assert not out.exists()
    done = json.loads((work / "journal.json").read_text())["done"]
    for name, nbytes in done.items():     # what the journal lists is whole, under its final name
        assert (work / name).stat().st_size == nbytes
    stamps = {name: (work / name).stat().st_mtime_ns for name in done}
    _apply_child(tmp / "recipe.json", ckpt, out)
    assert {name: (out / name).stat().st_mtime_ns for name in done} == stamps
    assert not work.exists() and not list(out.glob(".*.tmp"))
    loaded = load(out)
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(loaded(**x)[0], graph(**x)[0]) < 1e-6


def test_interrupted_apply_resumes_from_its_journal(tiny, tmp_path, monkeypatch):
    import graphopt.apply as apply_module

    _, model, ckpt = tiny
    graph = _compress(model, [get_pass("drop")(removed=[3])], tmp_path / "r.json")
    real, calls = apply_module._write_shard, []

    def interrupted(path, *args):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(apply_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_recipe(tmp_path / "r.json", ckpt, tmp_path / "out")
    work = tmp_path / ".out.partial"
    assert sorted(json.loads((work / "journal.json").read_text())["done"]) == sorted(calls)
    assert not list(work.glob(".*.tmp")) and not (tmp_path / "out").exists()
    stamps = {n: (work / n).stat().st_mtime_ns for n in calls}
    monkeypatch.setattr(apply_module, "_write_shard", real)
    apply_recipe(tmp_path / "r.json", ckpt, tmp_path / "out")
    assert {n: (tmp_path / "out" / n).stat().st_mtime_ns for n in calls} == stamps
    smaller = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "out")
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(smaller(**x)[0], graph(**x)[0]) < 1e-6


# ---- bf16 / fp16 checkpoints -----------------------------------------------------------------

def _prune_and_drop(graph):
    heads = _kept(graph, lambda n: [0, 2, 3])
    PassManager([get_pass("prune")(heads=heads), get_pass("drop")(removed=[1])]).run(graph)
    return graph


def _dtypes(folder):
    return {k: s.dtype for k, s in checkpoint_tensors(folder).items()}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    """A bf16 tiny Wan checkpoint as diffusers writes one (from_pretrained(torch_dtype=bf16) keeps
    its _keep_in_fp32_modules in float32), sharded; a prune + drop recipe made on it, applied with
    the CLI; the compressed graph in memory, in bf16, and in float32 (diffusers upcasts the
    checkpoint's values exactly)."""
    tmp = tmp_path_factory.mktemp("apply_bf16")
    build_model("wan", dict(build_model("wan").config, num_layers=3)).save_pretrained(tmp / "fp32")
    model = diffusers.WanTransformer3DModel.from_pretrained(tmp / "fp32", torch_dtype=torch.bfloat16)
    model.save_pretrained(tmp / "ckpt", max_shard_size="60KB")
    graph = _prune_and_drop(capture(model.eval()))
    graph.recipe.save(tmp / "recipe.json")
    assert main(["apply", str(tmp / "recipe.json"), "--weights", str(tmp / "ckpt"), "-o",
                 str(tmp / "out")]) == 0
    upcast = _prune_and_drop(capture(diffusers.WanTransformer3DModel.from_pretrained(tmp / "ckpt")))
    return tmp, graph, upcast


def test_bf16_checkpoint_keeps_its_dtype_through_apply_load_and_bench(bf16):
    from graphopt.bench import bench, load_pair
    from graphopt.serialize import state_dict

    tmp, graph, _ = bf16
    assert len({s.file for s in checkpoint_tensors(tmp / "ckpt").values()}) > 4
    stored, written = _dtypes(tmp / "ckpt"), _dtypes(tmp / "out")
    assert set(written.values()) == {torch.bfloat16, torch.float32}
    assert all(written[k] == stored[k] for k in written if k in stored)     # each keeps its dtype
    loaded = load(tmp / "out")
    assert {k: v.dtype for k, v in state_dict(loaded).items()} == written
    x = random_inputs(graph)
    with torch.no_grad():
        assert rel_error(loaded(**x)[0], graph(**x)[0]) < 1e-6
    # bench: the original runs in the compressed model's dtypes (the speedup is the compression's).
    original, compressed = load_pair(tmp / "out")
    kept = state_dict(compressed)
    assert all(v.dtype == kept[k].dtype for k, v in state_dict(original).items() if k in kept)
    result = bench(original, compressed, backends=("torch",), steps=1, repeats=1, warmup=0)
    assert [r["backend"] for r in result["backends"]] == ["torch"]


@pytest.mark.slow
def test_bf16_apply_output_exports_to_onnx_matching_pytorch(bf16, capsys):
    from graphopt.exporters.onnx import load_onnx

    tmp, graph, upcast = bf16
    loaded = load(tmp / "out")
    x = random_inputs(graph)
    with torch.no_grad():
        ours = loaded(**x)[0]
        exact = upcast(**{k: v.float() if torch.is_tensor(v) else v for k, v in x.items()})[0]
    capsys.readouterr()
    assert main(["export", str(tmp / "out"), "--format", "onnx", "-o", str(tmp / "onnx")]) == 0
    assert "bfloat16 weights exported in float32" in capsys.readouterr().out
    got = load_onnx(tmp / "onnx")(**x)[0]
    # The ONNX holds the bf16 values upcast: it matches float32 arithmetic on them to float32
    # rounding (2e-7 measured), and PyTorch's bf16 arithmetic to a few bf16 units (2^-8 = 3.9e-3;
    # 5e-3 measured).
    assert rel_error(got, exact) < 1e-5
    assert rel_error(got, ours.float()) < 2e-2


def test_fp16_checkpoint_keeps_its_dtype_through_apply_and_load(tmp_path):
    """Every tensor float16 (a model cast with .to(float16)). Tensors the constructor computes
    (Wan's rotary tables) come out float32, as diffusers' from_pretrained(torch_dtype=float16)
    makes them: `rope` is one of Wan's _keep_in_fp32_modules."""
    from graphopt.serialize import state_dict

    model = build_model("wan", dict(build_model("wan").config, num_layers=3)).to(torch.float16)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="60KB")
    graph = _prune_and_drop(capture(model))
    graph.recipe.save(tmp_path / "recipe.json")
    apply_recipe(tmp_path / "recipe.json", tmp_path / "ckpt", tmp_path / "out")
    written = _dtypes(tmp_path / "out")
    assert {written[k] for k in written if not k.startswith("rope.")} == {torch.float16}
    assert {written[k] for k in written if k.startswith("rope.")} == {torch.float32}
    loaded = load(tmp_path / "out")
    assert {k: v.dtype for k, v in state_dict(loaded).items()} == written
    x = random_inputs(graph)
    with torch.no_grad():
        # Only the rotary tables differ (float32 here, float16 in `graph`): a few fp16 units.
        assert rel_error(loaded(**x)[0].float(), graph(**x)[0].float()) < 5e-3
