"""Distillation run configuration: validated dataclasses, loaded from TOML.

    [run]                      output_dir, seed, checkpoint_every, resume, parallel, ...
    [data]                     batch_size, latent_shape / text_shape or folder, timestep sampling
    [stage1]                   steps (width recovery, router off)
    [stage2]                   steps, target_exec_fraction (student + router jointly)
    [loss]                     weights (VDMini's best as defaults) and the anti-collapse schedule
    [discriminator]            MCA discriminator size and the taps it judges
    [optim.student] [optim.router] [optim.discriminator]   AdamW settings, one table each

Every value is checked when the dataclass is built; a bad one raises GraphoptError naming the
field, the value and the allowed range. Unknown keys are errors too (a typo must not silently
fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError


def _fail(name: str, value: Any, allowed: str) -> None:
    raise GraphoptError(f"{name} = {value!r} is not allowed (allowed: {allowed})")


def _check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        _fail(name, value, kind)
    if not math.isfinite(value):
        _fail(name, value, "a finite number")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        _fail(name, value, bound if high is None else f"{bound} and <= {high}")
    if high is not None and value > high:
        _fail(name, value, f"<= {high}" if low is None else f"{'>' if low_open else '>='} {low} and <= {high}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, " | ".join(repr(c) for c in choices))


def _check_shape(name: str, value: Any, rank: int) -> None:
    if value is None:
        return
    if (not isinstance(value, (list, tuple)) or len(value) != rank
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        _fail(name, value, f"a list of {rank} positive integers")


@dataclass
class RunConfig:
    output_dir: str = "distill-run"
    seed: int = 0
    checkpoint_every: int = 500    # steps; a checkpoint is also written at each stage end and at a stop
    keep_checkpoints: int = 2      # older step-* folders are deleted
    log_every: int = 1             # JSONL log interval in steps
    resume: bool = True            # continue from the newest checkpoint in output_dir; false: refuse to reuse it
    device: str = "auto"           # "auto": cuda:LOCAL_RANK when CUDA is present, else cpu
    parallel: str = "ddp"          # under torchrun: "ddp" (replicated student) | "fsdp" (FSDP2-sharded)
    autocast: str = "none"         # "none" | "bfloat16" (torch.autocast around the forward passes)
    find_unused_parameters: bool = False  # DDP: set when the routed student skips blocks in training
    progress: bool = True          # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            _fail("output_dir", self.output_dir, "a non-empty path")
        _check_number("seed", self.seed, low=0, integer=True)
        _check_number("checkpoint_every", self.checkpoint_every, low=1, integer=True)
        _check_number("keep_checkpoints", self.keep_checkpoints, low=1, integer=True)
        _check_number("log_every", self.log_every, low=1, integer=True)
        _check_choice("parallel", self.parallel, ("ddp", "fsdp"))
        _check_choice("autocast", self.autocast, ("none", "bfloat16"))
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            _fail("device", self.device, "'auto' | 'cpu' | 'cuda' | 'cuda:N'")


@dataclass
class DataConfig:
    batch_size: int = 1                    # per process
    latent_shape: list[int] | None = None  # (C, F, H, W) of random clean latents x0 ~ N(0, I)
    text_shape: list[int] | None = None    # (L, D) of random text states ~ N(0, I)
    folder: str | None = None              # *.safetensors with `latents` (C,F,H,W) [+ `encoder_hidden_states` (L,D)]
    timestep_sampling: str = "uniform"     # s ~ U(0,1) | "logit_normal": s = sigmoid(N(0,1))
    shift: float = 1.0                     # flow shift: s ← shift·s / (1 + (shift−1)·s) (Wan uses 3-5)
    num_train_timesteps: int = 1000        # timestep = s · num_train_timesteps

    def __post_init__(self) -> None:
        _check_number("batch_size", self.batch_size, low=1, integer=True)
        _check_shape("latent_shape", self.latent_shape, 4)
        _check_shape("text_shape", self.text_shape, 2)
        if self.folder is None and self.latent_shape is None:
            _fail("latent_shape", None, "[C, F, H, W] when no data folder is given")
        if self.folder is not None and not isinstance(self.folder, str):
            _fail("folder", self.folder, "a path")
        _check_choice("timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal"))
        _check_number("shift", self.shift, low=0, low_open=True)
        _check_number("num_train_timesteps", self.num_train_timesteps, low=1, integer=True)


@dataclass
class Stage1Config:
    steps: int = 1000

    def __post_init__(self) -> None:
        _check_number("steps", self.steps, low=0, integer=True)


@dataclass
class Stage2Config:
    steps: int = 0
    target_exec_fraction: float = 0.5  # FLOPs-weighted fraction of routed blocks that should run

    def __post_init__(self) -> None:
        _check_number("steps", self.steps, low=0, integer=True)
        _check_number("target_exec_fraction", self.target_exec_fraction, low=0, low_open=True, high=1)


@dataclass
class LossConfig:
    output_weight: float = 1.0
    icd_weight: float = 0.1            # VDMini's best
    mca_weight: float = 1.0            # VDMini's best; 0 disables the discriminator entirely
    budget_weight: float = 1.0         # ours
    balance_weight: float = 0.1        # ours: anti-collapse term at the start of stage 2
    balance_decay_fraction: float = 0.5  # ... decaying linearly to 0 over this fraction of stage 2
    icd_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("output_weight", "icd_weight", "mca_weight", "budget_weight", "balance_weight"):
            _check_number(name, getattr(self, name), low=0)
        _check_number("balance_decay_fraction", self.balance_decay_fraction, low=0, low_open=True, high=1)
        _check_number("icd_eps", self.icd_eps, low=0, low_open=True)


@dataclass
class DiscriminatorConfig:
    hidden_dim: int = 128
    noise_embed_dim: int = 64
    judged_taps: list[int] | None = None  # indices into the pair's feature taps; None: all

    def __post_init__(self) -> None:
        _check_number("hidden_dim", self.hidden_dim, low=1, integer=True)
        _check_number("noise_embed_dim", self.noise_embed_dim, low=2, integer=True)
        if self.noise_embed_dim % 2:
            _fail("noise_embed_dim", self.noise_embed_dim, "an even integer >= 2")
        if self.judged_taps is not None and (
            not isinstance(self.judged_taps, list) or not self.judged_taps
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.judged_taps)
        ):
            _fail("judged_taps", self.judged_taps, "a non-empty list of tap indices >= 0, or absent for all")


@dataclass
class OptimizerConfig:
    """AdamW; lr(step) = lr · min(1, (step+1)/warmup_steps) · (1 or the cosine factor of the stage)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"        # "constant" | "cosine" (to 0 at the end of the stage)
    max_grad_norm: float | None = 1.0  # None: no clipping

    def __post_init__(self) -> None:
        _check_number("lr", self.lr, low=0, low_open=True)
        _check_number("weight_decay", self.weight_decay, low=0)
        if (not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas)):
            _fail("betas", self.betas, "two numbers in [0, 1)")
        self.betas = [float(b) for b in self.betas]
        _check_number("eps", self.eps, low=0, low_open=True)
        _check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        _check_choice("schedule", self.schedule, ("constant", "cosine"))
        if self.max_grad_norm is not None:
            _check_number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)


def _default_router_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-3)


def _default_discriminator_optimizer() -> OptimizerConfig:
    return OptimizerConfig(lr=1e-4, betas=[0.0, 0.99])


@dataclass
class OptimConfig:
    student: OptimizerConfig = field(default_factory=OptimizerConfig)
    router: OptimizerConfig = field(default_factory=_default_router_optimizer)
    discriminator: OptimizerConfig = field(default_factory=_default_discriminator_optimizer)


@dataclass
class DistillConfig:
    data: DataConfig
    run: RunConfig = field(default_factory=RunConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    loss: LossConfig = field(default_factory=LossConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    @property
    def total_steps(self) -> int:
        return self.stage1.steps + self.stage2.steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise GraphoptError(f"[{section}] must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise GraphoptError(f"[{section}] unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        nested = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if nested is not None and dataclasses.is_dataclass(nested()) and isinstance(value, dict):
            kwargs[name] = _build(type(nested()), value, f"{section}.{name}" if section else name)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except GraphoptError as error:
        raise GraphoptError(f"[{section}] {error}") from None


def config_from_dict(values: dict[str, Any]) -> DistillConfig:
    """Build and validate a DistillConfig from nested dicts shaped like the TOML file."""
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise GraphoptError(f"unknown table(s) {unknown}; allowed: {sorted(fields)}")
    if "data" not in values:
        raise GraphoptError("the [data] table is required: give latent_shape and text_shape, or a folder")
    kwargs = {"data": _build(DataConfig, values["data"], "data")}
    for f in dataclasses.fields(DistillConfig):
        if f.name in values and f.name != "data":
            kwargs[f.name] = _build(type(f.default_factory()), values[f.name], f.name)
    return DistillConfig(**kwargs)


def read_config(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file (tomllib), not yet validated."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise GraphoptError(f"distillation config {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise GraphoptError(f"distillation config {path} is not valid TOML: {error}") from None


def load_config(path: str | Path) -> DistillConfig:
    """Read a TOML file (tomllib) into a validated DistillConfig."""
    return config_from_dict(read_config(path))
