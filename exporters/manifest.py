"""The segmented ONNX layout's contract: one JSON manifest tying prologue, blocks and epilogue together.

A compressed DiT is cut into segments that a host-side orchestrator (`graphopt.exporters.runtime`)
chains once per denoising step:

    prologue.onnx   model inputs -> stream tensor(s), side tensors, and `gates` (routed models only)
    block_XX.onnx   stream tensors + side tensors it reads -> the stream's next value
    epilogue.onnx   stream + side tensors -> model outputs

Names are the contract. Model inputs carry the diffusers forward argument names (`hidden_states`,
`timestep`, `encoder_hidden_states`, ...) so the orchestrator can stand in for `pipe.transformer`.
A block reads stream tensor `S` under the name `S` and writes its new value under `S + "_next"`
(ONNX is single-assignment: a graph cannot output a new value under one of its input names).
Every other block/epilogue input is a model input or a prologue output (a "side tensor": timestep
projections, rotary tables, projected text states...). `gates` is a bool tensor [batch, n_routed];
a block with `gate: k` runs for a sample iff gates[sample, k]; a block with `gate: null` always runs.

The manifest file (all keys required unless marked optional):

    {
      "format": "graphopt-segmented", "version": 1,
      "batch_dim": "batch",                        # symbolic name of the batch axis (axis 0 of stream/gates)
      "dims": {"batch": {"min": 1, "opt": 2, "max": 4}},   # optional: TensorRT profile range per symbolic dim
      "config": {...},                             # optional: the source transformer's config (model.config)
      "fixed_inputs": {"num_frames": 8, ...},      # optional: non-tensor forward arguments baked in at export
      "inputs":  [{"name": "hidden_states", "dtype": "float32", "shape": ["batch", 16, 21, 60, 104]}, ...],
      "outputs": [{"name": "sample", "dtype": "float32", "shape": [...]}],   # outputs[0] is what the call returns first
      "stream": ["x"],                             # residual-stream tensor names (prologue outputs)
      "gates": "gates",                            # prologue output name, or null when the model is not routed
      "reuse": {"valid": "cache_valid", "timestep": "timestep", "latent": "hidden_states"},   # optional
      "segments": [
        {"kind": "prologue", "file": "prologue.onnx", "inputs": [...], "outputs": [...]},
        {"kind": "block", "file": "block_00.onnx", "block": 0, "gate": null, "inputs": [...], "outputs": [...]},
        {"kind": "block", "file": "block_01.onnx", "block": 1, "gate": 0, "inputs": [...], "outputs": [...],
         "reuse": {"slots": {"x": "blocks_1_s0"}}},    # optional: a skipped sample gets x + its cached residual
        {"kind": "block", "file": "block_02.onnx", "block": 2, "gate": 1, "inputs": [...], "outputs": [...],
         "reuse": {"slots": {"x": "blocks_2_s0"},      # optional, route skip="forecast": that residual
                   "forecast": {"slopes": {"x": "blocks_2_s0_slope"}, "time": "blocks_2_time"}}},  # extrapolated
        {"kind": "epilogue", "file": "epilogue.onnx", "inputs": [...], "outputs": [...]}
      ]
    }

A shape lists ints (fixed) and names (symbolic, e.g. "batch"); dtypes use numpy-style names
("float32", "float16", "bfloat16", "int64", "int32", "bool", ...). `file` is relative to the
manifest's folder. `block` is the block's index in the compressed model (strictly increasing).

Residual reuse (route skip="reuse", the cache pass): the runtime keeps the cache slots on the device,
one set per cache context, and feeds the prologue `reuse.valid` (bool []: the slots hold this sampling
run's values; the router then gates freely, else every block runs). A block with `reuse.slots`: where a
sample's gate is off it gets stream + slot, where on its output, and slot := output − stream. With
`reuse.forecast` as well, a skipped sample gets stream + slot + slope·(t − time) (t: its timestep), and
where it computes, slope := (new slot − slot)/(t − time) (0 while the slots are invalid), time := t. A block
with `reuse.cache` is the cache pass's run of cached blocks; the runtime decides it once per step on
the host with the rule's own functions (passes/cache.py `cache_step`).

Integrity: `save` adds "files": {"block_00.onnx": "sha256:<hex>", ...}, the hash of every segment
file and of every external-data file those name; `load` checks each (swapped or edited files are
refused; a manifest written before hashes existed loads without the check). Segment files and
their external data must lie inside the manifest's folder: no absolute path, no '..', no link
leading out.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from graphopt.errors import GraphoptError
from graphopt.exporters.specs import Segment, TensorSpec, compare_io, file_hash, onnx_external_data, require_keys
from graphopt.io import atomic_write_text, inside_folder

FORMAT = "graphopt-segmented"
VERSION = 1
NEXT_SUFFIX = "_next"


def next_name(stream_name: str) -> str:
    """The block output name that carries stream tensor `stream_name`'s new value."""
    return stream_name + NEXT_SUFFIX


@dataclass(frozen=True)
class DimRange:
    """TensorRT optimization-profile range of one symbolic dim: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max)):
            raise GraphoptError(f"dim range needs ints, got min={self.min!r} opt={self.opt!r} max={self.max!r}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise GraphoptError(
                f"dim range must satisfy 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )


@dataclass
class SegmentedManifest:
    """The whole layout. `root` is the folder the segment files are relative to (not serialized)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    stream: tuple[str, ...]
    gates: str | None
    segments: tuple[Segment, ...]
    dims: dict[str, DimRange] = field(default_factory=dict)
    batch_dim: str = "batch"
    config: dict[str, Any] = field(default_factory=dict)
    fixed_inputs: dict[str, Any] = field(default_factory=dict)
    # Residual reuse: {"valid": prologue input the runtime feeds (the caches hold this run's
    # values), "timestep": ..., "latent": ... (model inputs a new sampling run is detected from)}.
    reuse: dict[str, str] | None = None
    root: Path | None = None
    files: dict[str, str] = field(default_factory=dict)    # relative path -> "sha256:<hex>"

    def __post_init__(self) -> None:
        self.inputs = tuple(self.inputs)
        self.outputs = tuple(self.outputs)
        self.stream = tuple(self.stream)
        self.segments = tuple(self.segments)
        self.dims = {k: v if isinstance(v, DimRange) else DimRange(**v) for k, v in self.dims.items()}

    # -- views ------------------------------------------------------------------------------------

    @property
    def prologue(self) -> Segment:
        return self.segments[0]

    @property
    def blocks(self) -> tuple[Segment, ...]:
        return self.segments[1:-1]

    @property
    def epilogue(self) -> Segment:
        return self.segments[-1]

    @property
    def n_routed(self) -> int:
        return sum(1 for b in self.blocks if b.routed)

    def stream_spec(self, name: str) -> TensorSpec:
        return self.prologue.output(name)

    def path_of(self, segment: Segment) -> Path:
        if self.root is None:
            raise GraphoptError("manifest has no root folder: load it with SegmentedManifest.load(path)")
        return self.root / segment.file

    # -- validation ---------------------------------------------------------------------------------

    def validate(self, check_files: bool = True) -> None:
        """Raise GraphoptError on the first broken rule of the contract (see the module docstring)."""
        kinds = [s.kind for s in self.segments]
        if len(kinds) < 2 or kinds[0] != "prologue" or kinds[-1] != "epilogue" or any(
            k != "block" for k in kinds[1:-1]
        ):
            raise GraphoptError(
                f"segments must be one prologue, the blocks in order, then one epilogue; got kinds {kinds}"
            )
        _unique([t.name for t in self.inputs], "model inputs")
        _unique([t.name for t in self.outputs], "model outputs")
        _unique([s.file for s in self.segments], "segment files")
        if not self.outputs:
            raise GraphoptError("the manifest lists no model outputs; the epilogue must produce at least one")
        if not self.stream:
            raise GraphoptError("the manifest names no stream tensor: list the residual stream's names in 'stream'")
        _unique(list(self.stream), "stream names")

        model_inputs = {t.name: t for t in self.inputs}
        pro = self.prologue
        reusing = [b.file for b in self.blocks if b.reuse is not None]
        if reusing and self.reuse is None:
            raise GraphoptError(f"segments {reusing} reuse residuals but the manifest has no 'reuse' entry")
        if self.reuse is not None:
            require_keys(self.reuse, ("valid", "timestep", "latent"), "reuse")
            missing = [self.reuse[k] for k in ("timestep", "latent") if self.reuse[k] not in model_inputs]
            if missing:
                raise GraphoptError(f"reuse detects a new run from {missing}, which are not model inputs")
            readable_by_prologue = {**model_inputs, self.reuse["valid"]: TensorSpec(self.reuse["valid"], "bool", ())}
        else:
            readable_by_prologue = model_inputs
        self._check_reads(pro, readable_by_prologue, "model inputs")
        produced = {t.name: t for t in pro.outputs}
        clash = sorted(set(produced) & set(model_inputs))
        if clash:
            raise GraphoptError(
                f"prologue outputs {clash} reuse model input names; give the stream/side tensors their own names"
            )
        for name in self.stream:
            if name not in produced:
                raise GraphoptError(
                    f"stream tensor '{name}' is not a prologue output; the prologue writes {sorted(produced)}"
                )
            spec = produced[name]
            if not spec.shape or spec.shape[0] != self.batch_dim:
                raise GraphoptError(
                    f"stream tensor '{name}' has shape {list(spec.shape)}; its axis 0 must be the batch dim "
                    f"'{self.batch_dim}' (per-sample gating selects along it)"
                )

        routed = [b for b in self.blocks if b.routed]
        if self.gates is None:
            if routed:
                raise GraphoptError(
                    f"blocks {[b.block for b in routed]} have a gate column but the manifest has no 'gates' tensor"
                )
        else:
            if self.gates not in produced or self.gates in self.stream:
                raise GraphoptError(f"gates tensor '{self.gates}' must be a prologue output outside the stream")
            gates = produced[self.gates]
            if gates.dtype != "bool" or len(gates.shape) != 2 or gates.shape[0] != self.batch_dim:
                raise GraphoptError(
                    f"gates tensor '{self.gates}' is {gates.describe()}; it must be bool "
                    f"['{self.batch_dim}', n_routed]"
                )
            if isinstance(gates.shape[1], int) and gates.shape[1] != len(routed):
                raise GraphoptError(
                    f"gates tensor '{self.gates}' has {gates.shape[1]} columns but {len(routed)} blocks are routed"
                )
            columns = sorted(b.gate for b in routed)
            if columns != list(range(len(routed))):
                raise GraphoptError(
                    f"routed blocks' gate columns are {columns}; they must be 0..{len(routed) - 1}, each used once"
                )

        readable = {**model_inputs, **{k: v for k, v in produced.items() if k != self.gates}}
        previous = -1
        for block in self.blocks:
            if block.block <= previous:
                raise GraphoptError(
                    f"block indices must increase strictly; block {block.block} ({block.file}) follows {previous}"
                )
            previous = block.block
            self._check_reads(block, readable, "model inputs and prologue outputs (gates excepted)")
            missing = [s for s in self.stream if s not in {t.name for t in block.inputs}]
            if missing:
                raise GraphoptError(f"segment '{block.file}' does not read stream tensor(s) {missing}")
            expected = {next_name(s): produced[s] for s in self.stream}
            got = {t.name: t for t in block.outputs}
            if set(got) != set(expected):
                raise GraphoptError(
                    f"segment '{block.file}' outputs {sorted(got)}; a block must output exactly the stream's "
                    f"next values {sorted(expected)} (stream name + '{NEXT_SUFFIX}')"
                )
            for name, spec in expected.items():
                if (got[name].dtype, got[name].shape) != (spec.dtype, spec.shape):
                    raise GraphoptError(
                        f"segment '{block.file}' writes '{name}' as {got[name].describe()} but the stream is "
                        f"{spec.describe()}; a block must keep the stream's dtype and shape"
                    )

        epi = self.epilogue
        self._check_reads(epi, readable, "model inputs and prologue outputs (gates excepted)")
        epi_out = {t.name: t for t in epi.outputs}
        if [t.name for t in epi.outputs] != [t.name for t in self.outputs]:
            raise GraphoptError(
                f"epilogue outputs {[t.name for t in epi.outputs]} differ from the model outputs "
                f"{[t.name for t in self.outputs]} (same names, same order)"
            )
        for spec in self.outputs:
            if epi_out[spec.name] != spec:
                raise GraphoptError(
                    f"epilogue writes '{spec.name}' as {epi_out[spec.name].describe()} but the model output "
                    f"is declared {spec.describe()}"
                )

        used_dims = {d for seg in self.segments for t in seg.inputs + seg.outputs for d in t.symbolic_dims}
        unknown = sorted(set(self.dims) - used_dims)
        if unknown:
            raise GraphoptError(f"'dims' gives ranges for {unknown}, which no tensor uses; known: {sorted(used_dims)}")
        if check_files:
            self._check_files()

    def _check_reads(self, segment: Segment, readable: Mapping[str, TensorSpec], what: str) -> None:
        for spec in segment.inputs:
            source = readable.get(spec.name)
            if source is None:
                raise GraphoptError(
                    f"segment '{segment.file}' reads '{spec.name}', which is none of the {what}: "
                    f"{sorted(readable)}"
                )
            if (source.dtype, source.shape) != (spec.dtype, spec.shape):
                raise GraphoptError(
                    f"segment '{segment.file}' reads '{spec.name}' as {spec.describe()} but it is written as "
                    f"{source.describe()}"
                )

    def _check_files(self) -> None:
        if self.root is None:
            raise GraphoptError("cannot check segment files: the manifest has no root folder")
        for seg in self.segments:
            path = inside_folder(self.root, seg.file, f"segment file {seg.file!r}")
            if not path.is_file():
                raise GraphoptError(
                    f"segment file {seg.file!r} is missing from {self.root}; re-run the segmented export"
                )
        if self.files:
            self._check_hashes()

    def referenced_files(self) -> list[str]:
        """Every file the layout reads: segment files and the external data they name (relative
        to the root; each checked to lie inside it)."""
        names = []
        for seg in self.segments:
            inside_folder(self.root, seg.file, f"segment file {seg.file!r}")
            names.append(seg.file)
            folder = Path(seg.file).parent
            for location in onnx_external_data(self.root / seg.file):
                name = (folder / location).as_posix() if isinstance(location, str) else location
                path = inside_folder(self.root, name, f"'{seg.file}' external data")
                if not path.is_file():
                    raise GraphoptError(f"'{seg.file}' names external data '{location}', which is "
                                        f"missing from {self.root}; re-run the segmented export")
                names.append(name)
        return sorted(set(names))

    def _check_hashes(self) -> None:
        if not isinstance(self.files, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.files.items()):
            raise GraphoptError("'files' must map file names to \"sha256:<hex>\" strings")
        names = self.referenced_files()
        unlisted = sorted(set(names) - set(self.files))
        if unlisted:
            raise GraphoptError(f"file(s) {unlisted} have no recorded hash: the manifest was edited "
                                f"or the files come from another export; re-run the segmented export")
        for name in names:
            if file_hash(inside_folder(self.root, name, "manifest 'files'")) != self.files[name]:
                raise GraphoptError(f"'{name}' does not match the hash the manifest records: it was "
                                    f"changed or swapped with another file after the export; "
                                    f"re-run the segmented export")

    def verify_onnx(self) -> None:
        """Check each file's declared graph I/O against the manifest (names, dtypes, ranks, fixed dims).

        Loads graph structure only (no external weights); embedded weights are read, so this costs one
        pass over each file.
        """
        for seg in self.segments:
            compare_io(seg, Segment.from_onnx(self.path_of(seg)))

    # -- JSON --------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "batch_dim": self.batch_dim,
            "dims": {k: {"min": v.min, "opt": v.opt, "max": v.max} for k, v in self.dims.items()},
            "config": self.config,
            "fixed_inputs": self.fixed_inputs,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "stream": list(self.stream),
            "gates": self.gates,
            "segments": [s.to_json() for s in self.segments],
            **({"reuse": self.reuse} if self.reuse is not None else {}),
            **({"files": dict(self.files)} if self.files else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], root: Path | None = None) -> SegmentedManifest:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise GraphoptError(f"not a graphopt segmented manifest: 'format' must be {FORMAT!r}")
        if data.get("version") != VERSION:
            raise GraphoptError(
                f"manifest version {data.get('version')!r} is not supported by this graphopt (reads version "
                f"{VERSION}); re-export with this graphopt"
            )
        require_keys(data, ("inputs", "outputs", "stream", "gates", "segments"), "manifest")
        _check_types(data)
        return cls(
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            stream=tuple(data["stream"]),
            gates=data["gates"],
            segments=tuple(Segment.from_json(s) for s in data["segments"]),
            dims={k: DimRange(**v) for k, v in data.get("dims", {}).items()},
            batch_dim=data.get("batch_dim", "batch"),
            config=dict(data.get("config", {})),
            fixed_inputs=dict(data.get("fixed_inputs", {})),
            reuse=data.get("reuse"),
            root=root,
            files=dict(data.get("files", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike, check_files: bool = True) -> SegmentedManifest:
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        if not path.is_file():
            raise GraphoptError(f"manifest not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise GraphoptError(f"manifest {path} is not valid JSON: {exc}") from None
        try:
            manifest = cls.from_json(data, root=path.parent)
            manifest.validate(check_files=check_files)
        except GraphoptError as exc:
            raise GraphoptError(f"manifest {path}: {exc}") from None
        return manifest

    def save(self, path: str | os.PathLike) -> Path:
        """Validate against the files next to `path`, then write atomically (temp file + os.replace)."""
        path = Path(path)
        if path.is_dir():
            path = path / "manifest.json"
        self.root = path.parent
        try:
            self.files = {}
            self.validate(check_files=True)
            self.files = {name: file_hash(self.root / name) for name in self.referenced_files()}
        except GraphoptError as exc:
            raise GraphoptError(f"manifest {path}: {exc}") from None
        try:
            text = json.dumps(self.to_json(), indent=2) + "\n"
        except TypeError as exc:
            raise GraphoptError(f"manifest {path}: 'config' must hold JSON values only ({exc})") from None
        atomic_write_text(path, text)
        return path


def _unique(names: list[str], what: str) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise GraphoptError(f"{what} repeat names: {duplicates}")


def _check_types(data: Mapping[str, Any]) -> None:
    """The manifest's containers have the JSON types the layout needs (a hand-edited or foreign
    manifest fails here with the key's name, not deep inside the runtime)."""
    lists = ("inputs", "outputs", "stream", "segments")
    for key in lists:
        if not isinstance(data[key], list):
            raise GraphoptError(f"'{key}' must be a list, got {type(data[key]).__name__}")
    for key in ("dims", "config", "fixed_inputs", "files"):
        if not isinstance(data.get(key, {}), Mapping):
            raise GraphoptError(f"'{key}' must be an object, got {type(data[key]).__name__}")
    if not all(isinstance(v, Mapping) for v in data.get("dims", {}).values()):
        raise GraphoptError("each 'dims' entry must be an object {min, opt, max}")
    if not all(isinstance(v, str) and v for v in data["stream"]):
        raise GraphoptError("'stream' must list tensor names (strings)")
    if data["gates"] is not None and not isinstance(data["gates"], str):
        raise GraphoptError(f"'gates' must be a tensor name or null, got {data['gates']!r:.40}")
    if not isinstance(data.get("batch_dim", "batch"), str):
        raise GraphoptError("'batch_dim' must be a dim name such as \"batch\"")
    for seg in data["segments"]:
        if isinstance(seg, Mapping):
            if not isinstance(seg.get("file"), str):
                raise GraphoptError(f"a segment's 'file' must be a relative path, got {seg.get('file')!r:.40}")
            for key in ("inputs", "outputs"):
                if not isinstance(seg.get(key, []), list):
                    raise GraphoptError(f"segment {seg['file']!r}: '{key}' must be a list")
    for entry in [t for key in ("inputs", "outputs") for t in data[key]] + [
            t for seg in data["segments"] if isinstance(seg, Mapping)
            for key in ("inputs", "outputs") for t in seg.get(key, [])]:
        if isinstance(entry, Mapping) and not isinstance(entry.get("shape", []), list):
            raise GraphoptError(f"tensor {entry.get('name')!r:.40}: 'shape' must be a list")
