"""The distillation pair (frozen teacher, trainable student) built from two graphs:
`GraphPair(student, teacher_graph(student))`.

The teacher is the original model's graph, the student the compressed one (`prune`, `drop`,
`route` applied). Each side gets a *tapped twin*: a GraphModule over a copy of its fx graph that
shares its parameters (nothing is copied) and holds one tap per block, a module that keeps the
residual stream leaving the block and returns it unchanged. The graphs themselves are untouched:
they still export, their forward is what it was, and training the twin trains the graph's weights.

Taps and the block mapping:
- a block is named by its module path (`blocks.7`); `prune` keeps names and `drop` removes blocks
  without renaming the others, so student block `blocks.k` maps to the teacher block of the same
  name, whatever was dropped before it;
- a plain block's tap is its stream output (`Block.stream_out[0]`); a routed block has become a
  `cond_block` call followed by `gate_stream`, and its tap is that selection: the block's output
  where its gate is on, its input (the stream unchanged) where the block is skipped;
- each tap is viewed as (batch, frames, tokens_per_frame, dim) from the graph's video token layout
  (`graphopt.blocks.frames_view`); a stream with no known video layout, or a single frame, is one
  "frame" of all its tokens.

Routed students, per call of `forward_student`:
- `router_off` (PARE stage 1): every gate forced on, so every block runs and the router is unused;
- training (the default): the router in train mode, straight-through Gumbel-sigmoid gates; every
  block runs and `gate_stream` mixes output and input with the hard gate, its gradient flowing to
  the gate (`router.gate_stream`). Eagerly, `cond_block` takes the branch in Python, so autograd
  goes through the branch's GraphModule like any other module. (torch.cond's own eager autograd
  works on these branches too, but re-traces both of them on every call: ~1.7 s per block on the
  tiny Wan against ~2 ms.) `Outputs.gate_probs` / `exec_fraction` are the router's σ(ℓ) and
  c_0 + Σ σ(ℓ_j)·c_j, the expected executed-FLOPs fraction of the whole model;
- `hard_gates`: the router in eval mode, the inference decisions under its budget; skipped
  blocks do not run.

Inputs are cast, key by key, to the dtype the graph was captured with (a teacher captured in
bfloat16 takes bfloat16 latents and a float32 timestep); predictions and features come back in
float32 for the losses.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import fx, nn

from graphopt.blocks import ValueTap, frames_view, insert_tap
from graphopt.errors import GraphoptError
from graphopt.fxutil import first
from graphopt.router import cond_block, gate_stream

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_graph(student, source: str | None = None, *, dtype: str | None = None,
                  trust_pickle: bool = False):
    """Capture the uncompressed model `source` (default: the student's recipe source) at the
    student's input shape, optionally in a lower precision, and check it is the student's origin."""
    from graphopt.capture import capture, load_model

    if dtype is not None and dtype not in DTYPES:
        raise GraphoptError(f"teacher dtype '{dtype}' unknown; choose one of {sorted(DTYPES)}")
    source = source or student.recipe.model.get("source")
    if not source:
        raise GraphoptError("the student's recipe does not say which model it was compressed "
                            "from: give the teacher explicitly (--teacher MODEL)")
    try:
        model = load_model(source, trust_pickle=trust_pickle)
    except GraphoptError as e:
        raise GraphoptError(f"teacher: {e} (the teacher defaults to the model the student was "
                            f"compressed from; give it with --teacher MODEL)") from None
    if not isinstance(model, nn.Module) or student.spec is None:
        raise GraphoptError(f"teacher '{source}' must be a diffusers model (folder or shipped "
                            f"name) and the student a capture of one, so both see the same inputs")
    spec = student.spec
    if dtype is not None:
        model = model.to(DTYPES[dtype])
        spec = dataclasses.replace(spec, dtype=DTYPES[dtype])
    teacher = capture(model, spec=spec, trust_pickle=trust_pickle)
    mine, theirs = _architecture(student), _architecture(teacher)
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise GraphoptError(f"teacher '{source}' is not the model the student was compressed "
                            f"from: their configs differ in {diff[:5]}")
    return teacher


def _architecture(graph) -> dict:
    return {k: v for k, v in graph.recipe.model.get("config", {}).items()
            if not k.startswith("_")}


@dataclass
class Tap:
    block: str              # module path, e.g. "blocks.7"
    node: str               # the node whose value is tapped (stream output or gate_stream)
    shape: tuple


def block_taps(graph) -> list[Tap]:
    """One tap per block in execution order: plain blocks' first stream output, routed blocks'
    gate_stream (the stream after the conditional)."""
    plain = {b.stream_out[0]: b.name for b in graph.blocks}
    taps = []
    for n in graph.gm.graph.nodes:
        name = plain.get(n.name)
        if name is None and n.target is gate_stream:
            picked = n.args[3]        # getitem(cond, k): stream k of the routed block
            cond = picked.args[0] if isinstance(picked, fx.Node) else None
            if cond is not None and cond.target is cond_block and picked.args[1] == 0:
                name = cond.meta.get("graphopt_routed_block")
        if name is not None:
            taps.append(Tap(name, n.name, tuple(n.meta["val"].shape)))
    return taps


def _tapped_twin(graph, taps: list[Tap]) -> tuple[fx.GraphModule, list[ValueTap]]:
    """A GraphModule sharing graph.gm's parameters whose taps keep each tapped value."""
    twin = fx.GraphModule(graph.gm, copy.deepcopy(graph.gm.graph))
    nodes = {n.name: n for n in twin.graph.nodes}
    modules = [insert_tap(twin, nodes[tap.node], f"graphopt_tap_{i}") for i, tap in enumerate(taps)]
    twin.graph.lint()
    twin.recompile()
    return twin, modules


class GraphPair:
    """A `graphopt.distill.DistillPair` over a teacher graph and a compressed student graph.

    `teacher` / `student` are the tapped twins (nn.Modules sharing the graphs' weights);
    `mapping[i]` = (block name, student tap i, teacher tap) pairs feature i of both sides.
    After training, `finish()` leaves the student graph ready to save (router in eval mode).
    """

    def __init__(self, student, teacher, *, timestep_scale: float = 1000.0):
        if any(n.target is cond_block for n in teacher.gm.graph.nodes):
            raise GraphoptError("the teacher is routed: give the uncompressed model as teacher")
        s_taps, t_taps = block_taps(student), block_taps(teacher)
        t_index = {t.block: i for i, t in enumerate(t_taps)}
        missing = [t.block for t in s_taps if t.block not in t_index]
        if missing or not s_taps:
            raise GraphoptError(f"student blocks {missing} have no teacher block of the same name "
                                f"(teacher blocks: {[t.block for t in t_taps][:4]}...): the "
                                f"teacher is not the model the student was compressed from")
        self.mapping = [(tap.block, i, t_index[tap.block]) for i, tap in enumerate(s_taps)]
        self.student_graph, self.teacher_graph = student, teacher
        used = [t_taps[k] for _, _, k in self.mapping]
        self.student, self._student_taps = _tapped_twin(student, s_taps)
        self.teacher, self._teacher_taps = _tapped_twin(teacher, used)
        self._student_views = [_view(student, t) for t in s_taps]
        self._teacher_views = [_view(teacher, t) for t in used]
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.router = getattr(student.gm, "router", None)
        for p in self.student_parameters():   # the router's are the trainer's to switch per stage
            p.requires_grad_(True)
        self.timestep_scale = float(timestep_scale)
        self._t_name, self._x_name = student.timestep_input, student.latent_input

    # -- DistillPair
    def forward_teacher(self, inputs: dict):
        from graphopt.distill import Outputs

        with torch.no_grad():
            pred = first(self.teacher(**_cast(self.teacher_graph, inputs)))
        return Outputs(pred=pred.float(), features=_collect(self._teacher_taps, self._teacher_views))

    def forward_student(self, inputs: dict, *, hard_gates: bool = False, router_off: bool = False):
        from graphopt.distill import Outputs

        with self._router_mode(hard_gates, router_off):
            pred = first(self.student(**_cast(self.student_graph, inputs)))
            probs = exec_fraction = None
            if self.router is not None and not router_off:
                probs, exec_fraction = self.router.gate_probs, self.router.exec_fraction
        return Outputs(pred=pred.float(), features=_collect(self._student_taps, self._student_views),
                       gate_probs=probs, exec_fraction=exec_fraction)

    def student_parameters(self) -> list[nn.Parameter]:
        router_ids = {id(p) for p in self.router_parameters()}
        return [p for p in self.student.parameters() if id(p) not in router_ids]

    def router_parameters(self) -> list[nn.Parameter]:
        router = getattr(self.student, "router", None)
        return [] if router is None else list(router.parameters())

    def noise_level(self, inputs: dict) -> torch.Tensor:
        t, batch = inputs[self._t_name].float(), inputs[self._x_name].shape[0]
        t = t.expand(batch) if t.dim() == 0 else t.reshape(t.shape[0], -1).mean(1)
        return (t / self.timestep_scale).clamp(0, 1)

    @torch.no_grad()
    def executed_fraction(self, batches: list[dict]) -> float | None:
        """Mean executed-FLOPs fraction per sample (of the whole model) at inference gates over
        `batches`; None for a student without a router."""
        router = self.router
        if router is None:
            return None
        fractions = []
        for inputs in batches:
            with self._router_mode(hard_gates=True, router_off=False):
                with router.recording():
                    self.student(**_cast(self.student_graph, inputs))
                    fractions += [f for s in router.step_flops() for f in s["sample_fractions"]]
        return sum(fractions) / len(fractions)

    # -- after training
    def finish(self):
        """The student graph with the trained weights (copied back where the trainer replaced
        parameter objects, e.g. FSDP2), its router in eval mode; returns the graph. Under FSDP2,
        call it while the process group is up: it gathers the shards."""
        reshard = getattr(self.student, "reshard", None)
        if callable(reshard):       # FSDP2: sharded again, whatever the last forward left unsharded
            reshard()
        own = dict(self.student_graph.gm.named_parameters())
        with torch.no_grad():
            for name, p in self.student.named_parameters():
                if name in own and own[name] is not p:
                    own[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
            # The submodules the twin shares with the graph (the router, routed blocks' branches)
            # had their parameters replaced by FSDP2's sharded ones: put whole tensors back.
            for module in self.student_graph.gm.modules():
                for name, p in list(module.named_parameters(recurse=False)):
                    if hasattr(p, "full_tensor"):
                        setattr(module, name, nn.Parameter(p.full_tensor(), p.requires_grad))
        for p in self.student_graph.gm.parameters():
            p.requires_grad_(True)
        if self.router is not None:
            self.router.eval()
        return self.student_graph

    @contextlib.contextmanager
    def _router_mode(self, hard_gates: bool, router_off: bool):
        router = self.router
        if router is None:
            yield
            return
        saved = (router.training, router.force_gates, router.record)
        router.train(not (hard_gates or router_off))
        router.force_gates = True if router_off else None
        router.record = False
        try:
            yield
        finally:
            router.train(saved[0])
            router.force_gates, router.record = saved[1], saved[2]


def _view(graph, tap: Tap):
    frames = frames_view(graph, tap.block, tap.shape)
    if frames is not None:
        return frames
    if len(tap.shape) != 3:
        raise GraphoptError(f"block '{tap.block}' stream has shape {tap.shape}; distillation "
                            f"taps need (batch, tokens, dim) or a known video token layout")
    return lambda s: s.unsqueeze(1)         # one "frame" holding every token


def _collect(taps: list[ValueTap], views) -> list[torch.Tensor]:
    out = []
    for tap, view in zip(taps, views):
        out.append(view(tap.value).float())
        tap.value = None                    # no stale activations between calls
    return out


def _cast(graph, inputs: dict) -> dict:
    """The graph's inputs: those given, cast to the captured dtypes; the rest (masks, image
    states a data batch does not carry) from the example inputs."""
    out = {}
    for k, ref in graph.example_inputs.items():
        v = inputs.get(k, ref)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and isinstance(ref, torch.Tensor):
            v = v.to(ref.dtype)
        out[k] = v
    return out
