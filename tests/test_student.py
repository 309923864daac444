"""The graph pair and distill() on graphs: taps and block mapping through prune/drop/route,
training-mode gates equal inference skipping at hard gates, stage 1 recovers a 50%-head-pruned
tiny Wan, stage 2 meets the route budget, resume, 2-process DDP and FSDP2, and `graphopt distill`.

Run as a script, this file is the worker of the multi-process tests:
    torchrun --nproc_per_node 2 tests/test_student.py ddp|fsdp OUTDIR
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import GraphoptError, capture, compress, rel_error
from graphopt.distill import distill, distill_config, output_error
from graphopt.distill.run import eval_batches
from graphopt.families import FAMILIES, build_model
from graphopt.blocks import skip_blocks
from graphopt.distill.student import GraphPair, block_taps, teacher_graph

REPO = Path(__file__).resolve().parents[1]
BATCH = 2


def _teacher(layers: int = 2):
    config = {**FAMILIES["wan"].tiny_config, "num_layers": layers}
    spec = dataclasses.replace(FAMILIES["wan"].default_spec, batch=BATCH)
    return capture(build_model("wan", config), spec=spec)


def _compressed(teacher, passes, options):
    student = teacher.copy()
    compress(student, passes, options)
    return student


@pytest.fixture(scope="module")
def graphs():
    """Cached graphs by key; copy a student before training it."""
    cache = {}

    def get(key):
        if key not in cache:
            if key == "teacher":
                cache[key] = _teacher()
            elif key == "teacher4":
                cache[key] = _teacher(4)
            elif key == "pruned":
                cache[key] = _compressed(get("teacher"), ["prune"], {"prune": {"ratio": 0.5}})
            elif key == "pruned-routed":
                cache[key] = _compressed(get("teacher"), ["prune", "route"],
                                         {"prune": {"ratio": 0.5}, "route": {"budget": 0.7}})
        return cache[key]

    return get


def _config(tmp_path, **sections) -> dict:
    values = {"run": {"output_dir": str(tmp_path / "run"), "progress": False, "device": "cpu",
                      "checkpoint_every": 1000},
              "stage1": {"steps": 10}, "stage2": {"steps": 0},
              "discriminator": {"hidden_dim": 16, "noise_embed_dim": 16},
              "optim": {"student": {"lr": 1e-3, "schedule": "cosine"},
                        "router": {"lr": 1e-2}, "discriminator": {"lr": 1e-3}}}
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return values


def _inputs(graph, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = graph.example_inputs
    return {**x, "hidden_states": torch.randn(x["hidden_states"].shape, generator=g),
            "encoder_hidden_states": torch.randn(x["encoder_hidden_states"].shape, generator=g),
            "timestep": torch.tensor([300.0, 800.0])}


# ----------------------------------------------------------------------------------------------
# Taps and mapping


def test_taps_follow_blocks_through_drop_and_route(graphs):
    teacher = graphs("teacher4")
    dropped_only = _compressed(teacher, ["drop"], {"drop": {"blocks": 1}})
    student = _compressed(dropped_only, ["route"], {"route": {"budget": 1.0}})
    dropped = student.recipe.steps[0]["decisions"]["names"]
    pair = GraphPair(student, teacher)
    kept = [f"blocks.{i}" for i in range(4) if f"blocks.{i}" not in dropped]
    assert [m[0] for m in pair.mapping] == kept
    assert [m[2] for m in pair.mapping] == [int(b.split(".")[1]) for b in kept]
    assert [t.block for t in block_taps(student)] == kept and not student.blocks   # all routed

    inputs = _inputs(teacher)
    t = pair.forward_teacher(inputs)
    s = pair.forward_student(inputs, router_off=True)
    # Every gate on: the student is the teacher with the dropped block skipped, feature by feature.
    r = GraphPair(dropped_only, teacher).forward_student(inputs)
    assert rel_error(s.pred, r.pred) < 1e-6
    for a, b in zip(s.features, r.features):
        assert a.shape == (BATCH, 3, 4 * 6, 64) and rel_error(a, b) < 1e-6
    assert len(t.features) == len(s.features) and s.gate_probs is None
    # A skipped routed block's tap is its input: the previous block's tap, exactly.
    router = student.gm.router
    with torch.no_grad():
        router.net[2].bias.copy_(torch.tensor([3.0, -3.0, 2.0]))       # block kept[1] ranks last
    router.budget = router.fixed_share + sum(router.cost.tolist()) * 0.9
    h = pair.forward_student(inputs, hard_gates=True)
    assert torch.equal(h.features[1], h.features[0]) and not torch.equal(h.features[2], h.features[1])
    assert h.gate_probs.shape == (BATCH, 3) and h.exec_fraction.shape == (BATCH,)
    assert not router.training and router.force_gates is None and not router.history


def test_training_gates_equal_skipping_at_hard_gates_and_carry_gradients(graphs):
    student = graphs("pruned-routed").copy()
    pair = GraphPair(student, graphs("teacher"))
    router = student.gm.router
    inputs = _inputs(student)
    # Training mode (STE Gumbel-sigmoid) with logits far from 0: the sampled gates are (on, off).
    with torch.no_grad():
        router.net[2].bias.copy_(torch.tensor([30.0, -30.0]))
    trained = pair.forward_student(inputs)
    assert trained.pred.requires_grad
    unrouted = graphs("pruned")
    reference = skip_blocks(unrouted, [1])(**inputs)[0]
    assert rel_error(trained.pred, reference) < 1e-6
    assert torch.equal(trained.features[1], trained.features[0])
    # The inference path (the cond skips the block: only block 0 fits the budget) agrees.
    assert rel_error(pair.forward_student(inputs, hard_gates=True).pred, reference) < 1e-6

    # Gradients reach the router through the gate and the weights through the running branch.
    with torch.no_grad():
        router.net[2].bias.copy_(torch.tensor([0.5, -0.5]))
    torch.manual_seed(0)
    out = pair.forward_student(inputs)
    loss = (out.pred - pair.forward_teacher(inputs).pred).square().mean() + out.exec_fraction.mean()
    loss.backward()
    assert out.gate_probs.shape == (BATCH, 2) and out.exec_fraction.shape == (BATCH,)
    assert router.net[2].bias.grad.abs().sum() > 0
    w = student.gm.get_parameter("blocks.1.attn1.to_q.weight")
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert all(p.grad is None for p in pair.teacher.parameters())


def test_teacher_from_recipe_source_and_mismatch_errors(graphs, tmp_path):
    student = graphs("pruned").copy()
    with pytest.raises(GraphoptError, match="--teacher"):
        teacher_graph(student)              # captured from an in-memory module: nothing to load
    student.recipe.model["source"] = "tiny:wan"
    pair = GraphPair(student, teacher_graph(student, dtype="bfloat16"))   # teacher from the recipe
    assert pair.teacher_graph.example_inputs["hidden_states"].dtype == torch.bfloat16
    inputs = _inputs(student)
    out = pair.forward_teacher(inputs)
    assert out.pred.dtype == torch.float32 and out.features[0].dtype == torch.float32
    full = graphs("teacher")(**inputs)[0]
    assert 0 < rel_error(out.pred, full) < 0.05                 # the same model, in bfloat16
    with pytest.raises(GraphoptError, match="configs differ"):
        teacher_graph(student, "tiny:skyreels-v2")
    with pytest.raises(GraphoptError, match="batch_size = 3.*captured at batch 2"):
        distill_config(student, _config(tmp_path, data={"batch_size": 3}))
    routed = graphs("pruned-routed")
    with pytest.raises(GraphoptError, match="target_exec_fraction = 0.5.*budget"):
        distill_config(routed, _config(tmp_path, stage2={"steps": 5, "target_exec_fraction": 0.5}))
    with pytest.raises(GraphoptError, match="teacher is routed"):
        GraphPair(routed, routed)


# ----------------------------------------------------------------------------------------------
# Training on graphs


def test_stage1_halves_the_pruned_students_output_error(graphs, tmp_path):
    student = graphs("pruned").copy()
    teacher = graphs("teacher")
    # Output + ICD: on this tiny model MCA's adversarial term (≈1) dwarfs the output loss (≈1e-2).
    config = distill_config(student, _config(tmp_path, stage1={"steps": 300},
                                             loss={"mca_weight": 0.0}))
    graph = distill(student, teacher, config)
    report = graph.reports["distill"]
    assert report.steps == 300 and report.exec_fraction_after is None
    assert report.output_error_before > 0.05                         # 50% of the heads are gone
    assert report.output_error_after <= report.output_error_before / 2, report.to_json()
    # Trained in place: the graph itself (not only the pair's twin) now matches the teacher better.
    after = output_error(GraphPair(graph, teacher), eval_batches(config, graph))
    assert after == pytest.approx(report.output_error_after, rel=1e-6)


def test_stage2_brings_the_executed_fraction_to_the_budget_and_saves(graphs, tmp_path):
    student = graphs("pruned-routed").copy()
    budget = student.gm.router.budget
    graph = distill(student, graphs("teacher"), _config(
        tmp_path, stage1={"steps": 20}, stage2={"steps": 80}, loss={"budget_weight": 10.0}),
        out=tmp_path / "out")
    report = graph.reports["distill"]
    tail = [e["exec_fraction"] for e in report.log[-10:]]
    assert abs(sum(tail) / len(tail) - budget) < 0.05, tail
    assert report.exec_fraction_after <= budget + 1e-6
    assert {"model.safetensors", "recipe.json", "config.json", "distill.json", "distill.png"} <= \
        {p.name for p in (tmp_path / "out").iterdir()}
    loaded = graphopt.load(tmp_path / "out")
    inputs = _inputs(graph)
    with torch.no_grad():
        graph.gm.router.record = loaded.gm.router.record = False
        assert rel_error(loaded(**inputs)[0], graph(**inputs)[0]) < 1e-6
    torch.export.export(graph.gm, (), inputs, strict=False)        # still exportable (cond intact)


def test_resume_on_graphs_gives_the_uninterrupted_losses(graphs, tmp_path):
    def run(folder, stop=None):
        values = _config(folder, run={"checkpoint_every": 2}, stage1={"steps": 3},
                         stage2={"steps": 3})
        return distill(graphs("pruned-routed").copy(), graphs("teacher"), values,
                       stop_at_step=stop)

    reference = run(tmp_path / "ref").reports["distill"].log
    run(tmp_path / "resumed", stop=4)
    resumed = run(tmp_path / "resumed")
    assert resumed.reports["distill"].log == reference
    assert [e["stage"] for e in reference] == [1, 1, 1, 2, 2, 2]


def _run_workers(mode: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", __file__, mode, str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output[-6000:]


@pytest.mark.slow       # ~30 s; the default suite covers DDP with test_trainer's local pair
def test_ddp_two_processes_on_graphs_keep_identical_parameters(tmp_path):
    _run_workers("ddp", tmp_path)
    from safetensors.torch import load_file

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    initial = dict(graphs_initial_state())
    moved = 0
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
        moved += not torch.equal(value, initial[name])
    assert moved > 10 and any(n.startswith("router.") for n in rank0)
    assert (tmp_path / "out" / "model.safetensors").is_file()          # written by rank 0 only


@pytest.mark.slow       # ~1 min: two 2-process runs
def test_fsdp2_on_graphs_matches_ddp(tmp_path):
    """FSDP2 on the graph pair (the twins shard as one group each: see trainer._shard_fsdp) trains
    the routed student to what DDP trains it to."""
    from safetensors.torch import load_file

    _run_workers("ddp", tmp_path / "ddp")
    _run_workers("fsdp", tmp_path / "fsdp")
    ddp, fsdp = (load_file(str(tmp_path / mode / "rank0.safetensors")) for mode in ("ddp", "fsdp"))
    initial = graphs_initial_state()
    assert sorted(fsdp) == sorted(ddp) and any(n.startswith("router.") for n in fsdp)
    assert sum(not torch.equal(v, initial[k]) for k, v in fsdp.items()) > 10     # it trained
    for name, value in ddp.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-5, msg=name)


def graphs_initial_state():
    student = _compressed(_teacher(), ["prune", "route"],
                          {"prune": {"ratio": 0.5}, "route": {"budget": 0.7}})
    return {k: v.detach() for k, v in student.gm.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# Command line


def test_cli_distill_end_to_end(tmp_path, capsys):
    from graphopt.cli import main

    comp, out = tmp_path / "comp", tmp_path / "dist"
    assert main(["compress", "tiny:wan", "--passes", "prune,route", "--prune-ratio", "0.5",
                 "--route-budget", "0.7", "-o", str(comp)]) == 0
    toml = (REPO / "graphopt" / "assets" / "distill_tiny.toml").read_text()
    toml = toml.replace("steps = 300", "steps = 4").replace("steps = 200", "steps = 3")
    (tmp_path / "d.toml").write_text(toml.replace('device = "auto"', 'device = "cpu"'))
    assert main(["distill", str(comp), "--config", str(tmp_path / "d.toml"), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "output error vs teacher" in err and "distill" in err
    saved = json.loads((out / "distill.json").read_text())
    assert saved["report"]["steps"] == 7 and saved["config"]["data"]["batch_size"] == 1
    assert (out / "report.json").is_file() and (out / "distill.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "dist.checkpoints").glob("step-*")) == \
        ["step-00000004", "step-00000007"]
    graph = graphopt.load(out)
    assert json.loads((out / "recipe.json").read_text())["model"]["source"] == "tiny:wan"
    graph(**graph.example_inputs)
    # Rerunning resumes from the last checkpoint (nothing left to train), same output.
    assert main(["distill", str(comp), "--config", str(tmp_path / "d.toml"), "-o", str(out)]) == 0

    (tmp_path / "bad.toml").write_text("[stage1]\nsteps = -1\n")
    assert main(["distill", str(comp), "--config", str(tmp_path / "bad.toml"), "-o",
                 str(tmp_path / "x")]) == 2
    assert main(["distill", str(comp), "--config", str(tmp_path / "d.toml"), "--teacher",
                 "tiny:skyreels-v2", "-o", str(tmp_path / "x")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "configs differ" in lines[-1]
    assert "steps = -1" in lines[-2] and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# Worker


def _worker(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    teacher = _teacher()
    student = _compressed(teacher, ["prune", "route"],
                          {"prune": {"ratio": 0.5}, "route": {"budget": 0.7}})
    values = _config(out, run={"parallel": mode}, stage1={"steps": 2}, stage2={"steps": 2})
    graph = distill(student, teacher, values, out=out / "out")
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in graph.gm.state_dict().items()},
              str(out / f"rank{os.environ['RANK']}.safetensors"))


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
