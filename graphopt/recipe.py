"""Recipe: every decision the transform passes made, as versioned JSON.

Replaying a recipe on a fresh capture of the same architecture gives the same graph, bit for bit:
each step names a registered pass and the decisions it took (which heads, which blocks, the
router's shape), and `Pass.apply(graph, decisions)` is deterministic. Weights are not part of the
recipe; `graphopt.save` writes them next to it as safetensors.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from graphopt.errors import GraphoptError
from graphopt.io import atomic_write_text

SCHEMA = "graphopt.recipe"
VERSION = 1


@dataclass
class Recipe:
    model: dict = field(default_factory=dict)   # class name, config, input spec of the capture
    steps: list[dict] = field(default_factory=list)

    @classmethod
    def new(cls, graph) -> "Recipe":
        spec = graph.spec
        class_name = graph.config.get("_class_name") or (
            graph.family.class_names[0] if graph.family is not None else None)
        config = {"_class_name": class_name, **graph.config} if graph.config else {}
        return cls(model={
            "class_name": class_name,
            "family": graph.family.name if graph.family is not None else None,
            "config": _jsonable(config),
            "input_spec": None if spec is None else {
                "batch": spec.batch, "frames": spec.frames, "height": spec.height,
                "width": spec.width, "text_len": spec.text_len, "dtype": str(spec.dtype)},
            "source": graph.source,
        })

    def add(self, pass_name: str, options: dict, decisions: dict):
        self.steps.append({"pass": pass_name, "options": _jsonable(options),
                           "decisions": _jsonable(decisions)})

    def copy(self) -> "Recipe":
        return copy.deepcopy(self)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, "version": VERSION, "model": self.model,
                           "steps": self.steps}, indent=2, sort_keys=True)

    def save(self, path):
        atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path) -> "Recipe":
        path = Path(path)
        if not path.exists():
            raise GraphoptError(f"recipe '{path}' not found")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise GraphoptError(f"recipe '{path}' is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise GraphoptError(f"'{path}' is not a graphopt recipe (missing schema '{SCHEMA}')")
        if data.get("version") != VERSION:
            raise GraphoptError(f"recipe '{path}' has version {data.get('version')}; this graphopt "
                                f"reads version {VERSION}: upgrade graphopt or re-run compress")
        return cls(model=data.get("model", {}), steps=list(data.get("steps", [])))

    def replay(self, graph):
        """Apply every step to `graph` (a fresh capture of the recipe's architecture)."""
        from graphopt.pass_manager import get_pass

        for step in self.steps:
            p = get_pass(step["pass"])(**step["options"])
            p.apply(graph, step["decisions"])
            graph.recipe.add(p.name, step["options"], step["decisions"])
        return graph


def _jsonable(obj):
    """Round-trip through JSON types so recipes compare equal before and after saving."""
    return json.loads(json.dumps(obj, default=str))
