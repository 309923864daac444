"""Run the segmented layout: a host-side orchestrator over per-segment runners.

Per call (one denoising step, or one CFG half of it) `SegmentedModel`:
  1. runs the prologue;
  2. copies the gate mask [batch, n_routed] to the host once (the only device-to-host sync of the step);
  3. runs block k iff some sample needs it (gates[:, col_k].any(), or the block is not routed); for a
     sample whose gate is off the stream keeps its value: stream = where(gate, block(stream), stream),
     so each sample gets exactly what it would get alone (blocks act per sample);
  4. runs the epilogue and returns its outputs.
With residual reuse (manifest `reuse`) it also keeps the cache slots on the device, one set per cache
context (graphopt.reuse.CacheContexts: emptied at a new sampling run), and feeds the prologue their
validity: a reuse-routed block gives a skipped sample stream + the residual it added when it last ran;
the cache pass's cached blocks are decided once per step on the host (passes/cache.py `cache_step`).
It is called like a diffusers transformer (`model(hidden_states=..., timestep=...,
encoder_hidden_states=..., return_dict=False)[0]`), so it can replace `pipe.transformer`.

Runners share one small interface (`BlockRunner`: named torch tensors in, named torch tensors out, on
one device) and come from a `Backend` that loads all segments at once (so TensorRT engines can share
one activation buffer): `OrtBackend` (onnxruntime, `ort_runner.py`) and `TensorRTBackend`
(`tensorrt.py`).
"""

from __future__ import annotations

import contextlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from graphopt.errors import GraphoptError
from graphopt.fxutil import TORCH_DTYPES
from graphopt.records import RecentRecords
from graphopt.router import forecast_residual, residual_slope, sample_time
from graphopt.exporters.manifest import SegmentedManifest, next_name
from graphopt.exporters.specs import Segment, TensorSpec, check_call_inputs

# Keyword arguments diffusers pipelines pass that carry no tensor for the graph when empty.
_IGNORABLE_WHEN_EMPTY = ("attention_kwargs", "joint_attention_kwargs", "cross_attention_kwargs")


class BlockRunner(ABC):
    """One loaded segment on one device.

    `runner(inputs)` takes the segment's named inputs as torch tensors and returns its named outputs as
    torch tensors on `device`; inputs on another device or dtype are converted (a no-op when they already
    match). `calls` counts executions, so tests and profilers can see which segments ran.
    """

    def __init__(self, segment: Segment, device: torch.device | str):
        self.segment = segment
        self.device = torch.device(device)
        self.calls = 0

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.run(inputs)

    @abstractmethod
    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Execute the segment once."""

    def prepare(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The segment's inputs, contiguous, on this runner's device, in the declared dtypes."""
        ready = {}
        for spec in self.segment.inputs:
            if spec.name not in inputs:
                raise GraphoptError(f"segment '{self.segment.file}' needs input '{spec.name}', which was not given")
            tensor = inputs[spec.name]
            if len(tensor.shape) != len(spec.shape):
                raise GraphoptError(
                    f"segment '{self.segment.file}': input '{spec.name}' has shape {list(tensor.shape)}, "
                    f"expected rank {len(spec.shape)} {list(spec.shape)}"
                )
            ready[spec.name] = tensor.to(device=self.device, dtype=TORCH_DTYPES[spec.dtype]).contiguous()
        return ready


class Backend(Protocol):
    """Loads every segment of a manifest; returns runners in `manifest.segments` order."""

    def load(self, manifest: SegmentedManifest, device: torch.device) -> list[BlockRunner]: ...


@dataclass(frozen=True)
class StepRecord:
    """What one call did: blocks executed/skipped (block indices), the host gate mask, wall time.

    `seconds` covers prologue to epilogue; on CUDA the device is synchronized before the clock stops.
    `context` is the name given to `cache_context` by the pipeline ("cond"/"uncond"), if any.
    """

    step: int
    context: str | None
    executed: tuple[int, ...]
    skipped: tuple[int, ...]
    gates: np.ndarray | None
    seconds: float


class TransformerFacade:
    """What diffusers pipelines read from `pipe.transformer` (config, dtype, cache_context) and the
    per-call records, shared by the ONNX-backed models. Subclasses set `_config` (a FrozenDict),
    `_input_specs` (the model inputs), `_context` and `records`."""

    @property
    def config(self) -> Any:
        """The source transformer's config (attribute and key access), e.g. `config.in_channels`."""
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        """The dtype pipelines should cast latents to: that of `hidden_states` (else the first float input)."""
        specs = sorted(self._input_specs, key=lambda t: t.name != "hidden_states")
        for spec in specs:
            if spec.dtype.startswith(("float", "bfloat")):
                return TORCH_DTYPES[spec.dtype]
        return torch.float32

    @contextlib.contextmanager
    def cache_context(self, name: str, **_: Any) -> Iterator[None]:
        """diffusers' cache-hook entry point: labels the StepRecords made inside it and, for a model
        that reuses residuals (`self.reuse`, a CacheContexts), selects the cache state `name`."""
        caches = getattr(self, "reuse", None)
        previous, self._context = self._context, name
        saved = caches.context if caches is not None else None
        if caches is not None:
            caches.context = name
        try:
            yield
        finally:
            self._context = previous
            if caches is not None:
                caches.context = saved

    def reset_records(self) -> None:
        self.records.clear()


class SegmentedModel(TransformerFacade):
    """A segmented export behind a diffusers-transformer call signature.

    `force_gates`: None (the router decides), "all" (every block runs), or a bool mask of shape
    [n_routed] (same for every sample) or [batch, n_routed].
    """

    def __init__(
        self,
        manifest: SegmentedManifest | str,
        backend: Backend | None = None,
        device: torch.device | str = "cpu",
        force_gates: Any = None,
    ):
        if not isinstance(manifest, SegmentedManifest):
            manifest = SegmentedManifest.load(manifest)
        self.manifest = manifest
        self.device = torch.device(device)
        if backend is None:
            from graphopt.exporters.ort_runner import OrtBackend

            backend = OrtBackend()
        runners = backend.load(manifest, self.device)
        if len(runners) != len(manifest.segments):
            raise GraphoptError(f"backend returned {len(runners)} runners for {len(manifest.segments)} segments")
        self.prologue, *self.blocks, self.epilogue = runners
        self.records = RecentRecords()
        self._context: str | None = None
        self._force: np.ndarray | str | None = None
        self.force_gates = force_gates
        self._stream_specs = [manifest.stream_spec(s) for s in manifest.stream]
        self._config = FrozenDict(manifest.config)
        self._input_specs = manifest.inputs
        from graphopt.reuse import CacheContexts

        self.reuse = CacheContexts() if manifest.reuse is not None else None

    # -- gates -------------------------------------------------------------------------------------

    @property
    def force_gates(self) -> np.ndarray | str | None:
        return self._force

    @force_gates.setter
    def force_gates(self, value: Any) -> None:
        if value is None or (isinstance(value, str) and value == "all"):
            self._force = value
            return
        if isinstance(value, str):
            raise GraphoptError(f"force_gates must be None, 'all' or a bool mask, got {value!r}")
        n = self.manifest.n_routed
        if self.manifest.gates is None:
            raise GraphoptError("force_gates with a mask needs a routed model; this manifest has no gates")
        mask = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if mask.dtype != np.bool_ or mask.ndim not in (1, 2) or mask.shape[-1] != n:
            raise GraphoptError(
                f"force_gates mask must be bool of shape [{n}] or [batch, {n}], got {mask.dtype} {list(mask.shape)}"
            )
        self._force = mask

    def _host_gates(self, produced: Mapping[str, torch.Tensor], batch: int) -> np.ndarray | None:
        if self.manifest.gates is None:
            return None
        if isinstance(self._force, np.ndarray):
            mask = self._force
            if mask.ndim == 1:
                mask = np.broadcast_to(mask, (batch, self.manifest.n_routed))
            if mask.shape[0] != batch:
                raise GraphoptError(f"force_gates mask has {mask.shape[0]} rows but the batch has {batch} samples")
            return np.array(mask, dtype=bool)
        if self._force == "all":
            return np.ones((batch, self.manifest.n_routed), dtype=bool)
        # The step's single device-to-host copy.
        return produced[self.manifest.gates].to("cpu").numpy().astype(bool, copy=False)

    # -- the call ----------------------------------------------------------------------------------

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        if args:
            raise GraphoptError("call the segmented model with keyword arguments (hidden_states=..., timestep=...)")
        check_fixed_inputs(self.manifest.fixed_inputs, kwargs, "segmented model")
        feeds = model_feeds(self.manifest.inputs, self.manifest.batch_dim, self.device, kwargs, "segmented model")
        outputs = self.forward(feeds)
        values = tuple(outputs[spec.name] for spec in self.manifest.outputs)
        if return_dict:
            return Transformer2DModelOutput(sample=values[0])
        return values

    def forward(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one step on the model inputs (named as in the manifest); returns the named model outputs."""
        start = time.perf_counter()
        env: dict[str, torch.Tensor] = dict(feeds)
        slots = None
        if self.reuse is not None:
            names = self.manifest.reuse
            slots = self.reuse.begin(feeds[names["timestep"]], feeds[names["latent"]])
            env[names["valid"]] = torch.tensor(bool(slots), device=self.device)
        valid = bool(slots)
        env.update(self.prologue(env))
        batch = int(env[self.manifest.stream[0]].shape[0])
        gates = self._host_gates(env, batch)
        if self.reuse is not None and not valid and gates is not None:
            gates = np.ones_like(gates)     # nothing cached yet: every block runs, as in the graph
        executed, skipped = [], []
        before: dict[str, torch.Tensor] = {}        # the streams entering the last block that ran
        for runner in self.blocks:
            segment = runner.segment
            entry = segment.reuse or {}
            if "cache" in entry:
                ran = self._cached_blocks(runner, entry["cache"], env, before, slots, valid)
                (executed if ran else skipped).append(segment.block)
                continue
            reused = {s: k for s, k in entry.get("slots", {}).items() if k is not None}
            cached = {s: slots.get(k, torch.zeros_like(env[s])) for s, k in reused.items()}
            forecast = self._forecast(entry.get("forecast"), feeds, slots, cached) if reused else None
            given = cached
            sample_mask = None
            if segment.routed:
                column = gates[:, segment.gate]
                if forecast and not column.all():   # some sample skips: what it gets back
                    given = {s: forecast_residual(cached[s], forecast["slopes"][s], forecast["elapsed"], 1)
                             for s in cached}
                if not column.any():
                    skipped.append(segment.block)
                    for s in reused:
                        env[s] = env[s] + given[s]
                    continue
                if not column.all():
                    sample_mask = torch.from_numpy(np.ascontiguousarray(column)).to(self.device)
            before = {spec.name: env[spec.name] for spec in self._stream_specs}
            out = runner(env)
            for spec in self._stream_specs:
                name = spec.name
                new = out[next_name(name)]
                residual = new - env[name] if name in reused else None
                slope = None
                if residual is not None and forecast:
                    slope = residual_slope(residual, cached[name], forecast["elapsed"], 1, torch.tensor(valid))
                if sample_mask is not None:
                    keep = sample_mask.view((batch,) + (1,) * (new.dim() - 1))
                    fallback = env[name] + given[name] if name in reused else env[name]
                    new = torch.where(keep, new, fallback)
                    if residual is not None:
                        residual = torch.where(keep, residual, cached[name])
                    if slope is not None:
                        slope = torch.where(keep, slope, forecast["slopes"][name])
                if residual is not None:
                    slots[reused[name]] = residual
                if slope is not None:
                    slots[entry["forecast"]["slopes"][name]] = slope
                env[name] = new
            if forecast:
                now = forecast["now"] if sample_mask is None else torch.where(sample_mask, forecast["now"],
                                                                              forecast["then"])
                slots[entry["forecast"]["time"]] = now
            executed.append(segment.block)
        outputs = self.epilogue(env)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.records.append(
            StepRecord(
                step=self.records.total,
                context=self._context,
                executed=tuple(executed),
                skipped=tuple(skipped),
                gates=gates,
                seconds=time.perf_counter() - start,
            )
        )
        return outputs

    def _forecast(self, entry: Mapping[str, Any] | None, feeds: Mapping[str, torch.Tensor],
                  slots: dict, cached: Mapping[str, torch.Tensor]) -> dict | None:
        """A forecasting block's (route skip="forecast") view of its slots: the per-sample timestep now and
        at its last computation, the time between, and each stream's slope."""
        if entry is None:
            return None
        names = self.manifest.reuse
        now = sample_time(feeds[names["timestep"]], feeds[names["latent"]]).to(self.device)
        then = slots.get(entry["time"], torch.zeros_like(now))
        elapsed = now - then
        slopes = {s: slots.get(k, torch.zeros_like(cached[s])) for s, k in entry["slopes"].items()}
        return {"now": now, "then": then, "elapsed": elapsed, "slopes": slopes}

    def _cached_blocks(self, runner: BlockRunner, rule: Mapping[str, Any], env: dict[str, torch.Tensor],
                       before: Mapping[str, torch.Tensor], slots: dict, valid: bool) -> bool:
        """The cache pass's run of cached blocks: compute them or give back their cached residual
        (updates `env` and `slots`); returns whether they computed."""
        from graphopt.passes.cache import cache_step

        names = list(rule["streams"])
        computed: dict[str, torch.Tensor] = {}

        def run(_streams):
            out = runner(env)
            computed.update({s.name: out[next_name(s.name)] for s in self._stream_specs})
            return [computed[s] for s in names]

        first = (before[names[0]], env[names[0]]) if rule["method"] == "first-block" else None
        finals = cache_step(rule, slots, valid, [env[s] for s in names], first, run)
        env.update(computed)            # streams the cached blocks pass through unchanged
        env.update(zip(names, finals))
        return bool(computed)

    def runner_calls(self) -> dict[str, int]:
        """How many times each segment ran since loading, keyed by its file stem."""
        return {r.segment.label: r.calls for r in (self.prologue, *self.blocks, self.epilogue)}


def check_fixed_inputs(fixed: Mapping[str, Any], kwargs: dict[str, Any], what: str) -> None:
    """Remove from `kwargs` the non-tensor arguments the export baked in (`fixed`, JSON values),
    refusing a call that passes another value."""
    for name, value in fixed.items():
        given = kwargs.pop(name, None)
        if given is not None and json.loads(json.dumps(given, default=list)) != value:
            raise GraphoptError(f"this {what} was exported for {name}={value}, the call passes {given!r}: "
                                "re-export at this size")


def model_feeds(
    specs: Sequence[TensorSpec], batch_dim: str, device: torch.device, kwargs: Mapping[str, Any], what: str
) -> dict[str, torch.Tensor]:
    """A diffusers-style call's keyword arguments as the graph's named inputs, checked against `specs`,
    on `device` in the declared dtypes (a 0-d timestep is expanded to the batch). `what` names the
    model in errors."""
    check_call_inputs(specs, batch_dim, kwargs, what)
    tensors = {}
    for spec in specs:
        if kwargs.get(spec.name) is None:
            raise GraphoptError(
                f"the {what} needs '{spec.name}' ({spec.describe()}); the call did not pass it"
            )
        tensors[spec.name] = torch.as_tensor(kwargs[spec.name])
    batched = [s for s in specs if s.shape[:1] == (batch_dim,)]
    batch = next((int(tensors[s.name].shape[0]) for s in batched if tensors[s.name].dim() == len(s.shape)), None)
    feeds: dict[str, torch.Tensor] = {}
    for spec in specs:
        tensor = tensors[spec.name]
        if tensor.dim() == 0 and spec.shape == (batch_dim,) and batch is not None:
            # Pipelines may pass one timestep for the whole batch; the graph wants one per sample.
            tensor = tensor.expand(batch)
        if tensor.dim() != len(spec.shape) or any(
            isinstance(d, int) and d != s for d, s in zip(spec.shape, tensor.shape)
        ):
            raise GraphoptError(
                f"'{spec.name}' has shape {list(tensor.shape)}, but the export expects {list(spec.shape)}; "
                "re-export for this resolution/frame count or pass inputs of the exported shape"
            )
        feeds[spec.name] = tensor.to(device=device, dtype=TORCH_DTYPES[spec.dtype])
    known = {spec.name for spec in specs}
    extra = sorted(
        k for k, v in kwargs.items()
        if k not in known and v is not None and not (k in _IGNORABLE_WHEN_EMPTY and not v)
    )
    if extra:
        raise GraphoptError(
            f"the {what} has no input for {extra}; its inputs are "
            f"{[s.name for s in specs]} (re-export with these arguments, or drop them)"
        )
    return feeds


def run_all_segments(
    runners: Sequence[BlockRunner], manifest: SegmentedManifest, feeds: Mapping[str, torch.Tensor]
) -> list[tuple[BlockRunner, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Chain every segment with every block executed; returns (runner, inputs, outputs) per segment.

    Used by parity checks: each segment's inputs are the reference chain's values.
    """
    env: dict[str, torch.Tensor] = dict(feeds)
    trace = []
    for runner in runners:
        seg_inputs = {spec.name: env[spec.name] for spec in runner.segment.inputs}
        out = runner(seg_inputs)
        trace.append((runner, seg_inputs, out))
        if runner.segment.kind == "block":
            env.update({s: out[next_name(s)] for s in manifest.stream})
        else:
            env.update(out)
    return trace
