"""Diffusers' own caches (FirstBlockCache, MagCache, PyramidAttentionBroadcast, FasterCache,
TaylorSeer, …) on an eager diffusers transformer, callable as `graphopt.tiny.sample` calls a model:
the baselines a compressed graph is measured against.

    cached = CachedTransformer(model, FirstBlockCacheConfig(threshold=0.2))
    with cached:                               # model.enable_cache(config) … model.disable_cache()
        clips = sample(cached, cond, num_steps=10)

What the wrapper adds to the bare `model.enable_cache(config)`, and why:
- every call runs inside `model.cache_context(CONTEXT, step_index=…, num_inference_steps=…,
  timestep=…)`: the stateful hooks keep their state per context name and refuse to run without
  one. Diffusers' pipelines call cond and uncond separately, in contexts "cond" and "uncond"; the
  sampler calls the transformer once per step with the CFG pair batched (2B rows, unconditional
  first), so here there is ONE context and one cache state for both halves: a skip decision
  (FirstBlockCache's, MagCache's) is taken for the whole batch. FasterCache is the exception by
  design: it expects exactly that batched (uncond, cond) call and may drop the uncond half.
- a config with a `current_timestep_callback` field left None (PyramidAttentionBroadcast,
  FasterCache need one) gets a callback returning the timestep of the call being made (a pipeline
  passes `lambda: pipe.current_timestep`; the sampler has no pipeline).
- entering enables a fresh cache (no state from a previous sampling run), leaving disables it.

`calibrate_mag_cache` runs MagCache's own calibration mode over one sampling run and returns the
per-step magnitude ratios it prints (MagCacheConfig(mag_ratios=...) takes them).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
from collections.abc import Callable

import torch

from graphopt.errors import GraphoptError

CONTEXT = "cfg_batch"
_ABSENT = object()
_MAG_CACHE_BANNER = "[MagCache] Calibration Complete"


class CachedTransformer:
    """`model` (a diffusers ModelMixin with CacheMixin) with the cache `config` while entered; see
    the module docstring. `steps` is the number of calls of one sampling run (the step index a call
    reports is its count modulo `steps`)."""

    def __init__(self, model: torch.nn.Module, config, steps: int | None = None):
        if not hasattr(model, "enable_cache"):
            raise GraphoptError(f"{type(model).__name__} has no enable_cache: diffusers' caches need a diffusers "
                                "model (CacheMixin), not a captured graph")
        if steps is None:
            steps = getattr(config, "num_inference_steps", None)
        self.model, self.steps = model, steps
        if getattr(config, "current_timestep_callback", _ABSENT) is None:
            config = dataclasses.replace(config, current_timestep_callback=self.current_timestep)
        self.config = config
        self.calls = 0
        self._timestep: float | None = None
        self._entered = False

    def current_timestep(self) -> float:
        if self._timestep is None:
            raise GraphoptError("a cache asked for the current timestep outside a call of the model")
        return self._timestep

    def __enter__(self):
        if self.model.is_cache_enabled:
            raise GraphoptError(f"{type(self.model).__name__} already has a cache enabled "
                                f"({type(self.model._cache_config).__name__}): leave that CachedTransformer first")
        self.model.enable_cache(self.config)
        self.calls, self._entered = 0, True
        return self

    def __exit__(self, *exc):
        self.model.disable_cache()
        self._entered = False
        return False

    def __call__(self, **kwargs):
        if not self._entered:
            raise GraphoptError("call a CachedTransformer inside `with cached:` (that enables the cache)")
        timestep = kwargs["timestep"]
        self._timestep = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        index = self.calls % self.steps if self.steps else self.calls
        try:
            with self.model.cache_context(CONTEXT, step_index=index, num_inference_steps=self.steps,
                                          timestep=self._timestep):
                return self.model(**kwargs)
        finally:
            self.calls += 1
            self._timestep = None


def calibrate_mag_cache(model: torch.nn.Module, run: Callable[[Callable], object], steps: int) -> list[float]:
    """MagCache's per-step ratios for `model`: `run(transformer)` must make one sampling run of
    `steps` calls with the transformer it is given. MagCache(calibrate=True) skips nothing and prints
    the ratios at the end of the run (then resets); they are read from that print."""
    from diffusers import MagCacheConfig

    printed = io.StringIO()
    with CachedTransformer(model, MagCacheConfig(calibrate=True, num_inference_steps=steps)) as cached, \
            contextlib.redirect_stdout(printed):
        run(cached)
    if cached.calls != steps:
        raise GraphoptError(f"the calibration run called the transformer {cached.calls} times: MagCache calibrates "
                            f"per step, so it must be one sampling run of {steps} steps with one call per step")
    lines = printed.getvalue().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(_MAG_CACHE_BANNER))
        ratios = ast.literal_eval(next(line for line in lines[start + 1:] if line.strip()))
    except (StopIteration, ValueError, SyntaxError):
        raise GraphoptError(f"MagCache's calibration printed no ratios after {steps} calls: did diffusers change "
                            "its calibration output?") from None
    return [float(r) for r in ratios]
