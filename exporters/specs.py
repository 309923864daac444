"""What one segment file declares, and the checks against it: the tensor and segment specs of the
segmented manifest (graphopt.exporters.manifest), read from an ONNX file, compared with what a
file or engine declares, and a loaded model's call inputs checked against them.

Also the ONNX file readers that touch no weights: external-data locations, graphopt's metadata
entries, and the file hash the manifest records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from graphopt.errors import GraphoptError

KINDS = ("prologue", "block", "epilogue")
# A whole single-file graph (e.g. the If layout) wrapped as one runnable spec; never inside a manifest.
MODEL_KIND = "model"

# dtype name -> ONNX TensorProto element type (the numbers are fixed by the ONNX standard).
ONNX_ELEM_TYPES = {
    "float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7, "string": 8,
    "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13, "complex64": 14,
    "complex128": 15, "bfloat16": 16,
}
DTYPE_OF_ELEM = {v: k for k, v in ONNX_ELEM_TYPES.items()}
_TENSOR_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
_DIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor crossing a segment boundary: dtype and (partly symbolic) shape."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise GraphoptError(f"tensor name must be a non-empty string, got {self.name!r}")
        if self.dtype not in _TENSOR_DTYPES:
            raise GraphoptError(
                f"tensor '{self.name}': dtype {self.dtype!r} is not one of {', '.join(_TENSOR_DTYPES)}"
            )
        object.__setattr__(self, "shape", tuple(self.shape))
        for dim in self.shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, str)):
                raise GraphoptError(f"tensor '{self.name}': dim {dim!r} must be an int or a name")
            if isinstance(dim, int) and dim < 0:
                raise GraphoptError(f"tensor '{self.name}': fixed dim {dim} is negative; use a name for a dynamic dim")
            if isinstance(dim, str) and not _DIM_NAME.match(dim):
                raise GraphoptError(
                    f"tensor '{self.name}': symbolic dim {dim!r} must be an identifier such as 'batch' "
                    "(a derived expression cannot get its own TensorRT profile range)"
                )

    @property
    def symbolic_dims(self) -> tuple[str, ...]:
        return tuple(d for d in self.shape if isinstance(d, str))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        require_keys(data, ("name", "dtype", "shape"), "tensor")
        return cls(data["name"], data["dtype"], tuple(data["shape"]))

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


def _is_forecast_entry(entry, slots) -> bool:
    """A forecasting block's manifest entry names a slope slot per reused stream and one time slot."""
    return (isinstance(entry, Mapping) and set(entry) == {"slopes", "time"} and isinstance(entry["time"], str)
            and isinstance(entry["slopes"], Mapping) and isinstance(slots, Mapping)
            and set(entry["slopes"]) == set(slots) and all(isinstance(k, str) for k in entry["slopes"].values()))


@dataclass(frozen=True)
class Segment:
    """One ONNX file of the layout. `gate` is the column in `gates` for a routed block, None otherwise."""

    kind: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    block: int | None = None
    gate: int | None = None
    # Residual reuse (block segments): {"slots": {stream: slot or null}} for a reuse-routed block
    # (a skipped sample gets stream + slot), {"cache": rule} for the cache pass's cached blocks.
    reuse: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        where = f"segment {self.file!r}"
        if self.kind not in KINDS + (MODEL_KIND,):
            raise GraphoptError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "block":
            if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 0:
                raise GraphoptError(f"{where}: a block segment needs a block index >= 0, got {self.block!r}")
        elif self.block is not None or self.gate is not None or self.reuse is not None:
            raise GraphoptError(f"{where}: only block segments carry 'block', 'gate' and 'reuse'")
        if self.reuse is not None and (not isinstance(self.reuse, Mapping)
                                       or set(self.reuse) not in ({"slots"}, {"slots", "forecast"}, {"cache"})
                                       or "forecast" in self.reuse
                                       and not _is_forecast_entry(self.reuse["forecast"], self.reuse["slots"])):
            raise GraphoptError(f"{where}: 'reuse' must be {{\"slots\": {{...}}}} (with \"forecast\": {{\"slopes\": "
                                f"{{...}}, \"time\": slot}} for the same streams) or {{\"cache\": {{...}}}}, "
                                f"got {self.reuse!r}")
        if self.gate is not None and (isinstance(self.gate, bool) or not isinstance(self.gate, int) or self.gate < 0):
            raise GraphoptError(f"{where}: gate column must be an int >= 0 or null, got {self.gate!r}")
        names = [t.name for t in self.inputs + self.outputs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise GraphoptError(f"{where}: tensor names used twice among its inputs/outputs: {duplicates}")

    @property
    def routed(self) -> bool:
        return self.gate is not None

    @property
    def label(self) -> str:
        return Path(self.file).stem

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, f"segment {self.file!r} inputs")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, f"segment {self.file!r} outputs")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "file": self.file}
        if self.kind == "block":
            data["block"] = self.block
            data["gate"] = self.gate
            if self.reuse is not None:
                data["reuse"] = dict(self.reuse)
        data["inputs"] = [t.to_json() for t in self.inputs]
        data["outputs"] = [t.to_json() for t in self.outputs]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Segment:
        require_keys(data, ("kind", "file", "inputs", "outputs"), "segment")
        return cls(
            kind=data["kind"],
            file=data["file"],
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            block=data.get("block"),
            gate=data.get("gate"),
            reuse=data.get("reuse"),
        )

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> Segment:
        """The I/O spec an ONNX file declares (weights are not loaded). Unnamed dynamic dims are refused."""
        import onnx

        path = Path(path)
        if not path.is_file():
            raise GraphoptError(f"ONNX file not found: {path}")
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {init.name for init in graph.initializer}
        return cls(
            kind=MODEL_KIND,
            file=path.name,
            inputs=tuple(_spec_of_value(v, path) for v in graph.input if v.name not in initializers),
            outputs=tuple(_spec_of_value(v, path) for v in graph.output),
        )


def compare_io(declared: Segment, actual: Segment) -> None:
    """Raise if `actual` (what a file or engine declares) cannot serve `declared` (the manifest).

    Names must match as sets; dtypes and ranks exactly; a dim fixed in the file must be fixed to the
    same value in the manifest. A manifest int may narrow a symbolic file dim.
    """
    for role, want, have in (("inputs", declared.inputs, actual.inputs), ("outputs", declared.outputs, actual.outputs)):
        want_names = {t.name for t in want}
        have_names = {t.name for t in have}
        if want_names != have_names:
            raise GraphoptError(
                f"'{declared.file}' {role} are {sorted(have_names)} but the manifest declares {sorted(want_names)}"
            )
        have_by = {t.name: t for t in have}
        for spec in want:
            got = have_by[spec.name]
            if got.dtype != spec.dtype or len(got.shape) != len(spec.shape):
                raise GraphoptError(
                    f"'{declared.file}' declares '{spec.name}' as {got.describe()} but the manifest says "
                    f"{spec.describe()}"
                )
            for axis, (m, f) in enumerate(zip(spec.shape, got.shape)):
                if isinstance(f, int) and m != f:
                    raise GraphoptError(
                        f"'{declared.file}' fixes axis {axis} of '{spec.name}' to {f} but the manifest says {m!r}"
                    )


def _spec_of_value(value: Any, path: Path) -> TensorSpec:
    tensor_type = value.type.tensor_type
    dtype = DTYPE_OF_ELEM.get(tensor_type.elem_type, f"elem_type {tensor_type.elem_type}")
    dims: list[Dim] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            raise GraphoptError(
                f"{path.name}: axis {axis} of '{value.name}' is dynamic but unnamed; name every dynamic dim "
                "when exporting (torch.export.Dim('batch'), or dynamic_axes={...: {0: 'batch'}})"
            )
    return TensorSpec(value.name, dtype, tuple(dims))


def _by_name(specs: Iterable[TensorSpec], name: str, where: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise GraphoptError(f"no tensor '{name}' among the {where}")


def require_keys(data: Mapping[str, Any], keys: Iterable[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise GraphoptError(f"{what} entry must be a JSON object, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise GraphoptError(f"{what} entry is missing {missing}: {dict(data)!r:.200}")


def file_hash(path: Path) -> str:
    """"sha256:<hex>" of the file at `path`, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return f"sha256:{digest.hexdigest()}"


def onnx_external_data(path: Path) -> list:
    """The external-data locations (as written, relative to the file's folder) that the ONNX file
    at `path` names; its weights are not read."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf reports a corrupt file in several ways
        raise GraphoptError(f"'{path}' is not a readable ONNX file ({type(exc).__name__}): is it "
                            f"complete?") from None
    locations = []
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            locations.append(next((e.value for e in tensor.external_data if e.key == "location"), None))
    return sorted(set(locations), key=str)


def check_call_inputs(specs: Iterable[TensorSpec], batch_dim: str, kwargs: Mapping[str, Any],
                      what: str) -> None:
    """Refuse a call of a loaded model (segmented, single-file or AOTInductor) before it reaches
    onnxruntime: every input it declares must be a tensor, an array or a number (a timestep may be
    a Python number), and the batch must hold at least one sample."""
    import numbers

    import numpy as np
    import torch

    for spec in specs:
        value = kwargs.get(spec.name)
        if value is None:
            continue                     # the runtime names a missing input
        if isinstance(value, bool) or not isinstance(value, (torch.Tensor, np.ndarray, numbers.Number)):
            raise GraphoptError(f"the {what}'s input '{spec.name}' must be a tensor ({spec.describe()}), "
                                f"got {type(value).__name__}")
        if isinstance(value, numbers.Number) and len(spec.shape) > 1:
            raise GraphoptError(f"the {what}'s input '{spec.name}' must be a tensor of shape "
                                f"{list(spec.shape)}, got the number {value!r}")
        shape = tuple(getattr(value, "shape", ()))
        if spec.shape[:1] == (batch_dim,) and len(shape) == len(spec.shape) and shape[0] == 0:
            raise GraphoptError(f"the {what} got an empty batch ('{spec.name}' has shape "
                                f"{list(shape)}): pass at least one sample")


def onnx_metadata(path: Path, prefix: str = "graphopt.") -> dict[str, Any]:
    """The metadata entries of the ONNX file at `path` whose keys start with `prefix`, each value
    parsed as JSON (graphopt writes JSON there); a malformed value is a GraphoptError naming the
    key. Weights are not read."""
    import onnx

    try:
        props = onnx.load(str(path), load_external_data=False).metadata_props
    except Exception as exc:  # protobuf reports a corrupt file in several ways
        raise GraphoptError(f"'{path}' is not a readable ONNX file ({type(exc).__name__}): is it "
                            f"complete?") from None
    out = {}
    for prop in props:
        if prop.key.startswith(prefix):
            try:
                out[prop.key] = json.loads(prop.value)
            except json.JSONDecodeError as exc:
                raise GraphoptError(f"'{path}': metadata '{prop.key}' is not valid JSON ({exc.msg}); "
                                    f"re-export the model") from None
    return out
