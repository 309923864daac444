"""The router of dynamic depth (PARE): which blocks run, per sample and per denoising step.

`Router` is an nn.Module that `route` registers as `gm.router`; the routed graph calls it once per
forward and gets `(gates, run)`: gates (batch × routable blocks), 1.0 where the sample's block
runs, and run (routable blocks,) bool, True where any sample of the batch needs the block (its
conditional, `cond_block`, executes). Blocks are combined per sample by `gate_stream`.

Logits, one per routable block:
- `mlp` (PARE): MLP([LN(temb), LN(pool(stream))]) → logits; temb is the model's own timestep
  embedding, pool the mean over tokens of the residual stream entering the first routable block.
  (Where the model has no embedding outside its blocks, sinusoidal features of the raw timestep.)
- `schedule` (Learning-to-Cache): a (timestep bins × blocks) table indexed by the timestep's bin
  ⌊t / timestep_max · bins⌋ — no content input, so every step's decisions are fixed in advance.

Gates from logits ℓ (c_j: block j's FLOPs share, c_0: the share that always runs):
- training: straight-through Gumbel-sigmoid, hard = [σ((ℓ + log u − log(1 − u)) / τ) > ½] in the
  forward, the soft value's gradient in the backward; every block runs so that every gate has a
  gradient. After each call `gate_probs` = σ(ℓ) (batch × blocks; P(hard = 1) for any τ) and
  `exec_fraction` = c_0 + Σ_j σ(ℓ_j)·c_j (batch,), the expected executed-FLOPs fraction, are kept
  (differentiable) for the budget loss (`distill.losses.RouterBudgetLoss`).
- inference, `select="budget"`: per sample, the longest prefix of the blocks sorted by logit
  (descending) whose FLOPs fit: c_0 + Σ c_j ≤ budget, so `router.budget` trades quality for
  speed after training; `select="sign"`: of those, only blocks whose gate is on without noise
  (ℓ > 0, the training gate's mode), so at budget 1 the signs alone decide and each step may
  spend what it needs (a learned schedule). The static init is positive exactly on the prefix
  that fits, so both rules agree on it.
- `force_gates`: None (the router decides), True / False (every gate on / off), or a bool mask
  (blocks,) or (batch × blocks), for tests and for runtimes that decide outside the graph.

Initialised from a static ranking (most important block first): the output layer's weights are
zero and its bias is `init_logits(ranking, …)`, so before training the router is exactly the static
policy (the top-ranked blocks that fit the budget, positive logits; the rest negative).

The router follows its module's train()/eval() mode. `route` inserts it in eval mode: modules from
torch.export come back in training mode, which changes nothing else in them but would make
routing stochastic; call `gm.train()` to train it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from graphopt.errors import GraphoptError
from graphopt.fxutil import tracing
from graphopt.io import atomic_path
from graphopt.records import RecentRecords
from graphopt.reuse import pick

MODES = ("mlp", "schedule")
SELECTS = ("budget", "sign")
TIME_FEATURES = 64        # sinusoidal features of a raw timestep, where there is no embedding


class Router(nn.Module):
    def __init__(self, *, block_flops: list[int], fixed_flops: int, mode: str = "mlp",
                 time_dim: int | None = None, content_dim: int | None = None, hidden: int = 64,
                 budget: float = 0.5, tau: float = 1.0, timestep_bins: int = 10,
                 timestep_max: float = 1000.0, init: torch.Tensor | None = None,
                 select: str = "budget"):
        super().__init__()
        if select not in SELECTS:
            raise GraphoptError(f"router select '{select}' unknown; choose one of {SELECTS}")
        self.select = select
        if mode not in MODES:
            raise GraphoptError(f"router mode '{mode}' unknown; choose one of {MODES}")
        n = len(block_flops)
        if n == 0:
            raise GraphoptError("a router needs at least one routable block")
        self.mode = mode
        self.block_flops = [int(f) for f in block_flops]
        self.fixed_flops = int(fixed_flops)
        total = self.fixed_flops + sum(self.block_flops)
        self.register_buffer("cost", torch.tensor(self.block_flops, dtype=torch.float64).div(total)
                             .float(), persistent=False)
        self.fixed_share = self.fixed_flops / total
        self.tau = float(tau)
        self.timestep_bins = int(timestep_bins)
        self.timestep_max = float(timestep_max)
        self.budget = budget
        self.force_gates = None
        self.record = True          # eval-mode calls append their decisions to `history`
        self.history = RecentRecords()
        self.gate_probs: torch.Tensor | None = None       # set by every call that computes logits
        self.exec_fraction: torch.Tensor | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)    # the same recipe builds the same router
            if mode == "mlp":
                if content_dim is None:
                    raise GraphoptError("an mlp router needs the content (stream) width")
                self.time_dim = time_dim
                inputs = (time_dim or TIME_FEATURES) + content_dim
                self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, n))
                nn.init.zeros_(self.net[2].weight)
                with torch.no_grad():
                    self.net[2].bias.copy_(torch.zeros(n) if init is None else init.reshape(n))
            else:
                table = torch.zeros(self.timestep_bins, n) if init is None else \
                    init.reshape(-1, n).expand(self.timestep_bins, n).clone()
                self.table = nn.Parameter(table)

    def __deepcopy__(self, memo):
        # The last call's gate_probs / exec_fraction belong to that call's autograd graph, which
        # cannot be copied; a copy starts without them.
        state = {**self.__dict__, "gate_probs": None, "exec_fraction": None}
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(state, memo))
        return new

    @property
    def n_blocks(self) -> int:
        return len(self.block_flops)

    # ---- settings ----------------------------------------------------------------------------
    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float):
        if not 0.0 < float(value) <= 1.0:
            raise GraphoptError(f"router budget is a FLOPs fraction in (0, 1], got {value}")
        self._budget = float(value)

    @property
    def force_gates(self):
        return self._forced

    @force_gates.setter
    def force_gates(self, value):
        n = self.n_blocks
        if value is None:
            self._forced = None
        elif isinstance(value, bool):
            self._forced = torch.full((1, n), value, dtype=torch.bool)
        elif isinstance(value, torch.Tensor) and value.dtype == torch.bool and \
                value.shape[-1] == n and value.dim() in (1, 2):
            self._forced = value.reshape(-1, n).clone()
        else:
            raise GraphoptError(f"force_gates takes None, True, False or a bool tensor of shape "
                                f"({n},) or (batch, {n}); got {value!r}")

    # ---- forward -----------------------------------------------------------------------------
    def logits(self, timestep, latent, temb=None, stream=None) -> torch.Tensor:
        """(batch, blocks) logits; `temb` and `stream` are unused in schedule mode."""
        batch = latent.shape[0]
        if self.mode == "schedule":
            t = _per_sample_timestep(timestep, batch)
            bins = (t / self.timestep_max * self.timestep_bins).floor()
            bins = bins.clamp(0, self.timestep_bins - 1).long()
            return self.table[bins].expand(batch, -1)
        dtype = self.net[0].weight.dtype
        if self.time_dim is None:
            time = _sinusoidal(_per_sample_timestep(temb, batch), TIME_FEATURES).to(dtype)
        else:
            time = temb.to(dtype).reshape(batch, -1, temb.shape[-1]).mean(1)
        content = stream.to(dtype).reshape(batch, -1, stream.shape[-1]).mean(1)
        x = torch.cat([F.layer_norm(time, time.shape[-1:]),
                       F.layer_norm(content, content.shape[-1:])], dim=1)
        return self.net(x)

    def forward(self, timestep, latent, temb=None, stream=None, valid=None):
        """(gates, run). `valid` (0-dim bool, reusing graphs): False while the caches hold
        nothing to reuse, and then every block runs."""
        batch = latent.shape[0]
        if self._forced is not None:
            forced = self._forced.to(latent.device)
            if forced.shape[0] not in (1, batch):
                raise GraphoptError(f"force_gates has {forced.shape[0]} rows; the batch has "
                                    f"{batch} samples")
            hard = forced.expand(batch, -1)
            gates, run = hard.float(), hard.any(0)
        else:
            logits = self.logits(timestep, latent, temb, stream)
            if not tracing(logits):
                self.gate_probs = torch.sigmoid(logits.float())
                self.exec_fraction = self.fixed_share + (self.gate_probs * self.cost).sum(1)
            if self.training:
                gates = gumbel_sigmoid(logits.float(), self.tau)
                hard = gates.detach() > 0.5
                run = torch.ones(self.n_blocks, dtype=torch.bool, device=gates.device)
            else:
                hard = self._select(logits, self._budget)
                gates, run = hard.float(), hard.any(0)
        if valid is not None:
            gates = torch.where(valid, gates, torch.ones_like(gates))
            hard, run = hard | ~valid, run | ~valid
        if self.record and not self.training and not tracing(gates):
            self.history.append({"timestep": _per_sample_timestep(timestep, batch).detach().cpu(),
                                 "gates": hard.detach().cpu(), "run": run.detach().cpu()})
        return gates, run

    def schedule(self, budget: float | None = None) -> torch.Tensor:
        """Schedule mode: the (timestep bins × blocks) bool table of inference decisions."""
        if self.mode != "schedule":
            raise GraphoptError("only a schedule-mode router has a fixed table; this one reads "
                                "the content")
        budget = self._budget if budget is None else budget
        with torch.no_grad():
            return self._select(self.table, budget)

    def _select(self, logits, budget: float) -> torch.Tensor:
        hard = select_under_budget(logits, self.cost, budget - self.fixed_share)
        return hard & (logits > 0) if self.select == "sign" else hard

    # ---- accounting --------------------------------------------------------------------------
    def step_flops(self) -> list[dict]:
        """Per recorded call: FLOPs executed (a block runs for the whole batch if any sample needs
        it), their fraction of the full model, and each sample's own gated fraction."""
        total = self.fixed_flops + sum(self.block_flops)
        flops = torch.tensor(self.block_flops, dtype=torch.float64)
        out = []
        for step, rec in enumerate(self.history):
            executed = self.fixed_flops + int((rec["run"].double() * flops).sum())
            per_sample = (self.fixed_flops + rec["gates"].double() @ flops) / total
            out.append({"step": step, "executed_flops": executed, "fraction": executed / total,
                        "sample_fractions": per_sample.tolist(),
                        "blocks_run": int(rec["run"].sum())})
        return out

    def clear_history(self) -> None:
        self.history.clear()

    @contextlib.contextmanager
    def recording(self):
        """Record this block of calls into a fresh history; the previous setting and history come
        back afterwards (benchmarks and plots count only their own calls)."""
        saved = self.record, self.history
        self.record, self.history = True, RecentRecords()
        try:
            yield self.history
        finally:
            self.record, self.history = saved

    def plot_decisions(self, path, names: list[str] | None = None) -> None:
        """PNG heat map, recorded steps × routable blocks: share of the batch's samples that ran."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if not self.history:
            raise GraphoptError("no router decisions recorded yet: run the model in eval mode "
                                "with router.record = True first")
        grid = torch.stack([rec["gates"].float().mean(0) for rec in self.history])
        fig = Figure(figsize=(0.3 * self.n_blocks + 2.5, 0.22 * len(self.history) + 1.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="Greens", vmin=0, vmax=1,
                       interpolation="nearest")
        ax.set_xlabel("routable block")
        ax.set_ylabel("step (call)")
        if names is not None:
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        fractions = [s["fraction"] for s in self.step_flops()]
        ax.set_title(f"blocks run (mean executed FLOPs {sum(fractions) / len(fractions):.2f})",
                     fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="share of samples")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)


def for_export(graph) -> Router | None:
    """Ready the router of `graph` (a copy about to be exported; None if it is not routed) the way
    every exporter (ONNX, AOTInductor) does: eval mode (the inference gates under its budget), no
    recording. A set `force_gates` stays and is baked in, so the export computes what the module
    does as it stands; a mask with one row per sample needs an export whose batch is those samples,
    so it is refused for a symbolic batch or another batch size."""
    router = getattr(graph.gm, "router", None)
    if router is None:
        return None
    router.eval()
    router.record = False
    forced = router.force_gates
    if forced is not None and forced.shape[0] > 1:
        latent = next((p for p in graph.placeholders() if p.name == graph.latent_input), None)
        batch = latent.meta["val"].shape[0] if latent is not None else None
        if not isinstance(batch, int) or batch != forced.shape[0]:
            what = "symbolic" if isinstance(batch, torch.SymInt) else f"{batch} samples"
            raise GraphoptError(f"force_gates has {forced.shape[0]} rows (one per sample) but the "
                                f"export's batch is {what}: force every sample alike with one "
                                f"row of {router.n_blocks} gates, export at that fixed batch, or "
                                f"set force_gates = None to export the router's decisions")
    return router


def gumbel_sigmoid(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid: 0/1 forward, ∂σ((ℓ + g)/τ)/∂ℓ backward."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def select_under_budget(logits: torch.Tensor, cost: torch.Tensor, room: float) -> torch.Tensor:
    """Bool (…, blocks): per row, the longest prefix of blocks by descending logit with
    Σ cost ≤ room. (topk, not sort: it exports to ONNX TopK.)"""
    order = torch.topk(logits, logits.shape[-1], dim=-1).indices
    spent = cost[order].cumsum(-1)
    keep = spent <= room + 1e-6
    return torch.zeros_like(keep).scatter(-1, order, keep)


def init_logits(ranking: list[int], cost: list[float], room: float) -> torch.Tensor:
    """Logits (blocks,) that order the blocks as `ranking` (most important first) and are positive
    exactly on the top-ranked prefix that fits `room`: ℓ = ±1 + 4·(k − r − ½)/n for rank r, k
    blocks kept, so the budget selection and σ(ℓ) > ½ agree with the static policy."""
    n = len(ranking)
    spent, kept = 0.0, 0
    for j in ranking:
        if spent + cost[j] > room + 1e-6:
            break
        spent += cost[j]
        kept += 1
    logits = torch.zeros(n)
    for r, j in enumerate(ranking):
        logits[j] = (1.0 if r < kept else -1.0) + 4.0 * (kept - r - 0.5) / n
    return logits


def gate_stream(gates: torch.Tensor, j: int, rows_per_sample: int, block_out: torch.Tensor,
                stream_in: torch.Tensor) -> torch.Tensor:
    """Per sample: block j's output where its gate is on, `stream_in` where it is off (the
    unchanged stream, or with reuse the stream plus the cached residual).

    Rows are sample-major (rows_per_sample consecutive rows per sample: frames for Latte's
    spatial blocks, positions for its temporal ones). Exact selection (torch.where); with a
    straight-through gate (training) its gradient is (block_out − stream_in).
    """
    g = gates[:, j]
    if not g.requires_grad and not tracing(g) and bool(g.min() == g.max()):
        # Eager, one decision for the whole batch: no per-sample select is needed.
        return block_out if bool(g[0] > 0.5) else stream_in
    if rows_per_sample > 1:
        g = g.repeat_interleave(rows_per_sample)
    g = g.reshape((-1,) + (1,) * (block_out.dim() - 1))
    mixed = torch.where(g > 0.5, block_out, stream_in)
    if g.requires_grad:
        mixed = mixed + (g - g.detach()).to(mixed.dtype) * (block_out - stream_in)
    return mixed


def sample_time(timestep: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """Each sample's timestep (float32, one per sample of `latent`): the clock forecasts run on."""
    return _per_sample_timestep(timestep, latent.shape[0])


def _per_row(elapsed: torch.Tensor, rows_per_sample: int, like: torch.Tensor) -> torch.Tensor:
    if rows_per_sample > 1:
        elapsed = elapsed.repeat_interleave(rows_per_sample)
    return elapsed.to(device=like.device, dtype=like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))


def forecast_residual(residual: torch.Tensor, slope: torch.Tensor, elapsed: torch.Tensor,
                      rows_per_sample: int) -> torch.Tensor:
    """The residual a skipped block is forecast to add: its last computed one moved along its
    slope (change per unit of timestep) by the timestep `elapsed` since then (per sample)."""
    return residual + slope * _per_row(elapsed, rows_per_sample, slope)


def residual_slope(residual: torch.Tensor, last: torch.Tensor, elapsed: torch.Tensor,
                   rows_per_sample: int, valid: torch.Tensor) -> torch.Tensor:
    """A computed residual's change per unit of timestep since the block last computed
    (first-order divided difference); zero while the caches hold nothing (`valid` False), and for
    a sample whose timestep has not moved (a run restarts on the batch's mean timestep)."""
    per_row = _per_row(elapsed, rows_per_sample, residual)
    moved = per_row != 0
    inverse = torch.where(moved, 1 / torch.where(moved, per_row, torch.ones_like(per_row)),
                          torch.zeros_like(per_row))
    return pick(valid, (residual - last) * inverse, torch.zeros_like(residual))


def cond_block(pred: torch.Tensor, run_fn, skip_fn, operands: tuple):
    """torch.cond(pred, run_fn, skip_fn, operands), the form a routed block's call takes.

    Under tracing (torch.export, fake-tensor propagation, torch.compile) this is the higher-order
    op itself, so exported programs hold a real cond (ONNX `If`). Run eagerly it takes the branch
    in Python, as cond's own eager kernel does, without the re-tracing of both branches that
    cond's autograd rule performs on every call (≈0.1 s per block per step).
    """
    if tracing(pred):
        return torch.ops.higher_order.cond(pred, run_fn, skip_fn, tuple(operands))
    return tuple(run_fn(*operands) if bool(pred) else skip_fn(*operands))


def _per_sample_timestep(t: torch.Tensor, batch) -> torch.Tensor:
    t = t.float()
    if t.dim() == 0:
        t = t.expand(batch)
    return t.reshape(t.shape[0], -1).mean(1)


def _sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


# -- the router in a routed graph: the nodes `route` wrote, as the exporters read them ------------


@dataclass
class Unit:
    """One block as the top-level graph holds it. Routed: the cond node, its run branch and the
    per-sample selects (`gate_stream`) that are its stream outputs; plain: the block's own nodes."""

    index: int
    name: str
    first: fx.Node                          # its first node in the graph (for ordering)
    stream_in: list[fx.Node]
    stream_out: list[fx.Node]
    gate: int | None = None
    body: fx.GraphModule | None = None      # routed: the conditional's run branch
    operands: list[fx.Node] = field(default_factory=list)   # routed: the cond's operands
    members: list[fx.Node] = field(default_factory=list)    # plain: the block's nodes
    # Reuse: per stream, the cache slot a reuse-routed block's skip reads (None: identity skip);
    # `cached`: the cache pass's conditional, decided by its rule (passes/cache.py cache_rule).
    slots: list[str | None] = field(default_factory=list)
    # Forecast (route skip="forecast"): per stream, the slot of the residual's slope, and the slot
    # of the per-sample timestep the block last computed at.
    slopes: list[str | None] = field(default_factory=list)
    time: str | None = None
    cached: bool = False


def units(graph) -> list[Unit]:
    """Blocks in execution order: routed ones (cond nodes) and plain ones (graph.blocks)."""
    gm = graph.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    units = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not cond_block:
            continue
        name = n.meta.get("graphopt_routed_block", n.name)
        outputs = {u.args[1]: u for u in n.users if u.target is operator.getitem}
        if any(u.target is pick for k in outputs for u in outputs[k].users):
            # The cache pass: one conditional over a run of blocks, decided in the graph. Its
            # stream outputs are pick(compute, out, reused); the stream entering it is the
            # operand the conditional's output k was paired with (outline keeps their order).
            members = [next(u for u in outputs[k].users if u.target is pick)
                       for k in range(len(outputs))]
            entering = list(n.args[3])[:len(members)]
            units.append(Unit(-1, name, n, entering, members, body=getattr(gm, n.args[1].target),
                              operands=list(n.args[3]), cached=True))
            continue
        mixed = []
        for k in range(len(outputs)):
            # gate_stream(out, stream) (identity skip), or with reuse gate_stream(out, stream +
            # cached) and the cache update from out − stream
            selects = [u for u in outputs[k].users if u.target is gate_stream and u.args[3] is outputs[k]]
            if len(selects) != 1:
                raise GraphoptError(f"routed block '{name}': its output {k} is not gated exactly once; "
                                    "export the graph as the route pass wrote it")
            mixed.append(selects[0])
        gate, rows = mixed[0].args[1], mixed[0].args[2]
        if rows != 1:
            raise GraphoptError(
                f"routed block '{name}' keeps {rows} stream rows per sample; the segmented layout selects "
                "whole samples along axis 0 of the stream: use layout='single'")
        stream_in, slots, slopes, times = zip(*(_skip_source(m.args[4]) for m in mixed))
        units.append(Unit(-1, name, n, list(stream_in), mixed, gate=gate,
                           body=getattr(gm, n.args[1].target), operands=list(n.args[3]),
                           slots=list(slots), slopes=list(slopes), time=times[0]))
    for block in graph.blocks:
        members = graph._nodes(block.nodes)
        units.append(Unit(-1, block.name, members[0], [graph.node(s) for s in block.stream_in],
                           [graph.node(s) for s in block.stream_out], members=members))
    units.sort(key=lambda u: order[u.first])
    for i, u in enumerate(units):
        u.index = i
    return units


def _skip_source(fallback: fx.Node) -> tuple[fx.Node, str | None, str | None, str | None]:
    """(the stream entering a routed block, the cache slot its skip adds, the slot of that
    residual's slope, the slot of the block's last timestep) from what a skipped sample gets: the
    stream itself, with reuse add(stream, read(slot)), with forecast add(stream,
    forecast_residual(read(slot), read(slope), now − read(time), rows))."""
    from graphopt.reuse import STATE_MODULE

    def slot(node):
        if isinstance(node, fx.Node) and node.op == "call_module" and node.target == STATE_MODULE \
                and node.args[0] == "read":
            return node.args[1]
        return None

    if fallback.op == "call_function" and fallback.target is torch.ops.aten.add.Tensor:
        stream, given = fallback.args[:2]
        if slot(given) is not None:
            return stream, slot(given), None, None
        if isinstance(given, fx.Node) and given.target is forecast_residual:
            residual, slope, elapsed = given.args[:3]
            return stream, slot(residual), slot(slope), slot(elapsed.args[1])
    return fallback, None, None, None


def gates_node(graph) -> fx.Node:
    """The router's per-sample gates (float, batch x routed blocks): getitem(router(...), 0)."""
    for n in graph.gm.graph.nodes:
        if n.op == "call_module" and n.target == "router":
            for u in n.users:
                if u.target is operator.getitem and u.args[1] == 0:
                    return u
    raise GraphoptError("the graph has a router module but no call to it; export the graph as route wrote it")


def add_gates_output(gm: fx.GraphModule, gates: fx.Node) -> None:
    """Append bool(gates > 0.5) to the graph's output tuple (the router's hard decisions)."""
    g = gm.graph
    with g.inserting_before(g.output_node()):
        hard = g.call_function(torch.ops.aten.gt.Scalar, (gates, 0.5))
    add_output(gm, hard)


def add_output(gm: fx.GraphModule, node: fx.Node) -> None:
    """Append `node` to the graph's output tuple."""
    g = gm.graph
    out = g.output_node()
    values = tuple(out.args[0])
    out.args = ((*values, node),)
    codegen = g._codegen
    if getattr(codegen, "pytree_info", None) is not None:      # an exported module rebuilds its outputs
        from torch.utils import _pytree as pytree

        spec = pytree.tree_structure(tuple(range(len(values) + 1)))
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=spec)
    gm.recompile()


def block_table(graph) -> list[dict]:
    """[{"block": i, "gate": column or None, "cached": bool}] in execution order, from the units of
    the graph (`cached`: the cache pass's run of blocks, computed or reused once per call)."""
    return [{"block": u.index, "gate": u.gate, "cached": u.cached} for u in units(graph)]
