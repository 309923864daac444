"""PARE's progressive distillation trainer, with VDMini's ICD/MCA losses.

Stage 1 recovers the width-compressed student with the router off (every block runs); stage 2
trains student and router jointly, each with its own learning rate, under the router budget
loss. Both stages minimise

    L = w_out·L_out + w_icd·ICD + w_mca·L_G  (+ w_budget·(budget + λ(t)·balance) in stage 2)

and, when w_mca > 0, the MCA discriminator takes one hinge step after each student step on the
same (detached) features. Data-free by default: x0 ~ N(0, I) (or latents from a folder),
s sampled in (0, 1), x_t = (1 − s)·x0 + s·ε (flow matching), timestep = s·num_train_timesteps;
the target is the teacher's prediction at x_t.

Runs as one process or under `torchrun` (DDP on gloo/nccl, or FSDP2 `fully_shard`: see
`_shard_fsdp` for what it shards). Checkpoints are folders of safetensors files plus JSON, written to a
temporary folder and renamed into place, in a checkpoint folder graphopt marks as its own (one
holding other files is refused: old checkpoints are deleted there); resuming restores weights,
optimizer states and every RNG, so an interrupted run logs the same losses as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from graphopt.distill.checkpoint import (
    CHECKPOINT_ENTRY,
    CHECKPOINT_FIX,
    check_checkpoint_dir,
    checkpoint_dirs,
    latest_checkpoint,
    optimizer_from_files,
    optimizer_to_files,
    save_tensors,
)
from graphopt.distill.config import DistillConfig, OptimizerConfig
from graphopt.distill.data import DistillData
from graphopt.distill.losses import ICDLoss, MCADiscriminator, MCALoss, OutputLoss, RouterBudgetLoss
from graphopt.errors import GraphoptError
from graphopt.io import atomic_write_text, claim_dir


@dataclass
class Outputs:
    """What one forward pass of a distillation pair returns."""

    pred: Tensor                      # model prediction (velocity/noise), same shape as the latent
    features: list[Tensor]            # taps (batch, frames, tokens_per_frame, dim); teacher[i] <-> student[i]
    gate_probs: Tensor | None = None  # (batch, n_routed) soft keep-probabilities (routed student only)
    exec_fraction: Tensor | None = None  # (batch,) expected FLOPs-weighted executed fraction, differentiable


@runtime_checkable
class DistillPair(Protocol):
    """A frozen teacher and a trainable student that see the same inputs.

    `inputs` are forward kwargs of a diffusers video transformer: hidden_states (B, C, F, H, W),
    timestep (B,), encoder_hidden_states (B, L, D), return_dict=False.
    Router parameters must be parameters of `student`, and the student must run through
    `student(...)`: DDP and FSDP2 hook the student module's forward.
    """

    teacher: nn.Module
    student: nn.Module

    def forward_teacher(self, inputs: dict) -> Outputs:
        """No grad; the teacher is frozen."""
        ...

    def forward_student(self, inputs: dict, *, hard_gates: bool = False, router_off: bool = False) -> Outputs:
        """hard_gates: thresholded router decisions (inference behaviour). router_off: every routable
        block runs (PARE stage 1); gate_probs and exec_fraction may then be None."""
        ...

    def student_parameters(self) -> list[nn.Parameter]:
        """The width/depth-compressed weights to train; every other student weight is frozen.
        Read from the module on each call (FSDP2 replaces parameter objects when it shards)."""
        ...

    def router_parameters(self) -> list[nn.Parameter]:
        """The router's weights; [] when the student is not routed."""
        ...

    def noise_level(self, inputs: dict) -> Tensor:
        """(batch,) in [0, 1]; conditions the MCA discriminator."""
        ...


@dataclass
class TrainResult:
    steps_done: int
    last_losses: dict[str, float]
    checkpoint: Path | None
    log_path: Path
    discriminator: MCADiscriminator | None  # the trained MCA discriminator (None when mca_weight = 0)


# ----------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class _Dist:
    rank: int
    world_size: int
    device: torch.device
    created_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _start_processes(device_option: str) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_option.startswith("cuda") or (device_option == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise GraphoptError(f"[run] device = {device_option!r} but CUDA is not available; use 'auto' or 'cpu'")
    if use_cuda:
        index = local_rank if device_option in ("auto", "cuda") else int(device_option.split(":")[1])
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return _Dist(rank=rank, world_size=world_size, device=device, created_group=created)


class _StudentForward(nn.Module):
    """Routes pair.forward_student through a module forward, so DDP can wrap it."""

    def __init__(self, pair: DistillPair):
        super().__init__()
        self.student = pair.student
        self._pair = (pair,)  # a tuple: the pair (and its teacher) must not become a submodule

    def forward(self, inputs: dict, router_off: bool) -> Outputs:
        return self._pair[0].forward_student(inputs, router_off=router_off)


def _shard_fsdp(module: nn.Module, device: torch.device) -> None:
    """FSDP2: one shard group per submodule whose class the module lists in `_no_split_modules`
    (diffusers' block classes, on a pair of diffusers modules), then the root.

    A GraphPair's twins are fx GraphModules: they list no such classes, and a block's weights are
    read by get_attr, never by calling a block module whose hooks could gather them, so the whole
    twin is one group (the root's). Its parameters are gathered for each forward and backward: the
    memory saved is the gradients' and optimizer states', not the weights'.

    The mesh is built on the run's device type: FSDP2's default mesh picks CUDA whenever it is
    present, even for a CPU (gloo) run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_classes = set(getattr(module, "_no_split_modules", None) or [])
    for sub in module.modules():
        if sub is not module and type(sub).__name__ in block_classes:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# Checkpoints (the files: graphopt.distill.checkpoint)

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


# ----------------------------------------------------------------------------------------------
# The trainer


def _lr_at(config: OptimizerConfig, step_in_stage: int, stage_steps: int) -> float:
    warmup = min(1.0, (step_in_stage + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    decay = 0.5 * (1 + math.cos(math.pi * step_in_stage / stage_steps)) if config.schedule == "cosine" else 1.0
    return config.lr * warmup * decay


def _first_float_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class _Trainer:
    def __init__(self, pair: DistillPair, config: DistillConfig, procs: _Dist):
        self.pair, self.config, self.procs = pair, config, procs
        run = config.run
        self.output_dir = Path(run.output_dir)
        self.log_path = self.output_dir / "log.jsonl"
        self.fsdp = run.parallel == "fsdp" and procs.active
        self._check_pair()

        pair.teacher.eval()
        pair.teacher.requires_grad_(False)
        pair.student.requires_grad_(False)
        for p in pair.student_parameters():
            p.requires_grad_(True)
        for p in pair.router_parameters():
            # FSDP2 fixes requires_grad when it shards, so the router is trainable from the start
            # there (unused, hence gradient-free, in stage 1); DDP is rebuilt when stage 2 begins.
            p.requires_grad_(self.fsdp)
        if self.fsdp:
            _shard_fsdp(pair.teacher, procs.device)
            _shard_fsdp(pair.student, procs.device)
        else:
            pair.teacher.to(procs.device)
            pair.student.to(procs.device)

        torch.manual_seed(run.seed)  # the same discriminator initialisation on every process
        self.data = DistillData(config.data, seed=run.seed, rank=procs.rank,
                                dtype=_first_float_dtype(pair.teacher), device=procs.device)
        self.autocast = torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=run.autocast == "bfloat16")
        feature_dims = self._probe_feature_dims()

        self.output_loss = OutputLoss()
        self.icd_loss = ICDLoss(eps=config.loss.icd_eps)
        self.mca_loss = MCALoss()
        self.budget_loss = RouterBudgetLoss(config.stage2.target_exec_fraction)
        self.discriminator: MCADiscriminator | None = None
        self.discriminator_optimizer: torch.optim.Optimizer | None = None
        self.discriminator_ddp: nn.Module | None = None
        if config.loss.mca_weight > 0:
            d = config.discriminator
            self.discriminator = MCADiscriminator(
                feature_dims, hidden_dim=d.hidden_dim, noise_embed_dim=d.noise_embed_dim, judged_taps=d.judged_taps
            ).to(procs.device)
            self.discriminator_optimizer = self._adamw([(self.discriminator.parameters(), config.optim.discriminator)])
            self.discriminator_ddp = self._ddp(self.discriminator)

        groups = [(pair.student_parameters(), config.optim.student)]
        if pair.router_parameters():
            groups.append((pair.router_parameters(), config.optim.router))
        self.student_optimizer = self._adamw(groups)
        self.student_forward: nn.Module | None = None
        self.stage = 0
        torch.manual_seed(run.seed + 1 + procs.rank)  # router noise and dropout differ per process

    # -- setup helpers

    def _check_pair(self) -> None:
        if not isinstance(self.pair, DistillPair):
            raise GraphoptError(
                f"{type(self.pair).__name__} is not a DistillPair: it needs teacher, student, forward_teacher, "
                "forward_student, student_parameters, router_parameters and noise_level"
            )
        student_ids = {id(p) for p in self.pair.student_parameters()}
        router_ids = {id(p) for p in self.pair.router_parameters()}
        owned = {id(p) for p in self.pair.student.parameters()}
        if not student_ids:
            raise GraphoptError("student_parameters() is empty: there is nothing to train")
        if student_ids & router_ids:
            raise GraphoptError("student_parameters() and router_parameters() overlap: each weight belongs to one")
        if not (student_ids | router_ids) <= owned:
            raise GraphoptError(
                "student_parameters()/router_parameters() include weights that are not parameters of "
                "pair.student; the router must be a submodule of the student"
            )
        if self.config.stage2.steps > 0 and not router_ids:
            raise GraphoptError(
                f"[stage2] steps = {self.config.stage2.steps} but the student has no router "
                "(router_parameters() is empty); set [stage2] steps = 0 or route the student first"
            )

    def _adamw(self, groups: list[tuple[Any, OptimizerConfig]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [{"params": list(params), "lr": c.lr, "betas": tuple(c.betas), "eps": c.eps,
              "weight_decay": c.weight_decay} for params, c in groups]
        )

    def _ddp(self, module: nn.Module) -> nn.Module:
        if not self.procs.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.procs.device.index] if self.procs.device.type == "cuda" else None
        return DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=self.config.run.find_unused_parameters
        )

    def _probe_feature_dims(self) -> list[int]:
        """One teacher pass on a throwaway batch (own generator: the data stream is untouched)."""
        inputs = self.data.sample(torch.Generator().manual_seed(self.config.run.seed))
        with torch.no_grad(), self.autocast:
            out = self.pair.forward_teacher(inputs)
            noise = self.pair.noise_level(inputs)
        if not out.features:
            raise GraphoptError("forward_teacher returned no feature taps; ICD and MCA need at least one")
        for i, f in enumerate(out.features):
            if f.ndim != 4:
                raise GraphoptError(f"teacher feature tap {i} has shape {tuple(f.shape)}; expected (B, F, T, D)")
        if noise.shape != (inputs["timestep"].shape[0],):
            raise GraphoptError(f"noise_level returned shape {tuple(noise.shape)}; expected (batch,)")
        return [f.shape[-1] for f in out.features]

    def _enter_stage(self, stage: int) -> None:
        if stage == self.stage:
            return
        self.stage = stage
        if not self.fsdp:
            for p in self.pair.router_parameters():
                p.requires_grad_(stage == 2)
        # DDP registers the parameters that need gradients when it is built, so it is rebuilt
        # (the old wrapper is dropped first: its reducer's hooks go with it).
        self.student_forward = None
        forward = _StudentForward(self.pair)
        self.student_forward = forward if self.fsdp else self._ddp(forward)

    # -- one step

    def _schedule(self, step: int) -> float:
        """Sets this step's learning rates (each stage has its own warmup/decay); returns λ(t), the
        anti-collapse weight, which decays linearly to 0 over the first part of stage 2."""
        stage1_steps, stage2_steps = self.config.stage1.steps, self.config.stage2.steps
        in_stage, length = (step, stage1_steps) if step < stage1_steps else (step - stage1_steps, stage2_steps)
        optim = self.config.optim
        configs = [optim.student, optim.router]
        for group, c in zip(self.student_optimizer.param_groups, configs):
            group["lr"] = _lr_at(c, in_stage, length)
        if self.discriminator_optimizer is not None:
            self.discriminator_optimizer.param_groups[0]["lr"] = _lr_at(optim.discriminator, in_stage, length)
        decay_steps = self.config.loss.balance_decay_fraction * max(stage2_steps, 1)
        return self.config.loss.balance_weight * max(0.0, 1.0 - in_stage / decay_steps) if step >= stage1_steps else 0.0

    def _clip(self, params: list[nn.Parameter], max_norm: float | None) -> None:
        with_grad = [p for p in params if p.grad is not None]
        if max_norm is not None and with_grad:
            torch.nn.utils.clip_grad_norm_(with_grad, max_norm)

    def _step(self, step: int) -> dict[str, Tensor]:
        stage = 1 if step < self.config.stage1.steps else 2
        self._enter_stage(stage)
        balance_weight = self._schedule(step)
        weights = self.config.loss
        inputs = self.data.next_batch()
        with self.autocast:
            with torch.no_grad():
                teacher = self.pair.forward_teacher(inputs)
            student = self.student_forward(inputs, router_off=stage == 1)
            noise = self.pair.noise_level(inputs).detach()

            losses: dict[str, Tensor] = {"output": self.output_loss(student.pred, teacher.pred)}
            total = weights.output_weight * losses["output"]
            losses["icd"] = self.icd_loss(student.features, teacher.features)
            total = total + weights.icd_weight * losses["icd"]
            if self.discriminator is not None:
                # The student's adversarial loss must not train D: freeze it, and call the bare
                # module so DDP's reducer does not wait for D gradients.
                self.discriminator.requires_grad_(False)
                losses["mca_gen"] = self.mca_loss(self.discriminator, student.features, noise)
                self.discriminator.requires_grad_(True)
                total = total + weights.mca_weight * losses["mca_gen"]
            if stage == 2:
                if student.exec_fraction is None:
                    raise GraphoptError("forward_student returned no exec_fraction in stage 2; the routed "
                                        "student must report its expected executed fraction")
                losses["budget"] = self.budget_loss.budget(student.exec_fraction)
                total = total + weights.budget_weight * losses["budget"]
                if student.gate_probs is not None:
                    losses["balance"] = self.budget_loss.balance(student.gate_probs)
                    total = total + weights.budget_weight * balance_weight * losses["balance"]
                losses["exec_fraction"] = student.exec_fraction.detach().float().mean()
        losses["total"] = total

        self.student_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self._clip(self.pair.student_parameters(), self.config.optim.student.max_grad_norm)
        self._clip(self.pair.router_parameters(), self.config.optim.router.max_grad_norm)
        self.student_optimizer.step()

        if self.discriminator is not None:
            self.discriminator_optimizer.zero_grad(set_to_none=True)
            with self.autocast:
                d_loss = self.mca_loss.discriminator_loss(
                    self.discriminator_ddp, teacher.features, student.features, noise
                )
            d_loss.backward()
            self._clip(list(self.discriminator.parameters()), self.config.optim.discriminator.max_grad_norm)
            self.discriminator_optimizer.step()
            losses["mca_disc"] = d_loss
        return {k: v.detach() for k, v in losses.items()}

    def _reduce(self, losses: dict[str, Tensor]) -> dict[str, float]:
        """Mean over processes (one small all-reduce), as Python floats for the log."""
        names = sorted(losses)
        values = torch.stack([losses[n].float() for n in names]).to(self.procs.device)
        if self.procs.active:
            dist.all_reduce(values)
            values /= self.procs.world_size
        return dict(zip(names, values.tolist()))

    # -- checkpoints

    def _rng_state(self) -> dict[str, Tensor]:
        state = {"torch": torch.get_rng_state(), "data": self.data.generator.get_state()}
        if self.procs.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.procs.device)
        return state

    def _save_checkpoint(self, steps_done: int) -> Path:
        final = self.output_dir / f"step-{steps_done:08d}"
        tmp = self.output_dir / f".step-{steps_done:08d}.tmp"
        if self.procs.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.procs.barrier()
        # Gathering full state dicts is collective: every process takes part, rank 0 gets the tensors.
        student = get_model_state_dict(self.pair.student, options=_FULL)
        student_optim = get_optimizer_state_dict(self.pair.student, self.student_optimizer, options=_FULL)
        if self.discriminator is not None:
            disc = get_model_state_dict(self.discriminator, options=_FULL)
            disc_optim = get_optimizer_state_dict(self.discriminator, self.discriminator_optimizer, options=_FULL)
        save_tensors(tmp / f"rng-rank{self.procs.rank}.safetensors", self._rng_state())
        if self.procs.is_main:
            save_tensors(tmp / "student.safetensors", student)
            tensors, meta = optimizer_to_files(student_optim)
            save_tensors(tmp / "optimizer-student.safetensors", tensors)
            atomic_write_text(tmp / "optimizer-student.json", json.dumps(meta))
            if self.discriminator is not None:
                save_tensors(tmp / "discriminator.safetensors", disc)
                tensors, meta = optimizer_to_files(disc_optim)
                save_tensors(tmp / "optimizer-discriminator.safetensors", tensors)
                atomic_write_text(tmp / "optimizer-discriminator.json", json.dumps(meta))
        self.procs.barrier()
        if self.procs.is_main:
            state = {"steps_done": steps_done, "world_size": self.procs.world_size,
                     "config": self.config.to_dict()}
            atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.output_dir)[: -self.config.run.keep_checkpoints]:
                shutil.rmtree(old)
        self.procs.barrier()
        return final

    def _load_checkpoint(self, folder: Path) -> int:
        state = json.loads((folder / "state.json").read_text())
        if state["world_size"] != self.procs.world_size:
            raise GraphoptError(
                f"checkpoint {folder} was written by {state['world_size']} processes, this run has "
                f"{self.procs.world_size}; resume with the same --nproc_per_node or set [run] resume = false"
            )
        saved, current = state["config"], self.config.to_dict()
        changed = sorted(
            f"[{section}] {key}" for section in current if section != "run"
            for key in set(current[section]) | set(saved.get(section, {}))
            if current[section].get(key) != saved.get(section, {}).get(key)
        )
        if changed:
            raise GraphoptError(
                f"checkpoint {folder} was trained with a different config ({', '.join(changed)}); restore "
                "those values to resume, or use a new [run] output_dir"
            )
        steps_done = state["steps_done"]
        self._enter_stage(1 if steps_done < self.config.stage1.steps else 2)
        # Every process reads the full files and keeps its own part (FSDP2 slices its shard).
        load = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.pair.student, load_file(str(folder / "student.safetensors")), options=load)
        student_optim = optimizer_from_files(load_file(str(folder / "optimizer-student.safetensors")),
                                              json.loads((folder / "optimizer-student.json").read_text()))
        # A stage-1 checkpoint has no Adam state for the router (no gradient yet). Loading is not
        # strict for that, and the loader's placeholder state (a zero-gradient step, which would
        # shift Adam's bias correction) is removed again, so the router starts as AdamW would.
        set_optimizer_state_dict(self.pair.student, self.student_optimizer, student_optim,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        for name, param in self.pair.student.named_parameters():
            if name not in student_optim["state"]:
                self.student_optimizer.state.pop(param, None)
        if self.discriminator is not None:
            self.discriminator.load_state_dict(load_file(str(folder / "discriminator.safetensors")))
            set_optimizer_state_dict(self.discriminator, self.discriminator_optimizer, optimizer_from_files(
                load_file(str(folder / "optimizer-discriminator.safetensors")),
                json.loads((folder / "optimizer-discriminator.json").read_text())), options=load)
        rng = load_file(str(folder / f"rng-rank{self.procs.rank}.safetensors"))
        torch.set_rng_state(rng["torch"])
        self.data.generator.set_state(rng["data"])
        if "cuda" in rng and self.procs.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.procs.device)
        return steps_done

    def _truncate_log(self, steps_done: int) -> None:
        """Drop log lines a killed run wrote after its last checkpoint."""
        if not self.log_path.is_file():
            return
        kept = []
        for line in self.log_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= steps_done:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by the kill
                continue
        atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))

    # -- the loop

    def run(self, stop_at_step: int | None) -> TrainResult:
        config = self.config
        total = config.total_steps
        end = total if stop_at_step is None else min(stop_at_step, total)
        check_checkpoint_dir(self.output_dir)     # every process: none waits at the barrier alone
        self.procs.barrier()
        if self.procs.is_main:
            claim_dir(self.output_dir, what="graphopt distill (checkpoints)",
                      adopt=CHECKPOINT_ENTRY.fullmatch, fix=CHECKPOINT_FIX)
        self.procs.barrier()
        previous = latest_checkpoint(self.output_dir)
        if previous is not None and not config.run.resume:
            raise GraphoptError(
                f"{self.output_dir} holds checkpoints of an earlier run (newest: {previous.name}) and "
                "[run] resume = false; set resume = true to continue it, or choose a new output_dir"
            )
        steps_done = self._load_checkpoint(previous) if previous is not None else 0
        if self.procs.is_main:
            if previous is None:
                self.log_path.unlink(missing_ok=True)
            else:
                self._truncate_log(steps_done)

        checkpoint = previous
        last: dict[str, float] = {}
        bar = tqdm(total=total, initial=steps_done, desc="distill", dynamic_ncols=True,
                   disable=not (self.procs.is_main and config.run.progress))
        with bar, (self.log_path.open("a") if self.procs.is_main else contextlib.nullcontext()) as log:
            while steps_done < end:
                last = self._reduce(self._step(steps_done))
                steps_done += 1
                if self.procs.is_main:
                    bar.update(1)
                    shown = ("output", "icd", "mca_gen", "budget")
                    bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k in shown})
                    if steps_done % config.run.log_every == 0:
                        lrs = [g["lr"] for g in self.student_optimizer.param_groups]
                        log.write(json.dumps({"step": steps_done, "stage": self.stage, "lr": lrs, **last}) + "\n")
                        log.flush()
                stage_end = steps_done == config.stage1.steps and config.stage2.steps > 0
                if steps_done % config.run.checkpoint_every == 0 or stage_end or steps_done == end:
                    checkpoint = self._save_checkpoint(steps_done)
        return TrainResult(steps_done=steps_done, last_losses=last, checkpoint=checkpoint,
                           log_path=self.log_path, discriminator=self.discriminator)


def train(pair: DistillPair, config: DistillConfig, *, stop_at_step: int | None = None) -> TrainResult:
    """Run (or resume) progressive distillation of pair.student towards pair.teacher.

    Under torchrun every process calls train() with the same config; each draws its own batches
    (seeded by rank). stop_at_step ends the run early after a checkpoint at that step; the
    schedule does not depend on it, so resuming later gives the uninterrupted run's losses.
    With no process group, train() creates one (WORLD_SIZE > 1) and destroys it at the end;
    to call train() twice in one torchrun process, init the group first (torchrun's store does
    not take a second init_process_group), and train() then leaves it open.
    """
    with joined_processes(config.run.device) as procs:
        return _Trainer(pair, config, procs).run(stop_at_step)


@contextlib.contextmanager
def joined_processes(device_option: str) -> Iterator[_Dist]:
    """The torchrun process group for the block (created when there is none, then destroyed).
    Around more than train(): an FSDP2-sharded pair gathers its weights in collectives after
    training too (GraphPair.finish, evaluating the student)."""
    procs = _start_processes(device_option)
    try:
        yield procs
    finally:
        if procs.created_group:
            dist.destroy_process_group()


@torch.no_grad()
def output_error(pair: DistillPair, batches: Iterator[dict] | list[dict], *, hard_gates: bool = True,
                 router_off: bool = False) -> float:
    """Relative error ‖ŷ_student − ŷ_teacher‖ / ‖ŷ_teacher‖ over the given batches (all pooled)."""
    diff = ref = 0.0
    for inputs in batches:
        t = pair.forward_teacher(inputs).pred.float()
        s = pair.forward_student(inputs, hard_gates=hard_gates, router_off=router_off).pred.float()
        diff += (s - t).pow(2).sum().item()
        ref += t.pow(2).sum().item()
    return math.sqrt(diff / ref)
