"""torch.export archives (`.pt2`), read without running code from the file.

`torch.export.load` trusts its file. In torch 2.13 it unpickles the sample inputs
(data/sample_inputs/<model>.pt, with a torch.load that falls back to weights_only=False), every weight
and constant whose payload config says use_pickle, custom and opaque objects (constants named
custom_obj_* / opaque_obj_*), the older weights/constants files data/{weights,constants}/<model>.pt,
and in the legacy format (serialized_exported_program.json at the top) serialized_state_dict,
serialized_constants and serialized_example_inputs; it loads AOTInductor libraries. Strings of the
graph JSON run as Python too: shape expressions through sympy.sympify, guards through exec, treespec
contexts may name a module to import, and names are pasted into the generated forward.

With `trust_pickle`, graphopt calls torch.export.load. Without it, graphopt reads models/model.json,
the weights and the constants itself, with torch's own readers, after checking all of the above: a
member it would have to unpickle is refused by name; the graph may hold only names, and shape
expressions and guards of the forms torch writes (torch's verifier, run while deserializing, refuses
call targets that are not operators). The sample inputs are never read: example inputs are made from
the graph's placeholders (the shapes and dtypes recorded in models/model.json).
"""
from __future__ import annotations

import ast
import json
import re
import zipfile
import zlib
from pathlib import Path

import torch

from graphopt.errors import GraphoptError

MODEL = "model"                                   # the program torch.export.load returns
GRAPH = f"models/{MODEL}.json"
LEGACY_GRAPH = "serialized_exported_program.json"
LEGACY_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt",
                  "serialized_state_dict.json", "serialized_constants.json")   # all go to torch.load

_NAME = re.compile(r"[\w.]*")                     # names and dotted paths: nothing to break out of
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|[-+]?inf|nan", re.IGNORECASE)
_TEXT_KEYS = {"metadata", "as_string", "as_strings", "torch_version"}   # repr'd or never code
# Everything sympy.srepr writes for the shape expressions torch.export records.
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs",
    "floor", "ceiling", "Eq", "Ne", "StrictLessThan", "LessThan", "StrictGreaterThan",
    "GreaterThan", "And", "Or", "Not", "true", "false", "oo", "zoo", "nan", "Piecewise",
    "ExprCondPair", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt",
    "RoundDecimal", "ToFloat", "Identity"}
_SYMPY_STRING_ARGS = {"Symbol": re.compile(r"[A-Za-z_]\w*"), "Float": _NUMBER}
_GUARD_METHODS = {"size", "stride", "storage_offset", "dim"}
_GUARD_MATH = {"floor", "ceil", "trunc", "sqrt", "log2"}
_ARITHMETIC = (ast.Expression, ast.Load, ast.UnaryOp, ast.USub, ast.UAdd, ast.BinOp, ast.Add,
               ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Constant)
_GUARD_NODES = _ARITHMETIC + (ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
                              ast.BoolOp, ast.And, ast.Or, ast.Not, ast.Subscript, ast.Attribute,
                              ast.Call, ast.Name)


def load_exported(path: Path, *, trust_pickle: bool) -> torch.export.ExportedProgram:
    """The program in the archive at `path` (see the module docstring for what is checked)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            # torch's reader does not check CRCs: a corrupt weight would load as wrong numbers.
            broken = zf.testzip()
    except zipfile.BadZipFile:
        raise GraphoptError(f"'{path}' is not a torch.export archive (not a zip file); write it "
                            f"with torch.export.save(torch.export.export(model, ...), path)") from None
    except (OSError, EOFError, zlib.error) as e:
        raise GraphoptError(f"'{path}' is a damaged zip file ({e}): copy or save it again") from None
    if broken is not None:
        raise GraphoptError(f"'{path}': member {broken} fails its CRC check, so the file is "
                            f"corrupt: copy or save it again")
    if trust_pickle:
        return _read(path, lambda: torch.export.load(path))
    if LEGACY_GRAPH in names:
        pickled = [n for n in LEGACY_PICKLES if n in names]
        if pickled:
            _refuse(path, pickled[0], "a pickle (this legacy torch.export format pickles its weights)")
        raise GraphoptError(f"'{path}' is in the legacy torch.export format without weights; "
                            f"re-save it with a current torch.export.save")
    return _read(path, lambda: _load_checked(path))


def _read(path, load):
    try:
        return load()
    except GraphoptError:
        raise
    except Exception as e:  # torch's readers raise many kinds for foreign or corrupt archives
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphoptError(f"cannot read torch.export archive '{path}': {first}. It may be "
                            f"corrupt, not written by torch.export.save, or from an incompatible "
                            f"torch version") from None


def _refuse(path, member: str, what: str):
    raise GraphoptError(f"'{path}': member {member} is {what}, and loading it can run code; pass "
                        f"--trust-pickle if you trust the file")


def _load_checked(path: Path) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
    from torch.export.pt2_archive._package import (PT2ArchiveReader, _load_constants,
                                                   _load_state_dict)

    try:
        reader = PT2ArchiveReader(str(path))
    except Exception:  # no version record, no archive_format, entries outside one folder
        raise GraphoptError(f"'{path}' is a zip file but not a torch.export archive; write it "
                            f"with torch.export.save") from None
    # One reader for the checks and the loading, so both see the same bytes of each member.
    with reader:
        names = set(reader.get_file_names())
        if GRAPH not in names:
            raise GraphoptError(f"'{path}' is a zip file but holds no torch.export program "
                                f"({GRAPH}); write it with torch.export.save")
        _check_payloads(reader, names, path)
        graph_bytes = reader.read_bytes(GRAPH)
        _check_graph(json.loads(graph_bytes.decode("utf-8")), path)
        state_dict = _load_state_dict(reader, MODEL)      # raw tensors only: checked above
        constants = _load_constants(reader, MODEL)
    serialized = _bytes_to_dataclass(schema.ExportedProgram, graph_bytes)
    # No sample inputs; torch's verifier, run here, refuses call targets that are not operators.
    return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)


def _check_payloads(reader, names: set[str], path) -> None:
    """Refuse what torch's `_load_state_dict` / `_load_constants` would unpickle."""
    for kind in ("weights", "constants"):
        folder = f"data/{kind}/"
        if f"{folder}{MODEL}.pt" in names:
            _refuse(path, f"{folder}{MODEL}.pt", f"a pickle (the older layout of the {kind})")
        config_name = f"{folder}{MODEL}_{kind}_config.json"
        if config_name not in names:
            continue                                      # torch reports the missing config
        config = json.loads(reader.read_string(config_name)).get("config", {})
        for fqn, meta in config.items():
            member = f"{folder}{meta.get('path_name')}"
            if not (_NAME.fullmatch(fqn) and _NAME.fullmatch(str(meta.get("path_name")))):
                _refuse(path, config_name, f"a config naming {fqn!r}, which torch pastes into code")
            if meta.get("use_pickle") or str(meta.get("path_name")).startswith(
                    ("custom_obj_", "opaque_obj_")):
                _refuse(path, member, f"a pickle (the {kind[:-1]} '{fqn}')")


def _check_graph(node, path) -> None:
    """Walk the graph JSON: every string must be a name unless torch only prints it; shape
    expressions, guards and treespecs must have the forms torch writes."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_name(k, path)
            if k in _TEXT_KEYS:
                continue
            if k == "expr_str":
                _check_expression(v, path)
            elif k == "guards_code":
                for guard in v:
                    _check_guard(guard, path)
            elif k in ("in_spec", "out_spec"):
                _check_treespec(v, path)
            else:
                _check_graph(v, path)
    elif isinstance(node, list):
        for v in node:
            _check_graph(v, path)
    else:
        _check_name(node, path)


def _bad_graph(path, what: str):
    _refuse(path, GRAPH, f"a graph holding {what}")


def _check_name(text, path) -> None:
    if isinstance(text, str) and not _NAME.fullmatch(text):
        _bad_graph(path, f"the name {text[:60]!r}, which torch pastes into generated code")


def _parse(text) -> list[ast.AST] | None:
    try:
        return list(ast.walk(ast.parse(str(text), mode="eval")))
    except SyntaxError:
        return None


def _check_expression(text, path) -> None:
    """A shape expression as sympy.srepr writes it; torch evaluates it with sympy.sympify."""
    nodes = _parse(text)
    # Strings only as Symbol's name and Float's digits: sympy functions sympify string arguments.
    string_args = {id(n.args[0]): _SYMPY_STRING_ARGS[n.func.id] for n in nodes or []
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                   and n.func.id in _SYMPY_STRING_ARGS and n.args}

    def allowed(n) -> bool:
        if isinstance(n, ast.Constant):
            return not isinstance(n.value, str) or bool(
                id(n) in string_args and string_args[id(n)].fullmatch(n.value))
        if isinstance(n, ast.Name):
            return n.id in _SYMPY_NAMES
        if isinstance(n, ast.Call):
            return isinstance(n.func, ast.Name)
        if isinstance(n, ast.keyword):
            return n.arg is not None and isinstance(n.value, ast.Constant)
        return isinstance(n, (ast.Tuple, *_ARITHMETIC))

    if nodes is None or not all(allowed(n) for n in nodes):
        _bad_graph(path, f"the shape expression {str(text)[:60]!r}, which torch evaluates as "
                         f"Python")


def _check_guard(text, path) -> None:
    """A guard on input sizes (L['x'].size()[0] >= 2, ...); torch compiles it with exec."""
    def allowed(n) -> bool:
        if isinstance(n, ast.Name):
            return n.id in ("L", "math")
        if isinstance(n, ast.Attribute):
            if isinstance(n.value, ast.Name) and n.value.id == "math":
                return n.attr in _GUARD_MATH
            return n.attr in _GUARD_METHODS
        if isinstance(n, ast.Constant):
            return not isinstance(n.value, str) or re.fullmatch(r"\w+", n.value) is not None
        return isinstance(n, _GUARD_NODES)

    nodes = _parse(text)
    if nodes is None or not all(allowed(n) for n in nodes):
        _bad_graph(path, f"the guard {str(text)[:60]!r}, which torch runs as Python")


def _check_treespec(text, path) -> None:
    """The input/output structure; torch decodes contexts with an object hook that imports
    modules named in them, and pastes keyword names into the generated forward."""
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE, SUPPORTED_SERIALIZED_TYPES

    def plain(value) -> bool:
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and _NAME.fullmatch(value) is not None)

    def visit(spec) -> None:
        if not isinstance(spec, dict):
            _bad_graph(path, "a malformed input/output treespec")
        typ, context = spec.get("type"), spec.get("context")
        py_type = SERIALIZED_TYPE_TO_PYTHON_TYPE.get(typ)
        custom = py_type is not None and SUPPORTED_SERIALIZED_TYPES[py_type].from_dumpable_context
        if typ == "collections.namedtuple":
            ok = isinstance(context, str) and _NAME.fullmatch(context) is not None
        elif custom:
            ok = False                    # e.g. defaultdict: its factory is imported by name
        else:
            try:
                ok = context is None or plain(json.loads(context))
            except (TypeError, ValueError):
                ok = False
        if not ok:
            _bad_graph(path, f"an input/output of type {str(typ)[:40]} with context "
                             f"{str(context)[:40]!r}, which torch decodes as Python")
        for child in spec.get("children_spec") or []:
            visit(child)

    try:
        _protocol, schema = json.loads(text)
    except (TypeError, ValueError):
        _bad_graph(path, "a malformed input/output treespec")
    visit(schema)


def example_inputs(ep: torch.export.ExportedProgram) -> dict:
    """The forward kwargs for `ep`: its sample inputs where it carries them (an in-memory program,
    or an archive loaded with trust), else inputs of the shapes and dtypes the graph's placeholders
    record (floats: seeded normal values; integers and booleans: zeros)."""
    from torch.export.graph_signature import ConstantArgument, InputKind

    user = [s.arg for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    if ep.example_inputs:
        args, kwargs = ep.example_inputs
    else:
        placeholders = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
        generator = torch.Generator().manual_seed(0)
        flat = [arg.value if isinstance(arg, ConstantArgument) else
                _synthesize(arg.name, placeholders.get(arg.name), generator) for arg in user]
        args, kwargs = torch.utils._pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return {**dict(zip([a.name for a in user], args)), **kwargs}


def _synthesize(name: str, val, generator):
    if isinstance(val, (bool, int, float)):
        return val
    if isinstance(val, torch.SymInt):
        return _hint(name, val)
    if not isinstance(val, torch.Tensor):
        raise GraphoptError(f"the exported program's input '{name}' records no tensor shape; pass "
                            f"example_inputs to capture()")
    shape = [_hint(name, d) for d in val.shape]
    if val.dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype=val.dtype, device=val.device)
    return torch.zeros(shape, dtype=val.dtype, device=val.device)


def _hint(name: str, size) -> int:
    if isinstance(size, int):
        return size
    hint = size.node.hint
    if hint is None:
        raise GraphoptError(f"the exported program's input '{name}' has a dynamic size without "
                            f"an example value; pass example_inputs to capture()")
    return int(hint)


# ---- what an exported program is: family, config, input spec -----------------------------------

def identify(ep: torch.export.ExportedProgram, inputs: dict):
    """(family, config, spec) of an exported diffusion transformer, from the archive itself: the
    root class in the graph's module stack names the family; the config is the family's tiny or a
    published one (at the block counts the weights have) whose weight shapes equal the program's;
    the InputSpec is the one whose example inputs have the program's input shapes. (None, {}, None)
    for a model graphopt has no family for; (family, {}, None) where config or spec is not found
    (then nothing needs the token layout: role-aware pruning says so)."""
    from graphopt import families

    class_name = _root_class(ep)
    try:
        family = families.family_for(class_name) if class_name else None
    except GraphoptError:
        return None, {}, None
    shapes = {k: tuple(v.shape) for k, v in ep.state_dict.items()}
    config = next((c for c in _candidate_configs(family, class_name, shapes)
                   if _weight_shapes(family, c) == shapes), None)
    if config is None:
        return family, {}, None
    return family, config, _find_spec(family, config, inputs)


def _root_class(ep) -> str | None:
    for node in ep.graph.nodes:
        for path, kind in (node.meta.get("nn_module_stack") or {}).values():
            if path == "":
                return str(kind).rsplit(".", 1)[-1]
    return None


def _candidate_configs(family, class_name: str, shapes: dict):
    """The family's tiny config and its published ones for `class_name`, each with its block
    counts set to those the weights have (blocks.<i>. names)."""
    from graphopt.family_configs import PUBLISHED

    bases = [dict(family.tiny_config)] + [dict(c) for c, _ in PUBLISHED.values()]
    counts = {}
    for name in shapes:
        parts = name.split(".")
        if len(parts) > 2 and parts[1].isdigit():
            counts[parts[0]] = max(counts.get(parts[0], 0), int(parts[1]) + 1)
    for base in bases:
        if base.get("_class_name", family.class_names[0]) != class_name:
            continue
        keys = dict(family.block_counts)
        if not keys and len(counts) == 1 and "num_layers" in base:
            keys = {next(iter(counts)): "num_layers"}     # one stack of blocks: its depth
        yield {**base, "_class_name": class_name,
               **{key: counts[stack] for stack, key in keys.items() if stack in counts}}


def _weight_shapes(family, config) -> dict:
    from graphopt import families

    try:
        model = families.build_model(family, config, "meta")
    except Exception:  # a candidate config this diffusers version cannot build is no match
        return {}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _find_spec(family, config, inputs: dict):
    """The InputSpec whose example inputs (built on the meta device) have the shapes and values
    of `inputs`, or None."""
    from graphopt.layout import InputSpec

    latent = inputs.get(family.latent_input)
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
        return None
    text = next((inputs[k] for k in family.text_inputs
                 if isinstance(inputs.get(k), torch.Tensor) and inputs[k].dim() >= 2), None)
    text_len = int(text.shape[1]) if text is not None else 1
    shape = tuple(latent.shape)
    axes = {"BCFHW": lambda s: [(s[2], s[3], s[4])], "BFCHW": lambda s: [(s[1], s[3], s[4])],
            "BCHW": lambda s: [(1, s[2], s[3])], "BNC": lambda s: _factorizations(s[1])}
    grids = axes.get(family.latent_layout, lambda s: [])(shape) if len(shape) >= 3 else []
    want = _signature(inputs)
    for frames, height, width in grids:
        try:
            spec = InputSpec(batch=int(shape[0]), frames=int(frames), height=int(height),
                             width=int(width), text_len=text_len, dtype=latent.dtype, device="meta")
            if _signature(family.example_inputs(config, spec)) == want:
                return InputSpec(**{**spec.__dict__, "device": latent.device})
        except (GraphoptError, ValueError, TypeError):
            continue
    return None


def _factorizations(n: int, limit: int = 20000):
    """(a, b, c) with a*b*c == n, at most `limit` of them (packed tokens: the grid is unknown)."""
    found = 0
    for a in range(1, n + 1):
        if n % a:
            continue
        for b in range(1, n // a + 1):
            if (n // a) % b:
                continue
            yield a, b, n // a // b
            found += 1
            if found >= limit:
                return


def _signature(inputs: dict) -> dict:
    """What must agree between two sets of forward kwargs: tensor shapes and dtypes, other values."""
    return {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}
