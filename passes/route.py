"""route: dynamic depth (PARE) — a router picks, per sample and step, which blocks run.

Graph shape after the pass (j = a routable block, p = its position among the routable blocks):

    gates, run = router(timestep, latent, temb, stream)       # call_module gm.router
    pred_j     = run[p]                                        # 0-dim bool: any sample needs j
    outs_j     = cond_block(pred_j, gm.route_run_j, gm.route_skip_j, operands_j)   # torch.cond
    stream'_j  = gate_stream(gates, p, rows, outs_j[k], stream_in_j[k])   # per-sample select

operands_j = the block's stream inputs, its side inputs (timestep projection, rotary tables, text
states), its weights (get_attr in the parent, so state-dict keys stay the checkpoint's) and, for
dynamic-batch graphs, the tensors its symbolic sizes are read from. `route_run_j` is the block's
own nodes moved into a sub-GraphModule; `route_skip_j` returns clones of the stream inputs (cond
refuses outputs that alias inputs). Operands and get_attr'd branch modules are how torch.export
itself writes torch.cond in an unlifted module; `cond_block` is that higher-order op whenever the
module is traced (torch.export(strict=False) → a real cond → ONNX `If`) and a plain Python branch
when it runs eagerly (the op's autograd rule would re-trace both branches on every call). A
skipped block costs one clone.

Guarantee: with every gate forced on (`router.force_gates = True`) the routed graph equals the
original; a sample whose gate is off gets its stream back unchanged from that block.
Recorded decisions: routable blocks, router mode/shape/budget/temperature, the init policy and the
static ranking the router starts from; the router's weights are parameters (saved with the model).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from graphopt.cost import model_cost
from graphopt.errors import GraphoptError
from graphopt.pass_manager import Pass, register, rel_error
from graphopt.passes.block_importance import POLICIES, rank_blocks
from graphopt.passes.drop import _refuse_routed
from graphopt.router import MODES, Router, cond_block, gate_stream, init_logits

aten = torch.ops.aten
_INT_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, operator.add,
            operator.sub, operator.mul, operator.floordiv, operator.mod, operator.neg,
            operator.truediv, torch.sym_int, torch.sym_max, torch.sym_min, torch.sym_float}
_MAY_RETURN_INPUT = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other,
                     aten.contiguous.default, aten.type_as.default, aten.flatten.using_ints}


@dataclass
class RouteOptions:
    mode: str = "mlp"                  # "mlp" (timestep + content) or "schedule" (timestep only)
    budget: float = 0.5                # executed FLOPs fraction at inference (and the init's)
    hidden: int = 64                   # mlp width
    blocks: tuple[int, ...] | None = None   # routable block indices; None = every block
    init_policy: str = "hierarchical"  # static ranking the router starts from
    protect_deep: float = 0.5
    timestep_bins: int = 10            # schedule mode
    timestep_max: float = 1000.0       # the timestep range [0, timestep_max) the bins cover
    tau: float = 1.0                   # Gumbel-sigmoid temperature in training
    # The static ranking the router starts from (routable block indices, most important first),
    # given: no block importance is computed, so this is how a meta-device graph is routed.
    ranking: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise GraphoptError(f"route mode '{self.mode}' unknown; choose one of {MODES}")
        if not 0.0 < self.budget <= 1.0:
            raise GraphoptError(f"route budget is a FLOPs fraction in (0, 1], got {self.budget}")
        if self.hidden < 1:
            raise GraphoptError(f"route hidden must be >= 1, got {self.hidden}")
        if self.init_policy not in POLICIES:
            raise GraphoptError(f"route init_policy '{self.init_policy}' unknown; choose one of "
                                f"{POLICIES}")
        if not 0.0 <= self.protect_deep < 1.0:
            raise GraphoptError(f"route protect_deep must be in [0, 1), got {self.protect_deep}")
        if self.timestep_bins < 1 or self.timestep_max <= 0:
            raise GraphoptError("route timestep_bins must be >= 1 and timestep_max > 0")
        if self.tau <= 0:
            raise GraphoptError(f"route tau must be > 0, got {self.tau}")
        if self.blocks is not None:
            self.blocks = tuple(sorted(set(int(b) for b in self.blocks)))
            if not self.blocks:
                raise GraphoptError("route blocks is empty: name at least one routable block")
        if self.ranking is not None:
            self.ranking = tuple(int(b) for b in self.ranking)


@register
class Route(Pass):
    name = "route"
    Options = RouteOptions

    def decide(self, graph) -> dict:
        o = self.options
        _refuse_routed(graph)
        n = len(graph.blocks)
        routable = list(o.blocks) if o.blocks is not None else list(range(n))
        bad = [j for j in routable if not 0 <= j < n]
        if bad:
            raise GraphoptError(f"route blocks {bad} do not exist; the model has {n} blocks")
        cost = model_cost(graph)
        fixed = 1.0 - sum(cost.blocks[j]["flops"] for j in routable) / cost.flops
        if o.budget <= fixed:
            raise GraphoptError(f"route budget {o.budget} does not cover the {fixed:.3f} FLOPs "
                                f"share that always runs (outside the routable blocks): raise "
                                f"the budget or route more blocks")
        if o.ranking is not None:
            if sorted(o.ranking) != sorted(routable):
                raise GraphoptError(f"route ranking {list(o.ranking)} must order exactly the "
                                    f"routable blocks {routable}")
            order = list(o.ranking)
            return self._decisions(graph, o, n, routable,
                                   order if o.mode == "mlp" else [order] * o.timestep_bins)
        if graph.is_meta:
            raise GraphoptError("ranking blocks needs weights (block importance runs the model), "
                                "and this graph is on the meta device: give the route option "
                                "ranking=[block indices, most important first], or replay a "
                                "recipe computed where the weights are")
        importance = graph.analysis("block-importance")

        def ranking(scores):
            return [j for j in rank_blocks(scores, o.init_policy, o.protect_deep) if j in routable]

        if o.mode == "mlp":
            order = ranking(importance.scores())
        else:
            centers = [(b + 0.5) * o.timestep_max / o.timestep_bins for b in range(o.timestep_bins)]
            order = [ranking(importance.at(t)) for t in centers]
        return self._decisions(graph, o, n, routable, order)

    @staticmethod
    def _decisions(graph, o, n, routable, order) -> dict:
        return {"n_blocks": n, "blocks": routable,
                "names": [graph.blocks[j].name for j in routable],
                "mode": o.mode, "hidden": o.hidden, "budget": o.budget, "tau": o.tau,
                "timestep_bins": o.timestep_bins, "timestep_max": o.timestep_max,
                "init_policy": o.init_policy, "protect_deep": o.protect_deep, "ranking": order}

    def apply(self, graph, decisions: dict) -> None:
        n = decisions["n_blocks"]
        names = [graph.blocks[j].name for j in decisions["blocks"] if j < len(graph.blocks)]
        if len(graph.blocks) != n or names != list(decisions["names"]):
            raise GraphoptError(f"recipe routes blocks {decisions['names']} of a {n}-block model; "
                                f"this model has {len(graph.blocks)} blocks: the recipe was made "
                                f"for another architecture or config")
        route_blocks(graph, decisions)

    def summarize(self, graph, decisions) -> dict:
        return {"routable_blocks": len(decisions["blocks"]), "mode": decisions["mode"],
                "budget": decisions["budget"]}

    def describe(self, decisions: dict) -> list[str]:
        first = decisions["ranking"] if decisions["mode"] == "mlp" else decisions["ranking"][0]
        return [f"- routed {len(decisions['blocks'])} of {decisions['n_blocks']} blocks "
                f"({decisions['mode']} router, budget {decisions['budget']:g} of the FLOPs per step)",
                f"- initial policy ({decisions['init_policy']}), most important first: "
                f"{', '.join(map(str, first))}" + (" (first timestep bin)" if decisions["mode"] != "mlp" else "")]

    def ensures(self, before, after, inputs) -> float:
        router = after.gm.router
        forced, record = router.force_gates, router.record
        router.force_gates, router.record = True, False
        try:
            return rel_error(after.gm(**inputs)[0], before.gm(**inputs)[0])
        finally:
            router.force_gates, router.record = forced, record


def route_blocks(graph, decisions: dict) -> Router:
    """Insert the router and outline each routable block into a torch.cond; returns the router."""
    _refuse_routed(graph)
    gm, g = graph.gm, graph.gm.graph
    nodes = {n.name: n for n in g.nodes}
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
    t_name = graph.family.timestep_input if graph.family is not None else "timestep"
    x_name = graph.family.latent_input if graph.family is not None else "hidden_states"
    for name in (t_name, x_name):
        if name not in placeholders:
            raise GraphoptError(f"route needs the model input '{name}' (the router reads it); "
                                f"the graph's inputs are {sorted(placeholders)}")
    timestep, latent = placeholders[t_name], placeholders[x_name]
    routable = list(decisions["blocks"])
    for j in routable:
        _check_routable(graph, graph.blocks[j], latent)
    position = {j: p for p, j in enumerate(routable)}
    cost = model_cost(graph)
    block_flops = [cost.blocks[j]["flops"] for j in routable]
    fixed = cost.flops - sum(block_flops)
    share = [f / cost.flops for f in block_flops]
    room = decisions["budget"] - fixed / cost.flops
    if decisions["mode"] == "mlp":
        init = init_logits([position[j] for j in decisions["ranking"]], share, room)
    else:
        init = torch.stack([init_logits([position[j] for j in order], share, room)
                            for order in decisions["ranking"]])
    first = graph.blocks[routable[0]]
    stream = nodes[first.stream_in[0]]
    temb = nodes[graph.timestep_embedding] if graph.timestep_embedding else timestep
    router = Router(block_flops=block_flops, fixed_flops=fixed, mode=decisions["mode"],
                    time_dim=None if temb.op == "placeholder" else _val(temb).shape[-1],
                    content_dim=_val(stream).shape[-1], hidden=decisions["hidden"],
                    budget=decisions["budget"], tau=decisions["tau"],
                    timestep_bins=decisions["timestep_bins"],
                    timestep_max=decisions["timestep_max"], init=init)
    router.to(next((p.device for p in gm.parameters()), torch.device("cpu"))).eval()
    gm.add_submodule("router", router)
    args = (timestep, latent) if decisions["mode"] == "schedule" else (timestep, latent, temb,
                                                                        stream)
    with g.inserting_before(nodes[first.nodes[0]]):
        call = g.call_module("router", args)
        gates = g.call_function(operator.getitem, (call, 0))
        run = g.call_function(operator.getitem, (call, 1))
    passes_on: dict[str, fx.Node] = {}
    for j in routable:
        _outline(gm, graph.blocks[j], position[j], gates, run, latent, passes_on)
    _stable_toposort(g)
    graph.refresh()
    return router


def _outline(gm, block, p, gates, run, latent, passes_on) -> None:
    """Replace block's nodes with cond(run[p], route_run_i, route_skip_i, operands) + gating."""
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    members = [nodes[m] for m in block.nodes]
    inside = set(members)
    stream_in = [passes_on[s] if s in passes_on else nodes[s] for s in block.stream_in]
    stream_out = [nodes[s] for s in block.stream_out]
    operands, recomputed, same = _operands(gm, members, stream_in, block)

    run_graph = fx.Graph()
    env = {}
    for a in operands:
        env[a] = run_graph.placeholder(a.name)
        env[a].meta.update({k: a.meta[k] for k in ("val", "tensor_meta") if k in a.meta})
    for a, b in same.items():
        env[a] = env[b]
    for n in recomputed + members:
        env[n] = run_graph.node_copy(n, lambda x: env[x])
    # Both branches return densely packed row-major tensors: cond needs their layouts to agree,
    # and a block's output (a slice, a transpose) and the stream it received need not be alike.
    run_graph.output(tuple(env[o] if _row_major(o) else run_graph.call_function(
        aten.clone.default, (env[o],), {"memory_format": torch.contiguous_format})
        for o in stream_out))
    skip_graph = fx.Graph()
    phs = [skip_graph.placeholder(a.name) for a in operands]
    skip_graph.output(tuple(
        skip_graph.call_function(aten.clone.default, (phs[k],),
                                 {"memory_format": torch.contiguous_format})
        for k in range(len(stream_in))))
    tag = block.name.replace(".", "_")
    gm.add_submodule(f"route_run_{tag}", fx.GraphModule(torch.nn.Module(), run_graph))
    gm.add_submodule(f"route_skip_{tag}", fx.GraphModule(torch.nn.Module(), skip_graph))

    with g.inserting_before(members[0]):
        pred = g.call_function(aten.select.int, (run, 0, p))
        true_fn = g.get_attr(f"route_run_{tag}")
        false_fn = g.get_attr(f"route_skip_{tag}")
        cond = g.call_function(cond_block, (pred, true_fn, false_fn, tuple(operands)))
        cond.meta["graphopt_routed_block"] = block.name
        if "nn_module_stack" in members[0].meta:
            cond.meta["nn_module_stack"] = members[0].meta["nn_module_stack"]
        mixed = []
        for k, (s_in, s_out) in enumerate(zip(stream_in, stream_out)):
            out = g.call_function(operator.getitem, (cond, k))
            rows = _rows_per_sample(_val(s_out).shape[0], _val(latent).shape[0], block)
            mixed.append(g.call_function(gate_stream, (gates, p, rows, out, s_in)))
            mixed[-1].meta["val"] = s_out.meta["val"]     # the next block's checks read it
    for name, s_out, new in zip(block.stream_out, stream_out, mixed):
        s_out.replace_all_uses_with(new, delete_user_cb=lambda u: u not in inside)
        passes_on[name] = new
    for m in reversed(members):
        g.erase_node(m)


def _check_routable(graph, block, latent: fx.Node) -> None:
    """Refuse, before anything is changed, a block that cannot become a conditional branch."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    members = graph._nodes(block.nodes)
    for m in members:
        if m.op != "call_function":
            raise GraphoptError(f"block '{block.name}' calls {m.op} '{m.target}'; route outlines "
                                f"only blocks made of ATen calls (a torch.export capture)")
        if free_unbacked_symbols(m.meta.get("val")):
            raise GraphoptError(
                f"block '{block.name}' computes a data-dependent size ('{m.name}', {m.target}), "
                f"which torch.cond cannot carry out of a branch (e.g. tokens picked by a mask "
                f"inside the block): this model's blocks cannot be routed. Use `drop` instead")
    for name_in, name_out in zip(block.stream_in, block.stream_out):
        d_in, d_out = _val(graph.node(name_in)).dtype, _val(graph.node(name_out)).dtype
        if d_in != d_out:
            raise GraphoptError(f"block '{block.name}' turns its stream from {d_in} into {d_out}: "
                                f"skipping it would change the dtype, so it cannot be routed")
        _rows_per_sample(_val(graph.node(name_out)).shape[0], _val(latent).shape[0], block)
    _operands(graph.gm, members, graph._nodes(block.stream_in), block)


def _operands(gm, members, stream_in, block):
    """(operands, nodes recomputed inside the branch, get_attr → operand holding the same tensor).

    Operands must be distinct tensors at run time: torch.export names the branch's inputs after
    them and fails on a repeat. So values that may *be* another operand are recomputed inside the
    branch from their input instead of passed: no-op casts (`.to`, `.contiguous()`, `type_as`
    return their input when nothing changes) and symbolic sizes (dynamic batch: cond takes
    tensors, not ints); weights shared under two names are passed once.
    """
    inside = set(members)
    operands, recomputed, same, owner, seen = list(stream_in), [], {}, {}, set(stream_in)

    def visit(n):
        if n in seen or n in inside:
            return
        seen.add(n)
        if n.op == "get_attr":
            tensor = _attribute(gm, n)
            if id(tensor) in owner:
                same[n] = owner[id(tensor)]
            else:
                owner[id(tensor)] = n
                operands.append(n)
        elif _is_tensor(n) and n.target not in _MAY_RETURN_INPUT:
            operands.append(n)
        elif _is_tensor(n) or (n.op == "call_function" and n.target in _INT_OPS):
            for a in n.all_input_nodes:
                visit(a)
            recomputed.append(n)
        else:
            raise GraphoptError(
                f"block '{block.name}' reads the integer '{n.name}' ({n.op} {n.target}), which "
                f"is not a size read from a tensor: route cannot move it into the block's "
                f"conditional branch. Capture the model with static shapes")

    for m in members:
        for a in m.all_input_nodes:
            visit(a)
    return operands, recomputed, same


def _rows_per_sample(rows, batch, block) -> int:
    """rows / batch as an int (sample-major streams: Latte keeps frames or positions as rows)."""
    import sympy

    def expr(x):
        return x.node.expr if isinstance(x, torch.SymInt) else sympy.Integer(int(x))

    ratio = sympy.simplify(expr(rows) / expr(batch))
    if not (ratio.is_Integer and ratio > 0):
        raise GraphoptError(f"block '{block.name}' stream has {rows} rows for a batch of {batch}: "
                            f"not a whole number of rows per sample, so per-sample gates cannot "
                            f"be applied")
    return int(ratio)


def _attribute(gm, n) -> torch.Tensor:
    value = gm
    for part in n.target.split("."):
        value = getattr(value, part)
    if not isinstance(value, torch.Tensor):
        raise GraphoptError(f"a routed block reads '{n.target}', a {type(value).__name__}, not a "
                            f"tensor: route does not nest conditionals")
    return value


def _is_tensor(n) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


def _row_major(n) -> bool:
    from torch._prims_common import make_contiguous_strides_for
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    val = _val(n)
    return all(statically_known_true(a == b) for a, b in
               zip(val.stride(), make_contiguous_strides_for(val.shape)))


def _val(n):
    val = n.meta.get("val")
    if val is None:
        raise GraphoptError(f"node '{n.name}' has no shape information; call graph.refresh() "
                            f"before routing")
    return val


def _stable_toposort(g: fx.Graph) -> None:
    """Reorder nodes so every value is defined before use, moving as few as possible (ties keep
    the current order). Outlining may place a cond before a side input defined mid-block."""
    import heapq

    order = list(g.nodes)
    index = {n: i for i, n in enumerate(order)}
    waiting = {n: len(set(n.all_input_nodes)) for n in order}
    ready = [index[n] for n in order if waiting[n] == 0]
    heapq.heapify(ready)
    result = []
    while ready:
        n = order[heapq.heappop(ready)]
        result.append(n)
        for u in n.users:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, index[u])
    if len(result) != len(order):
        raise GraphoptError("the routed graph has a cycle; this is a graphopt bug, please report "
                            "it with the recipe")
    if result == order:
        return
    for prev, n in zip(result, result[1:]):
        prev.append(n)
