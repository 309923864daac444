"""apply: stream a recipe onto a sharded safetensors checkpoint, tensor by tensor (`graphopt apply`).

The model is never in memory. The recipe is replayed on a meta-device capture of its
architecture, which says what becomes of each checkpoint tensor: kept, sliced (the rows/columns
of pruned heads and FFN channels, from each pass's `weight_slices`: the same description the pass applies to a
live graph) or gone (its block was dropped). Then each input shard is read one tensor at a time,
sliced and appended to its output shard, whose header is known in advance. Peak memory: the meta
graph plus about twice the largest tensor. Tensors are read with plain positioned reads, not
mmap: mapped pages of a whole shard would count in the process's resident memory.

Output layout, by what the target can express:

- diffusers, when the result is the same diffusers class with a smaller config (blocks dropped;
  the family's `block_counts` names the config key of each block list). Blocks are renumbered,
  `config.json` updated, and `from_pretrained(OUT)` loads it. Checked before anything is written:
  the class is built from the new config on the meta device and every tensor name and shape must
  match. `recipe.json` is written alongside, for provenance.
- graphopt, otherwise (heads pruned: a diffusers config has one head count per model, tied to
  its width; or blocks routed: diffusers classes have no router). Original tensor names,
  `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` + `recipe.json` +
  `config.json` (the source architecture, as graphopt.save writes it); `graphopt.load(OUT)` loads
  it. Tensors the recipe itself creates (router, head-index buffers) are not written: replaying
  the recipe makes them, identically; the index lists them under metadata `made_by_recipe`.

Resumable: the output is assembled in `.OUT.partial/` next to OUT (marked as graphopt's). Each
shard is written under a temporary name, fsynced, renamed, then recorded in `journal.json`; a
rerun with the same recipe and checkpoint keeps the shards the journal lists, a different recipe
or checkpoint starts over. The folder becomes OUT only when complete, swapped in as
graphopt.io.replace_dir does (OUT is checked before anything is read: see check_output_dir).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graphopt.errors import GraphoptError
from graphopt.io import (atomic_write_text, check_output_dir, mark_dir, read_index, read_marker,
                         replace_dir)

DIFFUSERS_PREFIX = "diffusion_pytorch_model"
GRAPHOPT_PREFIX = "model"
INDEX_SUFFIX = ".safetensors.index.json"
JOURNAL = "journal.json"

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---- reading a checkpoint --------------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    """Where one tensor of a safetensors file lies."""

    file: Path
    offset: int             # absolute byte offset of its data
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


# safetensors' own limit on the JSON header; a larger length field is corrupt or forged.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> dict[str, Stored]:
    """The tensors of a safetensors file, from its header alone, checked against the file: every
    later read is a positioned read of exactly the bytes the header names, so a header that lies
    (offsets past the end, overlapping or leaving gaps, lengths that are not shape × dtype size)
    would otherwise copy another tensor's bytes, or uninitialised memory, into the output."""
    def bad(what: str) -> GraphoptError:
        return GraphoptError(f"'{path}' is not a valid safetensors file: {what}; re-download or "
                             f"re-save it")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise bad(f"it is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise bad(f"its header length field says {n} bytes, the file holds {size - 8} "
                          f"after it (safetensors allows at most {MAX_HEADER_BYTES})")
            raw = f.read(n)
    except OSError as e:
        raise GraphoptError(f"cannot read '{path}' ({e.strerror})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:     # JSONDecodeError and UnicodeDecodeError too
        raise bad(f"its header does not parse as JSON with unique names ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        out[name] = _stored(path, 8 + n, name, info, bad)
    # The data section is the tensors back to back, each exactly once: no gap, no overlap, no tail.
    data, end, before = size - 8 - n, 0, None
    for name, s in sorted(out.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        begin = s.offset - 8 - n
        if begin != end:
            what = "they overlap" if begin < end else f"a gap of {begin - end} bytes"
            prev = f"tensor '{before}' before it ends" if before else "the data section starts"
            raise bad(f"tensor '{name}' starts at data byte {begin}, {prev} at {end}: {what}")
        end, before = begin + s.nbytes, name
        if end > data:
            raise bad(f"tensor '{name}' ends at data byte {end}, past the end of the file "
                      f"({data} data bytes): truncated, or a forged header")
    if end != data:
        raise bad(f"its tensors end at data byte {end}, the file holds {data}: {data - end} "
                  f"trailing bytes are no tensor's")
    return out


def _no_duplicate_keys(pairs: list) -> dict:
    # json.loads would keep the last of two same-named tensors and say nothing.
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"'{key}' appears twice")
        seen.add(key)
    return dict(pairs)


def _stored(path: Path, data_start: int, name: str, info, bad) -> Stored:
    """One header entry, its fields checked one by one."""
    if not isinstance(info, dict):
        raise bad(f"tensor '{name}' has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise bad(f"tensor '{name}' has dtype {dtype!r}, which graphopt apply does not know "
                  f"({', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise bad(f"tensor '{name}' has shape {shape!r}, not a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))
            and offsets[0] <= offsets[1]):
        raise bad(f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end] with "
                  f"0 <= begin <= end")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise bad(f"tensor '{name}' spans {offsets[1] - offsets[0]} bytes, its shape {shape} of "
                  f"{dtype} needs {expected}")
    return Stored(path, data_start + offsets[0], expected, DTYPES[dtype], tuple(shape))


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def checkpoint_tensors(folder: Path) -> dict[str, Stored]:
    """Every tensor of a diffusers weights folder: the shards its `*.safetensors.index.json`
    lists, or its single `*.safetensors` file."""
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    singles = sorted(folder.glob("*.safetensors"))
    if len(indexes) == 1:
        weight_map = read_index(indexes[0])[0]
        files = sorted(set(weight_map.values()))
    elif not indexes and len(singles) == 1:
        weight_map, files = None, [singles[0].name]
    else:
        raise GraphoptError(f"'{folder}' must hold one safetensors index (*{INDEX_SUFFIX}) with "
                            f"its shards, or one *.safetensors file; found {len(indexes)} "
                            f"indexes and {len(singles)} .safetensors files")
    out: dict[str, Stored] = {}
    for name in files:
        if not (folder / name).exists():
            raise GraphoptError(f"shard '{name}' listed in the index is missing from '{folder}'")
        for tensor, s in read_header(folder / name).items():
            if tensor in out:
                raise GraphoptError(f"tensor '{tensor}' is in both '{out[tensor].file.name}' and "
                                    f"'{name}' of '{folder}': re-download the checkpoint")
            if weight_map is not None and weight_map.get(tensor, name) != name:
                raise GraphoptError(f"the index of '{folder}' puts tensor '{tensor}' in "
                                    f"'{weight_map[tensor]}', it is in '{name}': re-download "
                                    f"the checkpoint")
            out[tensor] = s
    if weight_map is not None and set(weight_map) != set(out):
        odd = sorted(set(weight_map) ^ set(out))[:3]
        raise GraphoptError(f"the index of '{folder}' and its shards disagree (e.g. {odd}): "
                            f"re-download the checkpoint")
    return out


def _read(stored: Stored, handles: dict) -> torch.Tensor:
    out = torch.empty(stored.shape, dtype=stored.dtype)
    buf = out.reshape(-1).view(torch.uint8).numpy()
    f = handles.get(stored.file)
    if f is None:
        f = handles[stored.file] = open(stored.file, "rb")
    f.seek(stored.offset)
    done = 0
    while done < stored.nbytes:
        n = f.readinto(memoryview(buf)[done:])
        if not n:
            raise GraphoptError(f"'{stored.file}' ends early: the file is truncated")
        done += n
    return out


# ---- the plan --------------------------------------------------------------------------------

@dataclass
class Entry:
    """One output tensor: a checkpoint tensor (sliced), or a value the architecture computes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: Stored | None = None
    value: torch.Tensor | None = None
    slices: dict[int, torch.Tensor] = field(default_factory=dict)   # dim → indices kept

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Plan:
    layout: str                     # "diffusers" or "graphopt"
    why: str                        # why graphopt's layout, when it is
    shards: dict[str, list[Entry]]  # output file name → its tensors, in order
    config: dict                    # config.json to write
    recipe: object
    made_by_recipe: list[str]
    fingerprint: str
    extra: list[str]                # checkpoint tensors with no place in the architecture

    @property
    def prefix(self) -> str:
        return DIFFUSERS_PREFIX if self.layout == "diffusers" else GRAPHOPT_PREFIX


def plan(recipe, weights) -> Plan:
    """What `apply_recipe` will write, decided on the meta device; nothing is read but headers."""
    from graphopt.capture import read_config
    from graphopt.pass_manager import get_pass
    from graphopt.recipe import Recipe

    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    weights = Path(weights)
    if not weights.is_dir():
        raise GraphoptError(f"weights folder '{weights}' not found: give the diffusers model "
                            f"folder (config.json + *.safetensors)")
    source_config = read_config(weights)
    _check_same_architecture(recipe.model, source_config, weights)
    stored = checkpoint_tensors(weights)

    graph = recipe.rebuild("meta", replay=False)     # replayed below, step by step, for the slices
    # What a checkpoint of the architecture holds (a capture's state_dict is its model's).
    persistent = {k: tuple(v.shape) for k, v in graph.gm.state_dict().items()}
    original = {k: (tuple(v.shape), v.dtype) for k, v in _tensors(graph).items()}
    extra = _check_checkpoint(stored, persistent, weights)
    fingerprinted = stored
    stored = {k: v for k, v in stored.items() if k in persistent}

    slices: dict[str, dict[int, torch.Tensor]] = {}
    for step in recipe.steps:
        p = get_pass(step["pass"])(**step["options"])
        for name, dim, idx in p.weight_slices(graph, step["decisions"]):
            prev = slices.setdefault(name, {}).get(dim)
            slices[name][dim] = idx if prev is None else prev[idx]
        p.apply(graph, step["decisions"])
        graph.recipe.add(p.name, step["options"], step["decisions"])
    final = {k: tuple(v.shape) for k, v in _tensors(graph).items()}
    for name, (shape, _) in original.items():
        if name in final and final[name] != _sliced_shape(shape, slices.get(name, {})):
            raise GraphoptError(f"replaying the recipe changes '{name}' from {shape} to "
                                f"{final[name]} in a way no pass's weight_slices describes: "
                                f"graphopt apply cannot stream it (a graphopt bug; report it)")
    made_by_recipe = sorted(set(final) - set(original))

    kept = [n for n in original if n in final]
    computed = [n for n in kept if n not in stored]
    rename, new_config, why = _diffusers_target(graph.family, source_config, original, persistent,
                                                final, made_by_recipe, slices)
    layout = "diffusers" if rename is not None else "graphopt"
    values = (_computed_values(recipe.model, computed, stored)
              if layout == "graphopt" and computed else {})

    entries_by_file: dict[Path, list[Entry]] = {}
    for name in kept:
        if name not in stored:
            continue
        s = stored[name]
        out_name = rename(name) if rename is not None else name
        entries_by_file.setdefault(s.file, []).append(Entry(
            out_name, final[name], s.dtype, source=s, slices=slices.get(name, {})))
    entries = [sorted(entries_by_file[f], key=lambda e: e.source.offset)
               for f in sorted(entries_by_file)]
    if values:
        entries[-1] = entries[-1] + [Entry(n, final[n], values[n].dtype, value=values[n],
                                           slices=slices.get(n, {})) for n in computed]
    prefix = DIFFUSERS_PREFIX if layout == "diffusers" else GRAPHOPT_PREFIX
    shards = {f"{prefix}-{i + 1:05d}-of-{len(entries):05d}.safetensors": e
              for i, e in enumerate(entries)}
    fingerprint = _fingerprint(recipe, layout, fingerprinted, shards)
    config = new_config if layout == "diffusers" else recipe.model["config"]
    return Plan(layout, why, shards, config, recipe, made_by_recipe, fingerprint, extra)


def _tensors(graph) -> dict[str, torch.Tensor]:
    from graphopt.serialize import state_dict

    return state_dict(graph)


def _sliced_shape(shape, slices: dict[int, torch.Tensor]) -> tuple[int, ...]:
    return tuple(len(slices[d]) if d in slices else s for d, s in enumerate(shape))


def _check_same_architecture(model_record: dict, source: dict, weights: Path):
    recipe_cfg = model_record.get("config") or {}
    cls = model_record.get("class_name") or recipe_cfg.get("_class_name")
    if source.get("_class_name") != cls:
        raise GraphoptError(f"the recipe is for {cls}, '{weights / 'config.json'}' is for "
                            f"{source.get('_class_name')}: apply the recipe to the checkpoint "
                            f"it was made for")
    differ = [k for k, v in recipe_cfg.items() if not k.startswith("_") and k in source
              and json.dumps(v) != json.dumps(source[k])]
    if differ:
        k = differ[0]
        raise GraphoptError(f"the recipe was made for {k}={recipe_cfg[k]!r}, the checkpoint has "
                            f"{k}={source[k]!r} ({len(differ)} config value(s) differ): apply the "
                            f"recipe to the checkpoint it was made for")


def _check_checkpoint(stored: dict[str, Stored], persistent: dict, weights: Path) -> list[str]:
    """Refuse a checkpoint that lacks a tensor of the architecture; the names of its tensors the
    architecture has no place for (they are left out of the output)."""
    missing = sorted(set(persistent) - set(stored))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise GraphoptError(f"the checkpoint in '{weights}' lacks tensor '{missing[0]}'{more}, "
                            f"which its config.json's architecture has: is it complete, and is "
                            f"config.json the one it was saved with?")
    for name, shape in persistent.items():
        if stored[name].shape != shape:
            raise GraphoptError(f"checkpoint tensor '{name}' has shape {stored[name].shape}, "
                                f"config.json gives {shape}: files from different models?")
    return sorted(set(stored) - set(persistent))


_INDEXED = re.compile(r"^(.+?)\.(\d+)\.(.+)$")


def _diffusers_target(family, source_config, original, persistent, final, made_by_recipe, slices):
    """(rename, config, "") when the result is a smaller config of the same diffusers class,
    else (None, None, why not)."""
    from graphopt.families import build_model

    if made_by_recipe:
        return None, None, (f"the recipe adds tensors no diffusers class has "
                            f"({made_by_recipe[0]}, ...: routed blocks)")
    # Block lists: "<list>.<i>." prefixes; a block survives when any of its tensors does.
    survivors: dict[str, dict[int, bool]] = {}
    for name in original:
        m = _INDEXED.match(name)
        if m and m.group(1) in family.block_counts:
            alive = survivors.setdefault(m.group(1), {})
            alive[int(m.group(2))] = alive.get(int(m.group(2)), False) or name in final
    renumber = {lst: {old: new for new, old in enumerate(sorted(i for i, a in alive.items() if a))}
                for lst, alive in survivors.items()}
    config = dict(source_config)
    for lst, mapping in renumber.items():
        config[family.block_counts[lst]] = len(mapping)

    def rename(name: str) -> str:
        m = _INDEXED.match(name)
        if m and m.group(1) in renumber:
            return f"{m.group(1)}.{renumber[m.group(1)][int(m.group(2))]}.{m.group(3)}"
        return name

    target = {k: tuple(v.shape) for k, v in build_model(family, config, "meta").state_dict().items()}
    planned = {rename(n): final[n] for n in persistent if n in final}
    mismatch = sorted(k for k in set(target) | set(planned) if target.get(k) != planned.get(k))
    if mismatch:
        k = mismatch[0]
        what = "heads pruned" if any(slices.values()) else "shapes differ"
        return None, None, (f"{what}: {source_config.get('_class_name')}'s config cannot express "
                            f"the result ('{k}' would be {target.get(k)}, the recipe gives "
                            f"{planned.get(k)})")
    return rename, config, ""


def _computed_values(model_record: dict, names: list[str], stored: dict[str, Stored]
                     ) -> dict[str, torch.Tensor]:
    """Tensors of the graph a checkpoint does not hold (non-persistent buffers such as rotary
    tables): the constructor computes them, so build the model with its parameters on the meta
    device and its buffers real, in the dtypes `graphopt.load` gives a model of these weights."""
    import diffusers
    from accelerate import init_empty_weights

    from graphopt.serialize import cast_like_checkpoint

    config = model_record["config"]
    cls = getattr(diffusers, model_record.get("class_name") or config["_class_name"])
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    cast_like_checkpoint(model, {k: s.dtype for k, s in stored.items()})
    found = dict(model.named_buffers())
    out = {}
    for name in names:
        value = found.get(name)
        if value is None or value.is_meta:
            raise GraphoptError(f"'{name}' is neither in the checkpoint nor computed by the "
                                f"model's constructor: graphopt apply cannot write it")
        out[name] = value
    return out


def _fingerprint(recipe, layout: str, stored: dict[str, Stored], shards: dict) -> str:
    files = sorted({s.file for s in stored.values()})
    h = hashlib.sha256(recipe.to_json().encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    h.update(json.dumps({"layout": layout, "shards": {k: [e.name for e in v]
                                                      for k, v in shards.items()}}).encode())
    return h.hexdigest()


# ---- writing ---------------------------------------------------------------------------------

def apply_recipe(recipe, weights, out, *, overwrite: bool = False, console=None) -> Path:
    """Write the compressed checkpoint of `weights` (a diffusers model folder) that `recipe`
    describes to folder `out` (replaced whole when complete); see the module docstring. `out` is
    checked first (graphopt.io.check_output_dir: never the recipe or the weights, nor a folder
    holding files graphopt did not write unless `overwrite`)."""
    from tqdm.auto import tqdm

    protect = [recipe, weights]
    target = check_output_dir(out, protect=protect, overwrite=overwrite)
    work = target.parent / f".{target.name}.partial"
    _journal(work)                  # a work folder graphopt did not make fails now, not after planning
    p = plan(recipe, weights)
    if p.extra:
        more = f" and {len(p.extra) - 1} more" if len(p.extra) > 1 else ""
        warning = (f"the checkpoint in '{weights}' holds tensor '{p.extra[0]}'{more}, which its "
                   f"config.json's architecture has no place for: left out of the output")
        if console is not None:
            console.print(f"warning: {warning}", soft_wrap=True)
        else:
            warnings.warn(warning, stacklevel=2)
    out = Path(out)
    done = _resume(work, p.fingerprint, console)
    total = sum(e.source.nbytes for es in p.shards.values() for e in es if e.source is not None)
    handles: dict[Path, object] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="apply",
              disable=None) as bar:
        try:
            for name, entries in p.shards.items():
                read = sum(e.source.nbytes for e in entries if e.source is not None)
                if name in done:
                    bar.update(read)
                    continue
                done[name] = _write_shard(work / name, entries, handles, bar)
                atomic_write_text(work / JOURNAL, json.dumps(
                    {"fingerprint": p.fingerprint, "done": done}, indent=1))
        finally:
            for f in handles.values():
                f.close()
    _finish(work, out, p, protect=protect, overwrite=overwrite)
    if console is not None:
        where = ("diffusers layout: from_pretrained loads it" if p.layout == "diffusers" else
                 f"graphopt layout ({p.why}): graphopt.load loads it")
        console.print(f"wrote {out}/ ({len(p.shards)} shard(s), {where})", soft_wrap=True)
    return out


def _resume(work: Path, fingerprint: str, console) -> dict[str, int]:
    """Shards a previous run of the same plan finished (name → bytes); a fresh folder else."""
    if os.path.lexists(work):
        state = _journal(work)
        if state.get("fingerprint") == fingerprint:
            for tmp in work.glob(".*.tmp"):
                tmp.unlink()
            done = {n: b for n, b in state.get("done", {}).items()
                    if (work / n).exists() and (work / n).stat().st_size == b}
            if done and console is not None:
                console.print(f"resuming: {len(done)} shard(s) already written")
            mark_dir(work, "graphopt apply")     # now this process's
            return done
        if console is not None:
            console.print(f"starting over: '{work}' holds a run of another recipe or checkpoint")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    mark_dir(work, "graphopt apply")
    return {}


def _journal(work: Path) -> dict:
    """The journal of work folder `work` ({} if none); refused if graphopt did not make `work`."""
    if not os.path.lexists(work):
        return {}
    try:
        state = json.loads((work / JOURNAL).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        state = {}
    state = state if isinstance(state, dict) else {}
    ours = read_marker(work) is not None or "fingerprint" in state   # journal: made before markers
    if work.is_symlink() or not work.is_dir() or not ours:
        raise GraphoptError(f"'{work}' is in the way: graphopt apply assembles its output there, "
                            f"and did not make this one; move it away")
    return state


def _write_shard(path: Path, entries: list[Entry], handles: dict, bar) -> int:
    """Write one safetensors file, one tensor at a time, under a temporary name; its size."""
    header, offset = {}, 0
    for e in entries:
        header[e.name] = {"dtype": _DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.parent / f".{path.name}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for e in entries:
                t = _read(e.source, handles) if e.source is not None else e.value
                for dim, idx in sorted(e.slices.items()):
                    t = t.index_select(dim, idx)
                t = t.contiguous()
                if tuple(t.shape) != e.shape:
                    raise GraphoptError(f"'{e.name}' came out {tuple(t.shape)}, planned {e.shape}")
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                if e.source is not None:
                    bar.update(e.source.nbytes)
                del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _finish(work: Path, out: Path, p: Plan, *, protect, overwrite: bool):
    weight_map = {e.name: name for name, entries in p.shards.items() for e in entries}
    metadata = {"total_size": sum(e.nbytes for es in p.shards.values() for e in es)}
    if p.layout == "graphopt":
        metadata.update(format="graphopt", made_by_recipe=p.made_by_recipe)
    atomic_write_text(work / f"{p.prefix}{INDEX_SUFFIX}",
                      json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2))
    atomic_write_text(work / "config.json", json.dumps(p.config, indent=2))
    p.recipe.save(work / "recipe.json")
    (work / JOURNAL).unlink()
    replace_dir(work, out, protect=protect, overwrite=overwrite)
