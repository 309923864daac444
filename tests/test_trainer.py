"""Progressive distillation trainer on a real (tiny) diffusers WanTransformer3DModel.

The DistillPair here is test-local, so that the trainer is tested apart from the graphs: the
student is a perturbed copy of the teacher (one head's out-projection zeroed, noise on every
weight), optionally routed by a small gate network, with feature taps taken by forward hooks on
the blocks. What graphopt trains, the graph pair (graphopt.distill.student), is tested in
test_student.py, FSDP2 included (on the real pair only: this one would test a router graphopt
does not have).

Run as a script, this file is also the worker of the multi-process tests:
    python tests/test_trainer.py kill OUTDIR           (single process; SIGKILLs itself mid-run)
    torchrun --nproc_per_node 2 tests/test_trainer.py ddp OUTDIR
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file
from torch import nn

from graphopt.distill import DistillData, Outputs, config_from_dict, load_config, output_error, train
from graphopt.distill.config import DataConfig
from graphopt.distill.trainer import _Trainer
from graphopt.errors import GraphoptError

REPO = Path(__file__).resolve().parents[1]
LATENT_SHAPE = [4, 2, 8, 8]  # (C, F, H, W): 2 frames of 4×4 tokens after the (1, 2, 2) patch
TEXT_SHAPE = [8, 16]


def tiny_wan(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        qk_norm="rms_norm_across_heads",
    )


class GatedBlock(nn.Module):
    """x + g·(block(x) − x): g = 1 runs the block, g = 0 skips it (identity on the residual stream)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.gate: torch.Tensor | None = None  # (batch,), set by RoutedStudent before each forward

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        out = self.block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        if self.gate is None:
            return out
        return hidden_states + self.gate.view(-1, 1, 1).to(out.dtype) * (out - hidden_states)


class Router(nn.Module):
    """Keep-logits per block from the noise level and the pooled latent (starts mostly on)."""

    def __init__(self, n_blocks: int, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16 + channels, 32), nn.SiLU(), nn.Linear(32, n_blocks))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, 2.0)

    def forward(self, inputs: dict) -> torch.Tensor:
        s = inputs["timestep"].float()[:, None] / 1000
        freqs = torch.exp(torch.linspace(0, math.log(100.0), 8, device=s.device))[None]
        pooled = inputs["hidden_states"].float().mean(dim=(2, 3, 4))
        return self.net(torch.cat([torch.sin(s * freqs), torch.cos(s * freqs), pooled], dim=1))


class RoutedStudent(nn.Module):
    def __init__(self, model: WanTransformer3DModel, routed: bool):
        super().__init__()
        for i, block in enumerate(model.blocks):
            model.blocks[i] = GatedBlock(block)
        self.model = model
        self.router = Router(len(model.blocks), model.config.in_channels) if routed else None

    def forward(self, inputs: dict, mode: str):
        probs = gates = None
        if self.router is not None and mode != "off":
            logits = self.router(inputs)
            probs = torch.sigmoid(logits)
            if mode == "hard":
                gates = (probs > 0.5).to(probs.dtype)
            else:  # Gumbel-sigmoid, straight-through
                u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
                soft = torch.sigmoid(logits + torch.log(u) - torch.log1p(-u))
                gates = (soft > 0.5).to(soft.dtype) + soft - soft.detach()
        for i, block in enumerate(self.model.blocks):
            block.gate = None if gates is None else gates[:, i]
        return self.model(**inputs)[0], probs


class TinyPair:
    """A test-local DistillPair: features are block outputs reshaped to (B, F, T, D)."""

    def __init__(self, teacher: WanTransformer3DModel, student: RoutedStudent):
        self.teacher, self.student = teacher, student
        self._taps: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
        for key, blocks in (("teacher", teacher.blocks), ("student", student.model.blocks)):
            for block in blocks:
                block.register_forward_hook(lambda module, args, out, key=key: self._taps[key].append(out))

    def _features(self, key: str, inputs: dict) -> list[torch.Tensor]:
        taps, self._taps[key] = self._taps[key], []
        batch, _, frames, height, width = inputs["hidden_states"].shape
        return [t.reshape(batch, frames, (height // 2) * (width // 2), t.shape[-1]) for t in taps]

    def forward_teacher(self, inputs: dict) -> Outputs:
        self._taps["teacher"] = []
        with torch.no_grad():
            pred = self.teacher(**inputs)[0]
        return Outputs(pred=pred, features=self._features("teacher", inputs))

    def forward_student(self, inputs: dict, *, hard_gates: bool = False, router_off: bool = False) -> Outputs:
        self._taps["student"] = []
        pred, probs = self.student(inputs, "off" if router_off else "hard" if hard_gates else "soft")
        return Outputs(pred=pred, features=self._features("student", inputs), gate_probs=probs,
                       exec_fraction=None if probs is None else probs.mean(dim=1))

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.model.parameters())

    def router_parameters(self) -> list[nn.Parameter]:
        return [] if self.student.router is None else list(self.student.router.parameters())

    def noise_level(self, inputs: dict) -> torch.Tensor:
        return inputs["timestep"].float() / 1000


def make_pair(*, routed: bool, seed: int = 0) -> TinyPair:
    teacher = tiny_wan(seed)
    model = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.blocks:
            block.attn1.to_out[0].weight[:, 24:32] = 0  # head 3's output columns: as if pruned
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    torch.manual_seed(seed + 2)
    return TinyPair(teacher, RoutedStudent(model, routed))


def make_config(output_dir: Path, **sections) -> dict:
    values = {
        "run": {"output_dir": str(output_dir), "seed": 0, "checkpoint_every": 100, "progress": False,
                "device": "cpu"},
        "data": {"batch_size": 2, "latent_shape": LATENT_SHAPE, "text_shape": TEXT_SHAPE},
        "stage1": {"steps": 10},
        "stage2": {"steps": 0, "target_exec_fraction": 0.5},
        "discriminator": {"hidden_dim": 16, "noise_embed_dim": 16},
        "optim": {"student": {"lr": 1e-3}, "router": {"lr": 1e-2}, "discriminator": {"lr": 1e-3}},
    }
    for section, entries in sections.items():
        values.setdefault(section, {}).update(entries)
    return values


def _worker_env(threads: int) -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads)}


def _run(command: list[str], env: dict, timeout: float = 240) -> tuple[int, str]:
    """Run in its own process group, so a hang takes its workers down with it."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{command} hung for {timeout} s:\n{output[-5000:]}") from None
    return proc.returncode, output


def eval_batches(n: int = 4) -> list[dict]:
    data = DistillData(DataConfig(batch_size=4, latent_shape=LATENT_SHAPE, text_shape=TEXT_SHAPE),
                       seed=99, rank=0, dtype=torch.float32, device=torch.device("cpu"))
    return [data.next_batch() for _ in range(n)]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Config


def test_config_loads_from_toml_and_names_bad_fields(tmp_path):
    path = tmp_path / "distill.toml"
    path.write_text(
        '[run]\noutput_dir = "out"\nseed = 3\n'
        "[data]\nbatch_size = 2\nlatent_shape = [4, 2, 8, 8]\ntext_shape = [8, 16]\n"
        "[stage2]\nsteps = 5\ntarget_exec_fraction = 0.7\n"
        "[optim.router]\nlr = 0.01\n"
    )
    config = load_config(path)
    assert config.run.seed == 3 and config.stage2.target_exec_fraction == 0.7
    assert config.optim.router.lr == 0.01 and config.optim.student.lr == 1e-5
    assert (config.loss.output_weight, config.loss.icd_weight, config.loss.mca_weight) == (1.0, 0.1, 1.0)

    base = make_config(tmp_path)
    with pytest.raises(GraphoptError, match=r"\[stage2\] target_exec_fraction = 1.5 .*> 0 and <= 1"):
        config_from_dict({**base, "stage2": {"target_exec_fraction": 1.5}})
    with pytest.raises(GraphoptError, match=r"\[optim.discriminator\] lr = -1"):
        config_from_dict({**base, "optim": {"discriminator": {"lr": -1}}})
    with pytest.raises(GraphoptError, match=r"\[loss\] unknown key\(s\) \['icd_wieght'\]"):
        config_from_dict({**base, "loss": {"icd_wieght": 0.2}})
    with pytest.raises(GraphoptError, match=r"\[run\] parallel = 'zero3'.*'ddp' \| 'fsdp'"):
        config_from_dict({**base, "run": {"parallel": "zero3"}})
    with pytest.raises(GraphoptError, match=r"\[data\] latent_shape"):
        config_from_dict({**base, "data": {"batch_size": 1}})


def test_data_is_flow_matching_noise_of_random_or_folder_latents(tmp_path):
    config = DataConfig(batch_size=3, latent_shape=LATENT_SHAPE, text_shape=TEXT_SHAPE)
    data = DistillData(config, seed=0, rank=0, dtype=torch.float32, device=torch.device("cpu"))
    batch = data.next_batch()
    assert batch["hidden_states"].shape == (3, *LATENT_SHAPE)
    assert batch["encoder_hidden_states"].shape == (3, *TEXT_SHAPE)
    assert ((batch["timestep"] > 0) & (batch["timestep"] < 1000)).all()
    other_rank = DistillData(config, seed=0, rank=1, dtype=torch.float32, device=torch.device("cpu"))
    assert not torch.equal(other_rank.next_batch()["hidden_states"], batch["hidden_states"])

    # Folder: x_t must lie on the segment between the stored latent and some noise.
    latent = torch.full(LATENT_SHAPE, 3.0)
    text = torch.randn(*TEXT_SHAPE)
    save_file({"latents": latent, "encoder_hidden_states": text}, str(tmp_path / "a.safetensors"))
    folder_data = DistillData(DataConfig(batch_size=2, folder=str(tmp_path)), seed=0, rank=0,
                              dtype=torch.float32, device=torch.device("cpu"))
    batch = folder_data.next_batch()
    s = (batch["timestep"] / 1000).view(-1, 1, 1, 1, 1)
    noise = (batch["hidden_states"] - (1 - s) * latent) / s
    assert abs(noise.std().item() - 1.0) < 0.2 and torch.equal(batch["encoder_hidden_states"][0], text)
    save_file({"latents": torch.zeros(4, 2, 8, 4)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(GraphoptError, match="`latents` must have one shape"):
        DistillData(DataConfig(folder=str(tmp_path)), seed=0, rank=0, dtype=torch.float32, device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Training


def test_stage1_recovers_the_perturbed_student(tmp_path):
    pair = make_pair(routed=False)
    batches = eval_batches()
    before = output_error(pair, batches)
    config = config_from_dict(make_config(tmp_path, stage1={"steps": 200}))
    result = train(pair, config)
    after = output_error(pair, batches)
    assert after <= before / 2, (before, after)
    log = read_log(result.log_path)
    assert [entry["step"] for entry in log] == list(range(1, 201))
    assert {"output", "icd", "mca_gen", "mca_disc", "total"} <= set(log[-1])
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000100", "step-00000200"]
    files = {p.name for p in (tmp_path / "step-00000200").iterdir()}
    assert files == {"student.safetensors", "discriminator.safetensors", "optimizer-student.safetensors",
                     "optimizer-student.json", "optimizer-discriminator.safetensors",
                     "optimizer-discriminator.json", "rng-rank0.safetensors", "state.json"}


def test_stage2_trains_router_towards_the_budget(tmp_path):
    pair = make_pair(routed=True)
    config = config_from_dict(make_config(
        tmp_path, stage1={"steps": 5}, stage2={"steps": 60, "target_exec_fraction": 0.5},
        loss={"budget_weight": 10.0},
    ))
    router_before = [p.detach().clone() for p in pair.router_parameters()]
    result = train(pair, config)
    log = read_log(result.log_path)
    assert [e["stage"] for e in log] == [1] * 5 + [2] * 60
    assert "budget" not in log[4] and "budget" in log[5]
    # Router untouched in stage 1 (frozen, not run), trained in stage 2; spending falls to the target.
    assert log[5]["exec_fraction"] > 0.8
    assert abs(sum(e["exec_fraction"] for e in log[-10:]) / 10 - 0.5) < 0.1
    assert any(not torch.equal(a, b) for a, b in zip(router_before, pair.router_parameters()))


def _uninterrupted_and_resumed_config(output_dir: Path) -> dict:
    return make_config(output_dir, run={"checkpoint_every": 4}, stage1={"steps": 6},
                       stage2={"steps": 6}, loss={"budget_weight": 5.0})


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path):
    reference = train(make_pair(routed=True), config_from_dict(_uninterrupted_and_resumed_config(tmp_path / "ref")))
    reference_log = read_log(reference.log_path)

    killed_dir = tmp_path / "killed"
    # Same thread count as this process: CPU reductions split by thread change the last bits.
    env = _worker_env(threads=torch.get_num_threads())
    returncode, output = _run([sys.executable, __file__, "kill", str(killed_dir)], env)
    assert returncode == -signal.SIGKILL, output[-3000:]
    assert len(read_log(killed_dir / "log.jsonl")) == 7  # step 7 was logged after the step-6 checkpoint
    assert sorted(p.name for p in killed_dir.glob("step-*")) == ["step-00000004", "step-00000006"]

    config = config_from_dict(_uninterrupted_and_resumed_config(killed_dir))
    partial = train(make_pair(routed=True), config, stop_at_step=10)  # resumes at 6, stops at 10
    assert partial.steps_done == 10 and partial.checkpoint.name == "step-00000010"
    pair = make_pair(routed=True)
    resumed = train(pair, config)  # resumes at 10
    assert read_log(resumed.log_path) == reference_log  # every loss of every step, bit for bit
    final = load_file(str(reference.checkpoint / "student.safetensors"))
    for name, value in pair.student.state_dict().items():
        assert torch.equal(value, final[name]), name

    fresh = _uninterrupted_and_resumed_config(killed_dir)
    fresh["run"]["resume"] = False
    with pytest.raises(GraphoptError, match="holds checkpoints of an earlier run"):
        train(make_pair(routed=True), config_from_dict(fresh))
    changed = _uninterrupted_and_resumed_config(killed_dir)
    changed["loss"]["icd_weight"] = 0.5
    with pytest.raises(GraphoptError, match=r"different config \(\[loss\] icd_weight\)"):
        train(make_pair(routed=True), config_from_dict(changed))


def _run_workers(mode: str, out: Path) -> None:
    env = _worker_env(threads=1)
    returncode, output = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", __file__, mode, str(out)], env)
    assert returncode == 0, output[-8000:]


def _distributed_config(output_dir: Path, parallel: str) -> dict:
    return make_config(output_dir, run={"parallel": parallel, "checkpoint_every": 3},
                       stage1={"steps": 3}, stage2={"steps": 3})


def test_ddp_two_processes_keep_identical_parameters(tmp_path):
    _run_workers("ddp", tmp_path)
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    initial = make_pair(routed=True).student.state_dict()
    moved = 0
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
        moved += not torch.equal(value, initial[name.removeprefix("student.")]) if name.startswith("student.") else 0
    assert moved > 10  # training happened: student and router weights moved, identically on both ranks
    assert any(name.startswith("discriminator.") for name in rank0)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [e["stage"] for e in log] == [1, 1, 1, 2, 2, 2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training_recovers_and_resumes_identically(tmp_path):
    def config(output_dir: Path, stage1: int = 6, stage2: int = 4):
        return config_from_dict(make_config(
            output_dir, run={"device": "cuda", "autocast": "bfloat16", "checkpoint_every": 3},
            stage1={"steps": stage1}, stage2={"steps": stage2}, loss={"budget_weight": 5.0}))

    reference = train(make_pair(routed=True), config(tmp_path / "ref"))
    train(make_pair(routed=True), config(tmp_path / "resumed"), stop_at_step=5)
    resumed = train(make_pair(routed=True), config(tmp_path / "resumed"))
    assert read_log(resumed.log_path) == read_log(reference.log_path)
    rng = load_file(str(resumed.checkpoint / "rng-rank0.safetensors"))
    assert set(rng) == {"torch", "data", "cuda"}

    pair = make_pair(routed=False)
    data = DistillData(DataConfig(batch_size=4, latent_shape=LATENT_SHAPE, text_shape=TEXT_SHAPE),
                       seed=99, rank=0, dtype=torch.float32, device=torch.device("cuda"))
    batches = [data.next_batch() for _ in range(4)]
    pair.teacher.cuda(), pair.student.cuda()
    before = output_error(pair, batches)
    train(pair, config(tmp_path / "recover", stage1=200, stage2=0))
    after = output_error(pair, batches)
    assert after <= before / 2, (before, after)


# ----------------------------------------------------------------------------------------------
# Workers


def _kill_worker(out: Path) -> None:
    original = _Trainer._step

    def step_then_die(self, step):
        if step == 7:  # 7 steps done: checkpoints at 4 and 6 exist, step 7's log line is written
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step)

    _Trainer._step = step_then_die
    train(make_pair(routed=True), config_from_dict(_uninterrupted_and_resumed_config(out)))


def _distributed_worker(mode: str, out: Path) -> None:
    # One process group for both train() calls (train() joins an existing group and leaves it open).
    torch.distributed.init_process_group("gloo")
    config = config_from_dict(_distributed_config(out / "run", mode))
    train(make_pair(routed=True), config, stop_at_step=4)  # checkpoint, then resume in stage 2
    pair = make_pair(routed=True)
    result = train(pair, config)
    rank = int(os.environ["RANK"])
    tensors = {f"student.{k}": v.contiguous() for k, v in pair.student.state_dict().items()}
    tensors.update({f"discriminator.{k}": v for k, v in result.discriminator.state_dict().items()})
    save_file(tensors, str(out / f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker_mode, worker_out = sys.argv[1], Path(sys.argv[2])
    if worker_mode == "kill":
        _kill_worker(worker_out)
    else:
        _distributed_worker(worker_mode, worker_out)
