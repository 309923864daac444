"""DiTGraph: a captured DiT (torch.fx GraphModule in ATen IR) plus the structure found on it.

Structure is discovered from the graph, not from model classes:
- blocks are the root-level `ModuleList` children (`<list>.<i>` in `nn_module_stack`) that contain
  attention, in execution order; a block's residual stream is the set of its outputs, each paired
  with the block input of the same shape that reaches it by the shortest path (the skip path);
- attentions are `scaled_dot_product_attention` nodes; their projections, norms and head layout
  come from `headflow.trace`;
- FFNs are linear pairs joined by elementwise ops only (up → activation → down);
- the timestep embedding is the last tensor before the first block computed from the timestep
  input and not from the video latent.
"""
from __future__ import annotations

import copy
import operator
import re
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt import headflow
from graphopt.errors import GraphoptError
from graphopt.fxutil import module_path, shape

aten = torch.ops.aten
_BLOCK_PATH = re.compile(r"^([^.]+)\.(\d+)$")


@dataclass
class Attention:
    name: str                       # module path, e.g. "blocks.0.attn1"
    block: int | None               # index into DiTGraph.blocks, None outside blocks
    kind: str                       # "self", "cross" or "joint" (video and text tokens together)
    heads: int
    head_dim: int
    sdpa: str                       # node name
    q_tokens: int
    kv_tokens: int
    producers: list[str]            # weight parameter paths of q/k/v projections
    consumers: list[str]            # weight parameter paths of output projections
    norms: list[str]                # norm weight paths whose statistic spans heads
    prunable: bool = True
    why_not: str = ""


@dataclass
class FFN:
    name: str                       # module path of the up projection's parent
    block: int | None
    up: str                         # weight parameter path
    down: str
    hidden: int


@dataclass
class Block:
    index: int
    name: str                       # module path, e.g. "blocks.3"
    nodes: list[str]
    stream_in: list[str]            # node names, paired with stream_out by position
    stream_out: list[str]
    side_inputs: list[str]          # other tensors the block reads (temb, rotary tables, text states)
    attentions: list[str] = field(default_factory=list)
    ffns: list[str] = field(default_factory=list)


def _block_of(node: fx.Node) -> str | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if _BLOCK_PATH.match(path):
            return path
    return None


class DiTGraph:
    """The IR every pass reads and rewrites.

    `gm` is an unlifted GraphModule (parameters as attributes under their original names, so state
    dict keys match the diffusers checkpoint). `example_inputs` are the forward kwargs it was
    captured with. Analyses are cached in `analyses` and dropped whenever the graph changes.
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: dict, *, family=None, config=None,
                 spec=None, token_layout=None, source: str = ""):
        self.gm = gm
        self.example_inputs = example_inputs
        self.family = family
        self.config = dict(config or {})
        self.spec = spec
        self.token_layout = token_layout
        self.source = source
        from graphopt.recipe import Recipe
        self.recipe = Recipe.new(self)
        self.analyses: dict[tuple, object] = {}
        self.reports: dict[str, object] = {}   # analysis results kept for reports across changes
        self.refresh(propagate=False)

    # ---- running -----------------------------------------------------------------------------
    def __call__(self, **inputs):
        return self.gm(**inputs)

    @property
    def timestep_input(self) -> str:
        """Name of the model input that carries the denoising timestep."""
        return self.family.timestep_input if self.family is not None else "timestep"

    @property
    def latent_input(self) -> str:
        """Name of the model input that carries the noisy video latent."""
        return self.family.latent_input if self.family is not None else "hidden_states"

    @property
    def is_meta(self) -> bool:
        return any(p.is_meta for p in self.gm.parameters())

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def flat_inputs(self, inputs: dict) -> list:
        """Inputs in placeholder order, flattened the way the captured forward flattens them."""
        from torch.fx._pytree import tree_flatten_spec

        missing = sorted(set(self.example_inputs) - set(inputs))
        if missing:
            raise GraphoptError(f"missing model inputs {missing}; the model was captured with "
                                f"{sorted(self.example_inputs)}")
        return tree_flatten_spec(((), inputs), self.gm._in_spec)

    # ---- keeping structure in sync with the graph --------------------------------------------
    def refresh(self, propagate: bool = True):
        """Re-derive shapes (fake tensors) and structure after the graph changed."""
        self.gm.graph.lint()
        self.gm.recompile()
        if propagate:
            self._propagate_shapes()
        self.analyses.clear()
        self._discover()

    def _propagate_shapes(self):
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
        flat = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                for v in self.flat_inputs(self.example_inputs)]
        with mode:
            FakeTensorProp(self.gm, mode).propagate_dont_convert_inputs(*flat)

    def _discover(self):
        nodes = list(self.gm.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        by_block: dict[str, list[fx.Node]] = {}
        sdpas = [n for n in nodes if n.op == "call_function" and n.target in headflow.SDPA]
        attn_blocks = {_block_of(n) for n in sdpas} - {None}
        for n in nodes:
            b = _block_of(n) if n.op == "call_function" else None
            if b in attn_blocks:
                by_block.setdefault(b, []).append(n)
        self.blocks = []
        for i, (name, members) in enumerate(sorted(by_block.items(), key=lambda kv: order[kv[1][0]])):
            self.blocks.append(self._make_block(i, name, members, order))
        block_index = {b.name: b.index for b in self.blocks}

        self.attentions: dict[str, Attention] = {}
        self.flows: dict[str, headflow.HeadFlow] = {}
        for s in sdpas:
            att = self._make_attention(s, block_index)
            self.attentions[att.name] = att
            if att.block is not None:
                self.blocks[att.block].attentions.append(att.name)
        self.ffns = self._find_ffns(block_index)
        for f in self.ffns.values():
            if f.block is not None:
                self.blocks[f.block].ffns.append(f.name)
        self.timestep_embedding = self._find_timestep_embedding(order)

    def _make_block(self, index, name, members, order) -> Block:
        members = _hoist_side_roots(members)
        inside = set(members)
        inputs, outputs = [], []
        for n in members:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and a not in inputs:
                    inputs.append(a)
            if any(u not in inside for u in n.users):
                outputs.append(n)
        tensor_inputs = [a for a in inputs if shape(a) is not None]
        unpaired = [o for o in outputs if not any(shape(a) == shape(o) for a in tensor_inputs)]
        if unpaired:
            # Outputs with no same-shape input are side values the block computes for later
            # blocks too (e.g. an attention mask prepared once): hoist their stream-free ancestry.
            streamy = _descendants_within({a for a in tensor_inputs
                                           if any(shape(a) == shape(o) for o in outputs)}, inside)
            hoist = set()
            for o in unpaired:
                anc = _ancestors_within(o, inside)
                if not anc & streamy:
                    hoist |= anc
            if hoist:
                return self._make_block(index, name, [n for n in members if n not in hoist], order)
        stream_in = []
        for o in outputs:
            candidates = [a for a in tensor_inputs if shape(a) == shape(o) and a not in stream_in]
            if not candidates:
                raise GraphoptError(
                    f"block '{name}' output '{o.name}' {shape(o)} has no input of the same shape: "
                    f"it is not a residual block, so it cannot be dropped or routed")
            stream_in.append(min(candidates, key=lambda a: _distance(a, o, inside)))
        side = [a for a in inputs if a not in stream_in]
        return Block(index, name, [n.name for n in members], [a.name for a in stream_in],
                     [o.name for o in outputs], [a.name for a in side])

    def _make_attention(self, sdpa: fx.Node, block_index) -> Attention:
        name = module_path(sdpa)
        block = block_index.get(_block_of(sdpa))
        q, k = sdpa.args[0], sdpa.args[1]
        heads, head_dim = shape(q)[1], shape(q)[-1]
        common = dict(name=name, block=block, heads=heads, head_dim=head_dim, sdpa=sdpa.name,
                      q_tokens=shape(q)[2], kv_tokens=shape(k)[2])
        try:
            flow = headflow.trace(self.gm, sdpa)
        except GraphoptError as e:
            return Attention(kind="self" if shape(q)[2] == shape(k)[2] else "cross",
                             producers=[], consumers=[], norms=[], prunable=False,
                             why_not=str(e), **common)
        self.flows[name] = flow
        q_prod = _producers_of(q, flow)
        k_prod = _producers_of(k, flow)
        if len(q_prod) > 1:
            kind = "joint"
        elif {p.args[0] for p in q_prod} == {p.args[0] for p in k_prod}:
            kind = "self"
        else:
            kind = "cross"
        return Attention(kind=kind, producers=[p.args[1].target for p, _ in flow.producers],
                         consumers=[c.args[1].target for c, _ in flow.consumers],
                         norms=[n.args[2].target for n, _ in flow.norms
                                if isinstance(n.args[2], fx.Node)],
                         prunable=heads > 1, why_not="" if heads > 1 else "a single head", **common)

    def _find_ffns(self, block_index) -> dict[str, FFN]:
        claimed = {p for f in self.flows.values() for p, _ in f.producers + f.consumers}
        ffns = {}
        for up in self.gm.graph.nodes:
            if up.target not in headflow.LINEAR or up in claimed:
                continue
            down = _elementwise_reach(up)
            if down is None or down in claimed:
                continue
            d_in, hidden, d_out = shape(up.args[0])[-1], shape(up)[-1], shape(down)[-1]
            if hidden <= d_in or d_out != d_in:
                continue
            name = module_path(up).rsplit(".", 2)[0] if "." in module_path(up) else module_path(up)
            ffns[name] = FFN(name, block_index.get(_block_of(up)), up.args[1].target,
                             down.args[1].target, shape(down.args[0])[-1])
        return ffns

    def _find_timestep_embedding(self, order) -> str | None:
        phs = {p.name: p for p in self.placeholders()}
        t_name = self.timestep_input
        if t_name not in phs or not self.blocks:
            return None
        latent = self.latent_input
        from_t, from_x = _descendants(phs[t_name]), _descendants(phs.get(latent))
        first = min(order[n] for n in self._nodes(self.blocks[0].nodes))
        best = None
        for n in self.gm.graph.nodes:
            if order[n] >= first:
                break
            sh = shape(n)
            if n in from_t and n not in from_x and sh is not None and len(sh) == 2 \
                    and n.meta["val"].is_floating_point():
                best = n
        # Some families (DiT) embed the timestep inside each block: route on the raw timestep.
        return best.name if best is not None else t_name

    def analysis(self, name: str, **options):
        """The cached result of analysis pass `name` (run once per graph version and options)."""
        from graphopt.pass_manager import get_analysis

        key = (name, _frozen(options))
        if key not in self.analyses:
            self.analyses[key] = self.reports[name] = get_analysis(name)(**options).run(self)
        return self.analyses[key]

    # ---- helpers -----------------------------------------------------------------------------
    def node(self, name: str) -> fx.Node:
        for n in self.gm.graph.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def _nodes(self, names) -> list[fx.Node]:
        wanted = set(names)
        return [n for n in self.gm.graph.nodes if n.name in wanted]

    def param(self, path: str) -> torch.Tensor:
        return self.gm.get_parameter(path) if _is_param(self.gm, path) else self.gm.get_buffer(path)

    def set_param(self, path: str, value: torch.Tensor):
        parent, _, leaf = path.rpartition(".")
        mod = self.gm.get_submodule(parent) if parent else self.gm
        old = getattr(mod, leaf)
        if isinstance(old, torch.nn.Parameter):
            setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            mod.register_buffer(leaf, value)

    def copy(self) -> "DiTGraph":
        new = copy.copy(self)
        new.gm = copy.deepcopy(self.gm)
        new.recipe = self.recipe.copy()
        new.analyses = {}
        new.reports = dict(self.reports)
        new.refresh(propagate=False)
        return new


def _is_param(gm, path):
    try:
        gm.get_parameter(path)
        return True
    except AttributeError:
        return False


def _hoist_side_roots(members: list[fx.Node]) -> list[fx.Node]:
    """Drop from a block the nodes that read only outside values and are also used outside.

    torch.export reuses such nodes across blocks (e.g. a no-op `temb.float()` first met in block
    0 serves every later block); they are shared side computations, not the block's own work.
    """
    inside = set(members)
    changed = True
    while changed:
        changed = False
        for n in list(inside):
            ins = [a for a in n.all_input_nodes if a.op != "get_attr"]
            if all(a not in inside for a in ins) and any(u not in inside for u in n.users):
                inside.discard(n)
                changed = True
    return [n for n in members if n in inside]


def _ancestors_within(node: fx.Node, inside: set) -> set:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in inside and n not in out:
            out.add(n)
            todo.extend(n.all_input_nodes)
    return out


def _descendants_within(roots, inside: set) -> set:
    out, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in inside and u not in out:
                out.add(u)
                todo.append(u)
    return out


def _distance(src: fx.Node, dst: fx.Node, inside: set) -> int:
    """Shortest forward path length from src to dst through nodes of the block."""
    seen, todo = {src: 0}, deque([src])
    while todo:
        n = todo.popleft()
        if n is dst:
            return seen[n]
        for u in n.users:
            if (u in inside) and u not in seen:
                seen[u] = seen[n] + 1
                todo.append(u)
    return 1 << 30


def _descendants(node) -> set:
    if node is None:
        return set()
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in out:
                out.add(u)
                todo.append(u)
    return out


def _producers_of(node: fx.Node, flow) -> list:
    prods = {p for p, _ in flow.producers}
    found, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n in prods:
            found.append(n)
            continue
        todo.extend(n.all_input_nodes)
    return found


def _elementwise_reach(up: fx.Node) -> fx.Node | None:
    """The single linear that `up`'s output reaches through elementwise ops only, if any."""
    frontier, linears, seen = [up], set(), set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.target in headflow.LINEAR:
                linears.add(u)
            elif u.target in headflow.ELEMENTWISE or u.target in _GATED_SPLITS:
                frontier.append(u)
            else:
                return None
    return linears.pop() if len(linears) == 1 else None


_GATED_SPLITS = {aten.chunk.default, aten.split.Tensor, operator.getitem}


def _frozen(value):
    """A hashable stand-in for analysis options (dicts and lists nested in them included)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value
