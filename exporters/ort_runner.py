"""onnxruntime backend for segments: CPU EP, or CUDA EP when onnxruntime-gpu is installed.

Tensors cross the boundary without copies: inputs are bound by their torch data pointers and outputs
are preallocated torch tensors that onnxruntime writes into (IOBinding). An output whose shape cannot
be derived from the inputs' named dims (e.g. a token count the prologue computes) is allocated by
onnxruntime the first time; the dims it reveals are remembered per input-shape signature, so later
calls with the same shapes preallocate it too.

`SingleFileModel` runs a single-file export (router and `If` blocks inside) in one such session,
called like the diffusers transformer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from graphopt.dropin import FacadeModel, state_input_names
from graphopt.errors import GraphoptError
from graphopt.exporters.manifest import SegmentedManifest
from graphopt.exporters.onnx import COMPUTED_NAME, META_BLOCKS, META_CONFIG, META_FIXED, META_REUSE
from graphopt.exporters.runtime import BlockRunner, check_fixed_inputs
from graphopt.exporters.segments import GATES_NAME
from graphopt.exporters.specs import ONNX_ELEM_TYPES, Segment, TensorSpec, compare_io, onnx_metadata
from graphopt.fxutil import TORCH_DTYPES

# onnxruntime's type strings ("tensor(float)") -> manifest dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise GraphoptError(
            "onnxruntime is not installed: pip install 'graphopt[onnx]' (CPU) or 'graphopt[onnx-gpu]' (CUDA)"
        ) from exc
    return onnxruntime


def default_providers(device: torch.device) -> list[Any]:
    """CPU EP for cpu; CUDA EP on the device's index (running on torch's current stream) for cuda."""
    ort = _import_ort()
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise GraphoptError(f"the onnxruntime backend runs on cpu or cuda, not {device}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise GraphoptError(
            "this onnxruntime has no CUDAExecutionProvider: pip uninstall onnxruntime && pip install "
            "onnxruntime-gpu (both install the `onnxruntime` module; keep exactly one)"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Running on torch's stream keeps ordering with the torch ops around each segment without syncs.
    stream = torch.cuda.current_stream(index).cuda_stream
    return [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}), "CPUExecutionProvider"]


class OrtRunner(BlockRunner):
    """One ONNX segment in an onnxruntime InferenceSession; the file's I/O is checked against `segment`."""

    def __init__(
        self,
        path: str | os.PathLike,
        segment: Segment,
        device: torch.device | str = "cpu",
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
    ):
        super().__init__(segment, device)
        ort = _import_ort()
        path = Path(path)
        if not path.is_file():
            raise GraphoptError(f"ONNX file not found: {path}")
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=session_options, providers=list(providers or default_providers(self.device))
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise GraphoptError(f"onnxruntime cannot load {path}: {exc}") from exc
        compare_io(segment, self._declared_io(path.name))
        self._ort_device = ("cuda" if self.device.type == "cuda" else "cpu", self.device.index or 0)
        self._learned_dims: dict[tuple, dict[str, int]] = {}

    def _declared_io(self, file: str) -> Segment:
        def spec(arg: Any) -> TensorSpec:
            if arg.type not in _ORT_TYPES:
                raise GraphoptError(f"'{file}': tensor '{arg.name}' has type {arg.type}, which graphopt cannot bind")
            return TensorSpec(arg.name, _ORT_TYPES[arg.type], tuple(_as_dim(d) for d in arg.shape))

        return Segment(
            kind=self.segment.kind,
            file=file,
            inputs=tuple(spec(a) for a in self.session.get_inputs()),
            outputs=tuple(spec(a) for a in self.session.get_outputs()),
            block=self.segment.block,
            gate=self.segment.gate,
        )

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ready = self.prepare(inputs)
        binding = self.session.io_binding()
        dims: dict[str, int] = {}
        for spec in self.segment.inputs:
            tensor = ready[spec.name]
            for dim, size in zip(spec.shape, tensor.shape):
                if isinstance(dim, str) and dims.setdefault(dim, size) != size:
                    raise GraphoptError(
                        f"segment '{self.segment.file}': dim '{dim}' is {dims[dim]} in one input but {size} "
                        f"in '{spec.name}'"
                    )
            binding.bind_input(
                spec.name, *self._ort_device, ONNX_ELEM_TYPES[spec.dtype], tuple(tensor.shape), tensor.data_ptr()
            )
        signature = tuple(sorted(dims.items()))
        dims.update(self._learned_dims.get(signature, {}))
        outputs: dict[str, torch.Tensor] = {}
        unresolved: list[TensorSpec] = []
        for spec in self.segment.outputs:
            shape = _resolve(spec.shape, dims)
            if shape is None:
                if spec.dtype == "bfloat16":  # numpy has no bfloat16: an onnxruntime-owned output cannot be read
                    raise GraphoptError(
                        f"segment '{self.segment.file}': the inputs do not determine the dims of bfloat16 output "
                        f"'{spec.name}' {list(spec.shape)}; name its dims after input dims or output float32"
                    )
                binding.bind_output(spec.name, *self._ort_device)
                unresolved.append(spec)
                continue
            out = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype], device=self.device)
            binding.bind_output(spec.name, *self._ort_device, ONNX_ELEM_TYPES[spec.dtype], shape, out.data_ptr())
            outputs[spec.name] = out
        self.session.run_with_iobinding(binding)
        if unresolved:
            # First call at this input-shape signature: copy onnxruntime's buffers, learn the dims.
            host_values = dict(zip((s.name for s in self.segment.outputs), binding.copy_outputs_to_cpu()))
            learned = self._learned_dims.setdefault(signature, {})
            for spec in unresolved:
                host = torch.from_numpy(host_values[spec.name])
                learned.update({d: s for d, s in zip(spec.shape, host.shape) if isinstance(d, str)})
                outputs[spec.name] = host.to(self.device)
        return outputs


class OrtBackend:
    """Loads every segment of a manifest into onnxruntime sessions on one device."""

    def __init__(self, providers: Sequence[Any] | None = None, session_options: Any = None):
        self.providers = providers
        self.session_options = session_options

    def load(self, manifest: SegmentedManifest, device: torch.device) -> list[BlockRunner]:
        return [
            OrtRunner(manifest.path_of(seg), seg, device, self.providers, self.session_options)
            for seg in manifest.segments
        ]


class SingleFileModel(FacadeModel):
    """A single-file export (router and If blocks inside) in onnxruntime, called like the transformer.

    The router runs inside the graph; its `gates` output tells which blocks ran (a routed block runs
    when any sample of the batch needs it), recorded per call. Forcing gates needs a re-export.
    """

    what = "ONNX model"

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[Any] | None = None,
                 device: str | torch.device = "cpu", session_options: Any = None):
        path = Path(path)
        segment = Segment.from_onnx(path)
        meta = onnx_metadata(path)          # graphopt's entries, parsed (a malformed one is named)
        if META_BLOCKS not in meta:
            raise GraphoptError(f"'{path}' was not written by graphopt's export_onnx (no '{META_BLOCKS}' metadata); "
                                "re-export it")
        state = meta.get(META_REUSE)
        slots = state["slots"] if state else []
        state_inputs = state_input_names(slots) if state else set()
        super().__init__(meta.get(META_CONFIG, {}),
                         [spec for spec in segment.inputs if spec.name not in state_inputs],
                         meta[META_BLOCKS])
        self.thread_state(state, [spec for spec in segment.inputs if spec.name in state_inputs])
        self.device = torch.device(device)
        self.runner = OrtRunner(path, segment, self.device, providers, session_options)
        self.fixed = meta.get(META_FIXED, {})     # non-tensor inputs baked in at export
        nexts = {f"next_{k}" for k in slots}
        self.outputs = [spec.name for spec in segment.outputs
                        if spec.name not in (GATES_NAME, COMPUTED_NAME) and spec.name not in nexts]
        self.routed = any(spec.name == GATES_NAME for spec in segment.outputs)
        self.decides = any(spec.name == COMPUTED_NAME for spec in segment.outputs)

    def __call__(self, *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        check_fixed_inputs(self.fixed, kwargs, "ONNX model")
        return super().__call__(*args, return_dict=return_dict, **kwargs)

    def _run(self, feeds):
        if self.reuse is not None:
            feeds = {**feeds, **self.state_feeds(feeds)}
        out = self.runner(feeds)
        if self.reuse is not None:
            self.keep_state([out[f"next_{k}"] for k in self.state["slots"]])
        gates = out[GATES_NAME].cpu().numpy() if self.routed else None
        computed = bool(out[COMPUTED_NAME]) if self.decides else None
        return tuple(out[name] for name in self.outputs), gates, computed


def _as_dim(dim: Any) -> int | str:
    """onnxruntime reports unnamed dynamic dims as None and derived ones as expressions ('s0*2')."""
    if isinstance(dim, int):
        return dim
    return dim if isinstance(dim, str) and dim.isidentifier() else "dynamic"


def _resolve(shape: tuple, dims: Mapping[str, int]) -> tuple[int, ...] | None:
    if all(isinstance(d, int) or d in dims for d in shape):
        return tuple(d if isinstance(d, int) else dims[d] for d in shape)
    return None
