"""Residual reuse: the explicit state that lets a skipped block give back the residual it added the
last time it ran, instead of nothing.

A graph that reuses (`route` with `skip="reuse"` or `"forecast"`, the `cache` pass) reads and writes named cache
slots through one submodule, `gm.reuse_state` (a `ReuseState`), with three kinds of call node:

    valid = reuse_state("begin", timestep, latent)     # 0-dim bool: the slots hold this run's values
    r     = reuse_state("read", key, like)             # slot `key`, or zeros shaped like `like`
    _     = reuse_state("write", key, value)           # slot `key` := value (kept for the next call)

Eagerly the module holds the slots, one set per cache context (`with cache_context(model, name):`,
as diffusers' CacheMixin does, so CFG as two calls keeps two states). A new sampling run empties
them: `begin` sees it when the timestep is not below the previous call's, or the inputs' shapes,
dtype or device changed; `reset_cache(model)` does it explicitly. While `valid` is False every
reading graph computes every block (the first step of a run).

Exporters lift the state out of the graph (`lift_state`): every `read` becomes a graph input, every
`write` a graph output and `begin` the input `cache_valid`, so a runtime threads the slots from step
to step (ONNX: inputs and outputs of one file; the segmented runtime: tensors kept on the device).
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from graphopt.errors import GraphoptError
from graphopt.fxutil import tracing

STATE_MODULE = "reuse_state"
VALID_INPUT = "cache_valid"


class CacheContexts:
    """Cache slots, one set per cache context, and the rule that starts a new sampling run: the
    slots are emptied when the timestep is not below the previous call's, or the latent's shape,
    dtype or device changed. Shared by the eager module and the runtimes of exported models."""

    def __init__(self):
        self.contexts: dict[str, dict] = {}
        self.context = "default"

    def state(self) -> dict:
        return self.contexts.setdefault(self.context, {"slots": {}, "last": None})

    def begin(self, timestep: torch.Tensor, latent: torch.Tensor) -> dict:
        """This call's slots (empty at the start of a run)."""
        state = self.state()
        t = float(timestep.detach().float().mean())
        signature = (tuple(latent.shape), latent.dtype, latent.device)
        last = state["last"]
        if last is None or last[1] != signature or not t < last[0]:
            state["slots"] = {}
        state["last"] = (t, signature)
        return state["slots"]

    def reset(self) -> None:
        self.contexts.clear()


class ReuseState(nn.Module, CacheContexts):
    """Cache slots of a reusing graph, one set per cache context."""

    _is_impure = True           # its write calls have no users; dead-code elimination must keep them

    def __init__(self):
        nn.Module.__init__(self)
        CacheContexts.__init__(self)

    def __deepcopy__(self, memo):
        new = self.__class__()          # a copy of a model starts a fresh run
        memo[id(self)] = new
        return new

    _state = CacheContexts.state

    def forward(self, op: str, *args):
        if tracing(args[-1]):
            # Shape propagation and tracing see a pure function; exporters lift the state first.
            if op == "begin":
                return torch.zeros((), dtype=torch.bool, device=args[-1].device)
            return torch.zeros_like(args[-1]) if op == "read" else args[-1]
        if op == "begin":
            timestep, latent = args
            return torch.tensor(bool(self.begin(timestep, latent)), device=latent.device)
        slots = self.state()["slots"]
        if op == "read":
            key, like = args
            value = slots.get(key)
            return torch.zeros_like(like) if value is None else value
        if op == "write":
            key, value = args
            slots[key] = value.detach()
            return value
        raise GraphoptError(f"reuse_state has no operation '{op}'")


def state_module(gm: fx.GraphModule) -> ReuseState:
    """The graph's ReuseState, added on first use."""
    if not hasattr(gm, STATE_MODULE):
        gm.add_submodule(STATE_MODULE, ReuseState())
    return getattr(gm, STATE_MODULE)


def begin_node(graph) -> fx.Node:
    """The graph's `begin` call (one per graph, inserted before the first block on first use)."""
    gm, g = graph.gm, graph.gm.graph
    for n in g.nodes:
        if n.op == "call_module" and n.target == STATE_MODULE and n.args[0] == "begin":
            return n
    state_module(gm)
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
    names = (graph.timestep_input, graph.latent_input)
    missing = [name for name in names if name not in placeholders]
    if missing:
        raise GraphoptError(f"reuse needs the model inputs {missing} (a new sampling run is "
                            f"detected from them); the graph's inputs are {sorted(placeholders)}")
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        node = g.call_module(STATE_MODULE, ("begin", placeholders[names[0]],
                                            placeholders[names[1]]))
    node.meta["val"] = torch.empty((), dtype=torch.bool)
    return node


def read_node(g: fx.Graph, key: str, like: fx.Node) -> fx.Node:
    node = g.call_module(STATE_MODULE, ("read", key, like))
    node.meta["val"] = like.meta.get("val")
    return node


def write_node(g: fx.Graph, key: str, value: fx.Node) -> fx.Node:
    node = g.call_module(STATE_MODULE, ("write", key, value))
    node.meta["val"] = value.meta.get("val")
    return node


def slots(gm: fx.GraphModule) -> list[str]:
    """The cache slot keys a graph reads, in graph order."""
    return [n.args[1] for n in gm.graph.nodes
            if n.op == "call_module" and n.target == STATE_MODULE and n.args[0] == "read"]


def reuses(model) -> bool:
    gm = getattr(model, "gm", model)
    return isinstance(getattr(gm, STATE_MODULE, None), ReuseState)


def pick(pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where the 0-dim bool `pred` holds, else b: eagerly a Python branch (exact, no select
    work), under tracing `torch.where` (an ONNX Where)."""
    if tracing(pred):
        return torch.where(pred, a, b)
    return a if bool(pred) else b


def reset_cache(model) -> None:
    """Start a new sampling run: empty every cache context of `model` (a DiTGraph, a GraphModule,
    a GraphTransformer, or an exported ONNX / AOTInductor model that threads reuse state)."""
    for target in _holders(model):
        target.reset()


@contextlib.contextmanager
def cache_context(model, name: str):
    """Calls inside use the cache state named `name` (diffusers' CacheMixin.cache_context)."""
    holders = list(_holders(model))
    saved = [h.context for h in holders]
    for h in holders:
        h.context = name
    try:
        yield
    finally:
        for h, s in zip(holders, saved):
            h.context = s


def _holders(model):
    seen = set()
    for obj in (model, getattr(model, "gm", None), getattr(model, "graph", None),
                getattr(getattr(model, "graph", None), "gm", None)):
        if obj is None:
            continue
        for h in (obj, getattr(obj, STATE_MODULE, None), getattr(obj, "reuse", None)):
            if h is not None and id(h) not in seen and callable(getattr(h, "reset", None)) \
                    and hasattr(h, "context"):
                seen.add(id(h))
                yield h


def slot_examples(graph) -> dict[str, torch.Tensor]:
    """The cache slots after one eager call on the example inputs (their shapes and dtypes), for
    an exporter tracing the lifted graph."""
    reset_cache(graph)
    with torch.no_grad():
        graph(**graph.example_inputs)
    slots = dict(getattr(graph.gm, STATE_MODULE).state()["slots"])
    reset_cache(graph)
    return slots


def lift_state(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of `gm` whose cache state is explicit: `cache_valid` and one `cache_<key>` input per
    read slot come after the model's inputs, one `cache_<key>` output per written slot after its
    outputs (same keys, same order). Returns (the lifted module, the slot keys). It is called as
    `gm` is (the model's keyword arguments, flattened as the capture flattens them) with the state
    inputs as more keywords.

    The lifted graph is a plain function of its inputs, so torch.export traces it into a graph
    whose state an exporter can name (ONNX inputs/outputs); the eager module keeps the state."""
    import copy

    new = copy.deepcopy(gm)
    g = new.graph
    keys = slots(new)
    calls = [n for n in g.nodes if n.op == "call_module" and n.target == STATE_MODULE]
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    inputs = {}
    with g.inserting_after(last):
        for key in reversed(keys):
            inputs[key] = g.placeholder(f"cache_{key}")
        valid = g.placeholder(VALID_INPUT)
    valid.meta["val"] = torch.empty((), dtype=torch.bool)
    written = {}
    for n in calls:
        op = n.args[0]
        if op == "begin":
            n.replace_all_uses_with(valid)
        elif op == "read":
            inputs[n.args[1]].meta["val"] = n.meta.get("val")
            n.replace_all_uses_with(inputs[n.args[1]])
        else:
            written[n.args[1]] = n.args[2]
            n.replace_all_uses_with(n.args[2])
        g.erase_node(n)
    if sorted(written) != sorted(keys):
        raise GraphoptError(f"reuse state reads {sorted(keys)} but writes {sorted(written)}: "
                            f"this is a graphopt bug")
    output = next(n for n in g.nodes if n.op == "output")
    outs = output.args[0]
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    output.args = (outs + tuple(written[k] for k in keys),)
    delattr(new, STATE_MODULE)
    _extend_calling_convention(g, [VALID_INPUT] + [f"cache_{k}" for k in keys], len(keys))
    new.recompile()
    return new, keys


def _extend_calling_convention(g: fx.Graph, inputs: list[str], outputs: int) -> None:
    """A captured graph flattens its keyword arguments (a tuple argument becomes several inputs)
    and rebuilds its output tuple: give that convention `inputs` as more keywords (their
    placeholders come last) and `outputs` more outputs."""
    from torch.utils import _pytree as pytree

    info = getattr(g._codegen, "pytree_info", None)
    if info is None:
        return
    args, kwargs = pytree.tree_unflatten([0] * info.in_spec.num_leaves, info.in_spec)
    in_spec = pytree.tree_structure((args, {**kwargs, **{name: 0 for name in inputs}}))
    out_spec = pytree.tree_structure(tuple(range(info.out_spec.num_leaves + outputs)))
    g._codegen.pytree_info = info._replace(orig_args=[*info.orig_args, *inputs], in_spec=in_spec,
                                           out_spec=out_spec)
