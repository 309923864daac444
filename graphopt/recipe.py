"""Recipe: every decision the transform passes made, as versioned JSON.

Replaying a recipe on a fresh capture of the same architecture gives the same graph, bit for bit:
each step names a registered pass and the decisions it took (which heads, which blocks, the
router's shape), and `Pass.apply(graph, decisions)` is deterministic. Weights are not part of the
recipe; `graphopt.save` writes them next to it as safetensors.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
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
        except UnicodeDecodeError:
            raise GraphoptError(f"recipe '{path}' is not text (UTF-8 JSON)") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise GraphoptError(f"'{path}' is not a graphopt recipe (missing schema '{SCHEMA}')")
        if data.get("version") != VERSION:
            raise GraphoptError(f"recipe '{path}' has version {data.get('version')}; this graphopt "
                                f"reads version {VERSION}: upgrade graphopt or re-run compress")
        model, steps = data.get("model", {}), data.get("steps", [])
        _check_model_record(model, path)
        if not isinstance(steps, list):
            raise GraphoptError(f"recipe '{path}': 'steps' must be a list, got {_kind(steps)}")
        from graphopt.pass_manager import get_transform

        for i, step in enumerate(steps):
            where = f"recipe '{path}' step {i}"
            if not isinstance(step, dict):
                raise GraphoptError(f"{where} must be an object, got {_kind(step)}")
            for key, kind in (("pass", str), ("options", dict), ("decisions", dict)):
                if not isinstance(step.get(key), kind):
                    raise GraphoptError(f"{where}: '{key}' must be a {kind.__name__}, got "
                                        f"{_kind(step.get(key))}")
            check_options(get_transform(step["pass"], where), step["options"], f"{where} ({step['pass']})")
        return cls(model=model, steps=steps)

    def rebuild(self, device="cpu", *, batch: int | None = None, dtypes: dict | None = None,
                seeded: bool = False, dynamic_batch: bool = False, replay: bool = True):
        """A fresh capture of the architecture `model` records, at its input spec on `device`,
        with every step replayed (`replay=False`: the capture before the first step).

        Without `seeded` the weights are uninitialised storage (built on the meta device), for
        the caller to overwrite; `seeded` draws them from the families' fixed seed, a model to
        run as it is. `dtypes` (tensor name -> dtype, see serialize.cast_like_checkpoint) gives
        each tensor its dtype before the capture bakes dtypes in; without it all is float32.
        `batch` replaces the recorded batch size."""
        import torch

        from graphopt import families
        from graphopt.capture import capture
        from graphopt.serialize import cast_like_checkpoint

        spec = families.spec_from_recipe(self.model, device)
        if batch is not None:
            spec = replace(spec, batch=batch)
        model = families.build_from_recipe(self.model, device if seeded else "meta")
        if dtypes is not None:
            cast_like_checkpoint(model, dtypes)
        if not seeded and torch.device(device).type != "meta":
            model = model.to_empty(device=device)
        graph = capture(model, spec=spec, dynamic_batch=dynamic_batch)
        return self.replay(graph) if replay else graph

    def replay(self, graph):
        """Apply every step to `graph` (a fresh capture of the recipe's architecture)."""
        from graphopt.pass_manager import get_transform

        for i, step in enumerate(self.steps):
            p = get_transform(step["pass"], f"recipe step {i}")(**step["options"])
            try:
                p.apply(graph, step["decisions"])
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                # Decisions are the pass's own JSON; a malformed one breaks the pass's reading.
                raise GraphoptError(f"recipe step {i} ({p.name}) has malformed decisions "
                                    f"({type(e).__name__}: {str(e)[:80]}): re-run graphopt "
                                    f"compress to write the recipe again") from None
            graph.recipe.add(p.name, step["options"], step["decisions"])
        return graph


def check_options(pass_cls, options: dict, where: str) -> None:
    """Refuse an option of `pass_cls` whose value does not have the type its Options field
    declares (an int option given 2.5 or "2", a list given a string), naming field and type."""
    import dataclasses
    import typing

    fields = getattr(pass_cls, "Options", None)
    if fields is None or not isinstance(options, dict):
        return
    hints = typing.get_type_hints(fields)
    for name, value in options.items():
        if name in hints and not _conforms(value, hints[name]):
            raise GraphoptError(f"{where}: option '{name}' must be {_describe(hints[name])}, got "
                                f"{value!r:.60} ({_kind(value)})")
    known = {f.name for f in dataclasses.fields(fields)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GraphoptError(f"{where} has no option(s) {unknown}; its options are {sorted(known)}")


def _conforms(value, hint) -> bool:
    """Whether JSON `value` fits type `hint` (ints count as floats; bools as neither)."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False
        items = [a for a in args if a is not Ellipsis]
        return len(items) != 1 or all(_conforms(v, items[0]) for v in value)
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            return False
        key, item = args if args else (str, typing.Any)
        return all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    return True                      # a type this check does not know: the pass validates it


def _describe(hint) -> str:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if hint in (tuple, list) or origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis]
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(items[0], _describe(items[0]))}" if len(items) == 1 \
            else "a list"
    if hint is dict or origin is dict:
        return "an object"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_model_record(model, path) -> None:
    """The recipe's `model` record: what load and apply read from it, with the right types."""
    where = f"recipe '{path}': model"
    if not isinstance(model, dict):
        raise GraphoptError(f"{where} must be an object, got {_kind(model)}")
    for key, kinds in (("class_name", (str, type(None))), ("family", (str, type(None))),
                       ("config", (dict,)), ("input_spec", (dict, type(None))),
                       ("source", (str, type(None)))):
        if key in model and not isinstance(model[key], kinds):
            raise GraphoptError(f"{where}.{key} must be {' or '.join(k.__name__ for k in kinds)}, "
                                f"got {_kind(model[key])}")
    spec = model.get("input_spec")
    if spec is not None:
        for key in ("batch", "frames", "height", "width", "text_len"):
            value = spec.get(key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise GraphoptError(f"{where}.input_spec.{key} must be an integer >= 1, got "
                                    f"{value!r:.40}")
        if not isinstance(spec.get("dtype"), str):
            raise GraphoptError(f"{where}.input_spec.dtype must be a string such as "
                                f"'torch.float32', got {spec.get('dtype')!r:.40}")


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _jsonable(obj):
    """Round-trip through JSON types so recipes compare equal before and after saving."""
    return json.loads(json.dumps(obj, default=str))
