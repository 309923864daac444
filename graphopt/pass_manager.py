"""Passes, their registry, and the pass manager.

Two kinds, one registry (`get_pass(name)`), each with a `name` and validated `Options` (a dataclass
whose `__post_init__` rejects bad values):
- an **analysis** (`Analysis`: head-roles, head-importance, block-importance) measures the graph:
  `run(graph)` returns a result and changes nothing. `graph.analysis(name, **options)` runs it once
  per graph version and keeps the result for the compress report; the transforms that need one ask
  for it there.
- a **transform** (`Pass`: prune, drop, route, cache) changes the graph: `run` splits into
  `decide(graph) -> decisions` (JSON, recorded in the Recipe) and a deterministic
  `apply(graph, decisions)` (what replay calls). `ensures(before, after, inputs)` returns the
  relative error of the promise it makes (prune: equals masking; route with all gates on: equals
  the original), checked by the manager when verification is on.
`PassManager`, `compress` and `Recipe` (its steps, replayed) take transforms only and refuse an
analysis by name (`get_transform`); `graph.analysis` takes analyses only (`get_analysis`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from graphopt.errors import GraphoptError
from graphopt.fxutil import first

_REGISTRY: dict[str, type["Pass | Analysis"]] = {}


def register(cls):
    """Class decorator: make a pass resolvable by name (built-ins and user passes alike)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} needs a `name`")
    if not issubclass(cls, (Pass, Analysis)):
        raise TypeError(f"{cls.__name__} must subclass graphopt.Pass (a transform) or "
                        f"graphopt.Analysis")
    _REGISTRY[cls.name] = cls
    return cls


def get_pass(name: str):
    """The registered class `name`: a transform (`Pass`) or an analysis (`Analysis`)."""
    import graphopt.passes  # noqa: F401  (registers the built-ins)

    if name not in _REGISTRY:
        raise GraphoptError(f"unknown pass '{name}'; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_transform(name: str, where: str = "") -> type["Pass"]:
    """The transform `name`; an analysis is refused with how to run it instead (`where`: the
    recipe step or option that named it, to begin the message)."""
    cls = get_pass(name)
    if cls.kind != "transform":
        raise GraphoptError((f"{where}: " if where else "") + _not_a_transform(name))
    return cls


def get_analysis(name: str) -> type["Analysis"]:
    """The analysis `name`; a transform is refused (running it would change the graph)."""
    cls = get_pass(name)
    if cls.kind != "analysis":
        raise GraphoptError(_not_an_analysis(name))
    return cls


def _not_an_analysis(name: str) -> str:
    analyses = ", ".join(n for n in available() if _REGISTRY[n].kind == "analysis")
    return (f"'{name}' is a transform (it changes the graph), not an analysis: run it with "
            f"graphopt.compress or PassManager, which record it in the recipe; the analyses are "
            f"{analyses}")


def _not_a_transform(name: str) -> str:
    transforms = ", ".join(n for n in available() if _REGISTRY[n].kind == "transform")
    return (f"'{name}' is an analysis (it returns a result and changes nothing), not a transform: "
            f"run it with graph.analysis('{name}', **options), whose result the compress report "
            f"includes; the passes to compress with are {transforms}")


def available() -> list[str]:
    import graphopt.passes  # noqa: F401

    return sorted(_REGISTRY)


@dataclass
class PassResult:
    name: str
    decisions: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    verified_error: float | None = None
    not_verified: str | None = None     # why verification was asked for and skipped ("meta")

    def check(self) -> str:
        """What verification found, for the console and the report ("" when not asked for)."""
        if self.not_verified is not None:
            return f"not verified ({self.not_verified})"
        return "" if self.verified_error is None else \
            f"verified (rel. error {self.verified_error:.2g})"


class _Configured:
    """A name and its validated options, given as an Options object or as keyword options."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    Options: ClassVar[type] = None

    def __init__(self, options=None, **kwargs):
        opts_cls = self.Options
        if options is not None and kwargs:
            raise TypeError("give either an Options object or keyword options, not both")
        if options is None:
            known = {f.name for f in dataclasses.fields(opts_cls)} if opts_cls else set()
            unknown = set(kwargs) - known
            if unknown:
                raise GraphoptError(f"pass '{self.name}' has no option(s) {sorted(unknown)}; "
                                    f"its options are {sorted(known)}")
            options = opts_cls(**kwargs) if opts_cls else None
        self.options = options

    def options_dict(self) -> dict:
        return dataclasses.asdict(self.options) if self.options is not None else {}


class Analysis(_Configured):
    """Measures a graph: `run(graph)` returns a result (with `to_markdown`/`plot` where it can be
    reported) and leaves the graph as it was."""

    kind: ClassVar[str] = "analysis"

    def run(self, graph):
        raise NotImplementedError


class Pass(_Configured):
    """A transform: `decide` (recorded in the recipe), then `apply` (replayed from it)."""

    kind: ClassVar[str] = "transform"
    tolerance: ClassVar[float] = 1e-5

    def decide(self, graph) -> dict:
        return {}

    def apply(self, graph, decisions: dict) -> None:
        raise NotImplementedError

    def summarize(self, graph, decisions) -> dict:
        return {}

    def describe(self, decisions: dict) -> list[str]:
        """Markdown lines saying what the decisions changed (for the report of `compress`)."""
        return []

    def weight_slices(self, graph, decisions: dict) -> list[tuple[str, int, torch.Tensor]]:
        """Stored weights `apply(graph, decisions)` shrinks, as (path, dim, indices kept along it).

        `graphopt apply` slices the same tensors of a checkpoint on disk with this; it refuses a
        pass that changes a weight's shape without saying so here.
        """
        return []

    def run(self, graph) -> PassResult:
        decisions = self.decide(graph)
        stats_before = _size(graph)
        self.apply(graph, decisions)
        graph.recipe.add(self.name, self.options_dict(), decisions)
        return PassResult(self.name, decisions, {**stats_before, **_size(graph, "after_"),
                                                 **self.summarize(graph, decisions)})

    def ensures(self, before, after, inputs: dict) -> float:
        """Relative error between what the pass promises and what it produced."""
        return rel_error(first(after(**inputs)), first(before(**inputs)))


def _size(graph, prefix="before_") -> dict:
    from graphopt.cost import model_cost

    c = model_cost(graph)
    return {prefix + "flops": c.flops, prefix + "params": c.params}


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class PassManager:
    """Runs transforms in order, optionally verifying each one's promise on a calibration batch."""

    def __init__(self, passes: list[Pass], *, verify: bool = False, inputs: dict | None = None,
                 progress=None):
        for p in passes:
            if getattr(p, "kind", None) != "transform":
                raise GraphoptError(_not_a_transform(getattr(p, "name", type(p).__name__)))
        self.passes = passes
        self.verify = verify
        self.inputs = inputs
        self.progress = progress

    def run(self, graph) -> list[PassResult]:
        results = []
        for p in self.passes:
            where = _where(p.name, [r.name for r in results])
            verify = self.verify and not graph.is_meta
            reference = graph.copy() if verify else None
            t0 = time.perf_counter()
            try:
                result = p.run(graph)
            except GraphoptError as e:
                raise GraphoptError(f"{where}: {e}") from e
            except Exception as e:      # a bug: its traceback stays, with where it happened
                e.add_note(where)
                raise
            result.seconds = time.perf_counter() - t0
            if self.verify and not verify:
                result.not_verified = "meta"    # no weights to run the check on
            if reference is not None:
                inputs = self.inputs or graph.example_inputs
                with torch.no_grad():
                    err = p.ensures(reference, graph, inputs)
                result.verified_error = err
                if not err <= p.tolerance:
                    raise GraphoptError(f"{where} broke its promise: relative error "
                                        f"{err:.3g} > {p.tolerance:g}. This is a graphopt bug; "
                                        f"please report it with the recipe")
            results.append(result)
            if self.progress is not None:
                self.progress(result)
        return results


def _where(name: str, done: list[str]) -> str:
    return f"pass '{name}' (after {', '.join(done)})" if done else f"pass '{name}' (no pass ran before it)"
