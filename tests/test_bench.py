"""`graphopt bench`: original vs compressed in one process, per backend, end to end on the CLI."""
import json

import pytest

from graphopt import capture, load, model_cost
from graphopt.cli import main


def _compress(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("bench") / "compressed"
    assert main(["compress", model, "--passes", "prune,route", "--prune-ratio", "0.25",
                 "--prune-criterion", "magnitude", "--route-budget", "0.6", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory):
    """The shipped teacher, pruned and routed by the CLI."""
    return _compress(tmp_path_factory, "tiny-wan")


def _bench_json(capsys, folder, *extra):
    capsys.readouterr()
    assert main(["bench", str(folder), "--steps", "2", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_tiny_teacher(teacher_folder, capsys):
    result = _bench_json(capsys, teacher_folder, "--original", "tiny-wan", "--backends", "torch")
    assert result["original"] == "tiny-wan" and result["steps"] == 2
    flops = result["flops_per_step"]
    assert flops["original"] == model_cost(capture("tiny-wan")).flops
    dense = model_cost(load(teacher_folder)).flops     # the pruned model, every routed block run
    assert dense < 0.95 * flops["original"]
    # Executed FLOPs follow the router: under the 0.6 budget of the pruned model's FLOPs.
    assert 0 < flops["compressed"] <= 0.6 * 1.0001 * dense
    assert len(result["flops_per_call"]["compressed"]) == 2
    [row] = result["backends"]
    assert row["backend"] == "torch" and row["original_s"] > 0 and row["compressed_s"] > 0
    assert row["efficiency"] == pytest.approx(row["speedup"] / result["flops_speedup"])
    assert result["flops_speedup"] == pytest.approx(flops["original"] / flops["compressed"])


def test_bench_table_with_onnxruntime(tmp_path_factory, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = _compress(tmp_path_factory, "tiny:wan")
    recipe = json.loads((folder / "recipe.json").read_text())
    recipe["model"]["source"] = "a model that is gone"      # the original: rebuilt from the recipe
    (folder / "recipe.json").write_text(json.dumps(recipe))
    capsys.readouterr()
    assert main(["bench", str(folder), "--steps", "2", "--repeats", "1", "--warmup", "0",
                 "--threads", "1", "--plot", str(tmp_path / "bench.png")]) == 0
    table = " ".join(capsys.readouterr().out.split())      # rich wraps lines at the terminal width
    for word in ("torch", "onnxruntime", "original", "compressed", "efficiency",
                 "seeded random weights"):
        assert word in table
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_bad_input(teacher_folder, tmp_path, capsys):
    for argv, message in (
        (["bench", str(tmp_path / "nowhere")], "has no recipe.json"),
        (["bench", str(teacher_folder), "--backends", "torch,tensorrt"], "unknown backend"),
        (["bench", str(teacher_folder), "--steps", "0"], "--steps: must be >= 1"),
        (["bench", str(teacher_folder), "--original", "tiny:wan"], "configs differ"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_bench_every_backend(teacher_folder, capsys):
    result = _bench_json(capsys, teacher_folder, "--backends", "torch,onnxruntime,aoti")
    assert [r["backend"] for r in result["backends"]] == ["torch", "onnxruntime", "aoti"]
    assert all(r["speedup"] > 0 for r in result["backends"])
