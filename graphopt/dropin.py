"""A compressed model in place of `pipe.transformer`: the diffusers transformer call on any backend.

Diffusers' video pipelines call `transformer(hidden_states=..., timestep=..., encoder_hidden_states=...,
attention_kwargs=None, return_dict=False)[0]` inside `transformer.cache_context("cond"/"uncond")`, and
read `transformer.config` and `transformer.dtype`. What they read lives in one place,
`graphopt.exporters.runtime.TransformerFacade` (shared with the ONNX runtimes); the call itself —
keyword inputs checked and converted (`model_feeds`), one run, one `StepRecord` of the blocks that
ran — is `FacadeModel` here, so every backend that runs a whole graph in one call only says how to
run it:

- `GraphTransformer(graph)`: the compressed PyTorch module (a DiTGraph's GraphModule, eager);
- `graphopt.exporters.aoti.AOTIModel`: an AOTInductor package (`load_aoti`).

A routed block counts as executed when any sample of the batch needed it (its conditional ran).
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from graphopt.errors import GraphoptError
from graphopt.exporters.specs import TensorSpec
from graphopt.exporters.runtime import StepRecord, TransformerFacade, model_feeds
from graphopt.fxutil import DTYPE_NAMES, TORCH_DTYPES
from graphopt.records import RecentRecords

BATCH = "batch"


def input_specs(graph) -> tuple[TensorSpec, ...]:
    """The graph's tensor inputs in placeholder order; a symbolic batch axis is named BATCH."""
    examples = {k: v for k, v in graph.example_inputs.items() if isinstance(v, torch.Tensor)}
    specs = []
    for p in graph.placeholders():
        if p.name not in examples:
            continue
        specs.append(spec_of(p.name, p.meta.get("val", examples[p.name])))
    return tuple(specs)


def spec_of(name: str, val: torch.Tensor) -> TensorSpec:
    """The spec of graph input `name` with (fake) value `val`; a symbolic axis 0 is named BATCH."""
    shape = tuple(BATCH if isinstance(d, torch.SymInt) and i == 0 else int(d)
                  for i, d in enumerate(val.shape))
    if val.dtype not in DTYPE_NAMES:
        raise GraphoptError(f"model input '{name}' is {val.dtype}; graphopt's runtimes take "
                            f"{sorted(TORCH_DTYPES)}")
    return TensorSpec(name, DTYPE_NAMES[val.dtype], shape)


def state_input_names(slots: Sequence[str]) -> set[str]:
    """The inputs a lifted reuse state adds (graphopt.reuse.lift_state)."""
    from graphopt.reuse import VALID_INPUT

    return {VALID_INPUT, *(f"cache_{k}" for k in slots)}


def fixed_inputs(graph) -> dict[str, Any]:
    """The non-tensor arguments the graph was captured with (e.g. return_dict=False)."""
    return {k: v for k, v in graph.example_inputs.items() if not isinstance(v, torch.Tensor)}


class FacadeModel(TransformerFacade):
    """One call = one run of a whole graph. Subclasses set `device` and implement `_run`."""

    what = "model"

    def __init__(self, config: Mapping[str, Any], specs: Sequence[TensorSpec], blocks: Sequence[dict]):
        self._config = FrozenDict(config)
        self._input_specs = tuple(specs)
        self.blocks = [(b["block"], b["gate"], b.get("cached", False)) for b in blocks]
        self._context: str | None = None
        self.records = RecentRecords()
        self.reuse = self.state = None

    # -- residual reuse in a compiled model: the cache slots as inputs and outputs ------------------
    def thread_state(self, state: Mapping[str, Any] | None, specs: Sequence[TensorSpec]) -> None:
        """A model whose reuse state was lifted (graphopt.reuse.lift_state) threads its slots from
        call to call: inputs `cache_valid` and `cache_<slot>` (`specs`), one set per cache context,
        emptied at a new sampling run. `state`: {"slots", "timestep", "latent"} or None."""
        from graphopt.reuse import CacheContexts

        self.state = state
        self.state_specs = {spec.name: spec for spec in specs}
        self.reuse = CacheContexts() if state else None

    def state_feeds(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from graphopt.reuse import VALID_INPUT

        slots = self.reuse.begin(feeds[self.state["timestep"]], feeds[self.state["latent"]])
        batch = feeds[self.state["latent"]].shape[0]
        state = {VALID_INPUT: torch.tensor(bool(slots), device=self.device)}
        for k in self.state["slots"]:
            spec = self.state_specs[f"cache_{k}"]
            if slots:
                state[f"cache_{k}"] = slots[k]
            else:
                shape = tuple(batch if isinstance(d, str) else d for d in spec.shape)
                state[f"cache_{k}"] = torch.zeros(shape, dtype=TORCH_DTYPES[spec.dtype],
                                                  device=self.device)
        return state

    def keep_state(self, values: Sequence[torch.Tensor]) -> None:
        """The slots' next values (the lifted outputs, in slot order) for this context's next call."""
        self.reuse.state()["slots"] = dict(zip(self.state["slots"], values))

    def _run(self, feeds: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], np.ndarray | None,
                                                            bool | None]:
        """(model outputs, the router's hard gates [batch, n_routed] on the host or None, whether
        the cache pass's cached blocks computed or None)."""
        raise NotImplementedError

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        if args:
            raise GraphoptError(f"call the {self.what} with keyword arguments (hidden_states=..., "
                                f"timestep=..., encoder_hidden_states=...)")
        feeds = model_feeds(self._input_specs, BATCH, self.device, kwargs, self.what)
        start = time.perf_counter()
        with torch.no_grad():
            values, gates, computed = self._run(feeds)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        ran = gates.any(0) if gates is not None else None

        def runs(gate, cached):
            if cached:
                return computed is not False
            return gate is None or (ran is not None and bool(ran[gate]))

        executed = tuple(b for b, g, c in self.blocks if runs(g, c))
        skipped = tuple(b for b, g, c in self.blocks if not runs(g, c))
        self.records.append(StepRecord(self.records.total, self._context, executed, skipped, gates,
                                       seconds))
        return Transformer2DModelOutput(sample=values[0]) if return_dict else values


class GraphTransformer(FacadeModel):
    """A DiTGraph (captured, compressed: pruned, dropped, routed) run eagerly in PyTorch.

    Inputs have the capture's shapes (a dynamic-batch capture takes any batch). The router, if
    any, keeps its settings (budget, force_gates); its decisions are recorded (`router.record`
    is switched on) so each call's StepRecord says which blocks ran.
    """

    what = "compressed model"

    def __init__(self, graph):
        if graph.is_meta:
            raise GraphoptError("this graph has no weights (meta device): load the compressed folder "
                                "with graphopt.load, or stream the weights in first")
        from graphopt.router import block_table

        config = json.loads(json.dumps(dict(graph.config), default=lambda _: None))
        super().__init__(config, input_specs(graph), block_table(graph))
        self.graph = graph
        self.fixed = fixed_inputs(graph)
        self.device = next((p.device for p in graph.gm.parameters()), torch.device("cpu"))
        self.router = getattr(graph.gm, "router", None)
        if self.router is not None:
            self.router.record = True
        self._watch_cached_blocks()

    @contextlib.contextmanager
    def cache_context(self, name: str, **_: Any) -> Iterator[None]:
        """Labels the StepRecords made inside it and, for a graph that reuses residuals, gives
        the calls their own cache state (diffusers' CacheMixin.cache_context)."""
        from graphopt.reuse import cache_context

        with super().cache_context(name), cache_context(self.graph, name):
            yield

    def enable_cache(self, config) -> None:
        """diffusers' `enable_cache`, as a graph transform: a FirstBlockCacheConfig or
        MagCacheConfig becomes the `cache` pass with the same settings (MagCache's ratios, or with
        `calibrate=True` graphopt's own calibration over `num_inference_steps`)."""
        from graphopt.compress import compress

        from graphopt.router import block_table

        compress(self.graph, ["cache"], {"cache": cache_options(config)})
        self.blocks = [(b["block"], b["gate"], b["cached"]) for b in block_table(self.graph)]
        self._watch_cached_blocks()

    def _watch_cached_blocks(self) -> None:
        """A forward hook on the cache pass's run branch tells each call whether it computed."""
        from graphopt.router import units

        self._computed = None
        for unit in units(self.graph):
            if unit.cached:
                self._computed = False
                branch = getattr(self.graph.gm, unit.first.args[1].target)
                branch.register_forward_hook(lambda *_: setattr(self, "_computed", True))

    def _run(self, feeds):
        seen = self.router.history.total if self.router is not None else 0
        if self._computed is not None:
            self._computed = False
        out = self.graph.gm(**feeds, **self.fixed)
        values = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        gates = None
        if self.router is not None and self.router.history.total > seen:
            gates = self.router.history[-1]["gates"].numpy()
        return values, gates, self._computed


def cache_options(config) -> dict:
    """The cache pass's options for one of diffusers' cache configs."""
    kind = type(config).__name__
    if kind == "FirstBlockCacheConfig":
        return {"method": "first-block", "threshold": float(config.threshold)}
    if kind == "MagCacheConfig":
        ratios = None if config.calibrate or config.mag_ratios is None else \
            [float(r) for r in config.mag_ratios]
        return {"method": "mag", "threshold": float(config.threshold),
                "max_skip_steps": int(config.max_skip_steps),
                "retention_ratio": float(config.retention_ratio),
                "num_inference_steps": int(config.num_inference_steps), "mag_ratios": ratios}
    raise GraphoptError(f"enable_cache takes diffusers' FirstBlockCacheConfig or MagCacheConfig "
                        f"(compiled into the graph by the cache pass); got {kind}. Other caches "
                        f"are eager hooks: use them on the diffusers model itself")

