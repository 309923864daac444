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
original; a sample whose gate is off gets its stream back unchanged from that block (skip
"identity"), plus the block's last residual ("reuse"), or plus that residual extrapolated along
its change between the block's last two runs ("forecast"; slots in graphopt/reuse.py).
Recorded decisions: routable blocks, router mode/shape/budget/temperature, the init policy and the
static ranking the router starts from; the router's weights are parameters (saved with the model).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from graphopt import reuse
from graphopt.blocks import refuse_routed
from graphopt.cost import model_cost
from graphopt.errors import GraphoptError
from graphopt.outline import (check_outlinable, outline, replace_outputs, rows_per_sample,
                              stable_toposort, val)
from graphopt.pass_manager import Pass, register, rel_error
from graphopt.passes.block_importance import POLICIES, rank_blocks
from graphopt.router import (MODES, SELECTS, Router, forecast_residual, gate_stream, init_logits,
                             residual_slope, sample_time)

aten = torch.ops.aten
SKIPS = ("identity", "reuse", "forecast")


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
    # What a skipped block gives back: its input ("identity", PARE), its input plus the residual
    # it added the last time it ran for that sample ("reuse", as diffusers' caches do), or plus
    # that residual extrapolated along its change between the last two runs ("forecast", as
    # TaylorSeer's first order does, on the timestep clock).
    skip: str = "identity"
    select: str = "budget"             # inference gates: top blocks that fit, or also ℓ > 0 only

    def __post_init__(self):
        if self.select not in SELECTS:
            raise GraphoptError(f"route select '{self.select}' unknown; choose one of {SELECTS}")
        if self.skip not in SKIPS:
            raise GraphoptError(f"route skip '{self.skip}' unknown; choose one of {SKIPS}")
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
        refuse_routed(graph)
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
                "init_policy": o.init_policy, "protect_deep": o.protect_deep, "ranking": order,
                "skip": o.skip, "select": o.select}

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
                "budget": decisions["budget"], "skip": decisions.get("skip", "identity")}

    def describe(self, decisions: dict) -> list[str]:
        first = decisions["ranking"] if decisions["mode"] == "mlp" else decisions["ranking"][0]
        skip = decisions.get("skip", "identity")
        gives = {"reuse": "its cached residual",
                 "forecast": "its cached residual extrapolated along its last change"}.get(
            skip, "its input unchanged")
        return [f"- routed {len(decisions['blocks'])} of {decisions['n_blocks']} blocks "
                f"({decisions['mode']} router, budget {decisions['budget']:g} of the FLOPs per "
                f"step); a skipped block gives back {gives}",
                f"- initial policy ({decisions['init_policy']}), most important first: "
                f"{', '.join(map(str, first))}" + (" (first timestep bin)" if decisions["mode"] != "mlp" else "")]

    def ensures(self, before, after, inputs) -> float:
        router = after.gm.router
        forced, record = router.force_gates, router.record
        router.force_gates, router.record = True, False
        try:
            out = after.gm(**inputs)[0]
            reuse.reset_cache(after)        # the check's call is no step of the user's run
            return rel_error(out, before.gm(**inputs)[0])
        finally:
            router.force_gates, router.record = forced, record


def route_blocks(graph, decisions: dict) -> Router:
    """Insert the router and outline each routable block into a torch.cond; returns the router."""
    refuse_routed(graph)
    gm, g = graph.gm, graph.gm.graph
    nodes = {n.name: n for n in g.nodes}
    placeholders = {n.name: n for n in g.nodes if n.op == "placeholder"}
    t_name, x_name = graph.timestep_input, graph.latent_input
    for name in (t_name, x_name):
        if name not in placeholders:
            raise GraphoptError(f"route needs the model input '{name}' (the router reads it); "
                                f"the graph's inputs are {sorted(placeholders)}")
    timestep, latent = placeholders[t_name], placeholders[x_name]
    routable = list(decisions["blocks"])
    for j in routable:
        block = graph.blocks[j]
        members = graph._nodes(block.nodes)
        pairs = list(zip(graph._nodes(block.stream_in), graph._nodes(block.stream_out)))
        check_outlinable(graph, members, pairs, f"block '{block.name}'")
        for _, s_out in pairs:
            rows_per_sample(val(s_out).shape[0], val(latent).shape[0], f"block '{block.name}'")
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
                    time_dim=None if temb.op == "placeholder" else val(temb).shape[-1],
                    content_dim=val(stream).shape[-1], hidden=decisions["hidden"],
                    budget=decisions["budget"], tau=decisions["tau"],
                    timestep_bins=decisions["timestep_bins"],
                    timestep_max=decisions["timestep_max"], init=init,
                    select=decisions.get("select", "budget"))
    router.to(next((p.device for p in gm.parameters()), torch.device("cpu"))).eval()
    gm.add_submodule("router", router)
    skip = decisions.get("skip", "identity")
    reusing = skip != "identity"
    valid = reuse.begin_node(graph) if reusing else None
    args = (timestep, latent) if decisions["mode"] == "schedule" else (timestep, latent, temb,
                                                                        stream)
    with g.inserting_before(nodes[first.nodes[0]]):
        call = g.call_module("router", args, {"valid": valid} if reusing else {})
        gates = g.call_function(operator.getitem, (call, 0))
        run = g.call_function(operator.getitem, (call, 1))
        now = g.call_function(sample_time, (timestep, latent)) if skip == "forecast" else None
    passes_on: dict[str, fx.Node] = {}
    for j in routable:
        _route_block(gm, graph.blocks[j], position[j], gates, run, latent, passes_on, skip,
                     valid, now)
    stable_toposort(g)
    graph.refresh()
    return router


def _route_block(gm, block, p, gates, run, latent, passes_on, skip, valid, now) -> None:
    """Replace block's nodes with cond(run[p], run, skip, operands) and per-sample gating; with
    reuse, a sample whose gate is off gets stream + the residual cached when it last ran; with
    forecast, that residual moved along its slope by the timestep elapsed since (the slope and
    the time of the last run are slots too: `<key>_slope`, `<tag>_time`)."""
    g = gm.graph
    nodes = {n.name: n for n in g.nodes}
    members = [nodes[m] for m in block.nodes]
    stream_in = [passes_on[s] if s in passes_on else nodes[s] for s in block.stream_in]
    stream_out = [nodes[s] for s in block.stream_out]
    tag = block.name.replace(".", "_")
    with g.inserting_before(members[0]):
        pred = g.call_function(aten.select.int, (run, 0, p))
    outs = outline(gm, members, list(zip(stream_in, stream_out)), pred, f"route_{tag}",
                   block.name)
    label = f"block '{block.name}'"
    mixed = []
    with g.inserting_before(members[0]):
        if skip == "forecast":
            then = reuse.read_node(g, f"{tag}_time", now)
            elapsed = g.call_function(aten.sub.Tensor, (now, then))
            reuse.write_node(g, f"{tag}_time", g.call_function(gate_stream, (gates, p, 1, now, then)))
        for k, (s_in, out) in enumerate(zip(stream_in, outs)):
            rows = rows_per_sample(val(out).shape[0], val(latent).shape[0], label)
            if skip == "identity":
                mixed.append(g.call_function(gate_stream, (gates, p, rows, out, s_in)))
                continue
            key = f"{tag}_s{k}"
            cached = reuse.read_node(g, key, s_in)
            residual = g.call_function(aten.sub.Tensor, (out, s_in))
            given = cached
            if skip == "forecast":
                slope = reuse.read_node(g, f"{key}_slope", s_in)
                given = g.call_function(forecast_residual, (cached, slope, elapsed, rows))
                new_slope = g.call_function(residual_slope, (residual, cached, elapsed, rows, valid))
                reuse.write_node(g, f"{key}_slope",
                                 g.call_function(gate_stream, (gates, p, rows, new_slope, slope)))
            fallback = g.call_function(aten.add.Tensor, (s_in, given))
            mixed.append(g.call_function(gate_stream, (gates, p, rows, out, fallback)))
            kept = g.call_function(gate_stream, (gates, p, rows, residual, cached))
            reuse.write_node(g, key, kept)
    replace_outputs(g, members, stream_out, mixed)
    for name, new in zip(block.stream_out, mixed):
        passes_on[name] = new
