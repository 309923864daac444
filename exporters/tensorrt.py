"""TensorRT: engine builder for both ONNX layouts, engine runner, shared activations, parity check.

TensorRT is imported lazily: everything here that does not talk to TensorRT (the fp16/bf16 ONNX cast,
build planning with optimization-profile shapes) works without it, and what needs it raises a
GraphoptError that says how to install it.

API facts this module relies on (TensorRT Python API; checked against NVIDIA's docs and sources):
- Build: `Builder.create_network(flags)`, `OnnxParser.parse_from_file` (resolves external weights next
  to the file), `IOptimizationProfile.set_shape(name, min, opt, max)`, `IBuilderConfig.
  create_timing_cache(bytes)` / `set_timing_cache(cache, ignore_mismatch)` / `get_timing_cache().
  serialize()`, `Builder.build_serialized_network(network, config)`.
- Precision: TensorRT 10 accepts `BuilderFlag.FP16` / `BuilderFlag.BF16` (weak typing, deprecated in
  10.12). TensorRT 11 removed those flags; every network is strongly typed and precision must be in the
  ONNX itself ("Migrating from TensorRT 10.x to 11.x", docs.nvidia.com/deeplearning/tensorrt/latest/
  api/migration/tensorrt-10x-to-11x.html). `cast_float_precision` below is that ONNX-level cast.
- Shared activations (TensorRT >= 10.1): `ICudaEngine.device_memory_size_v2`, `create_execution_context(
  ExecutionContextAllocationStrategy.USER_MANAGED)`, `IExecutionContext.set_device_memory(ptr, size)`
  (256-byte aligned, size >= the engine's need). The unversioned `device_memory_size` and
  `get_device_memory_size_for_profile` are deprecated in 10.1 and removed in 11.
- Run: `set_input_shape`, `set_tensor_address`, `get_tensor_shape`, `execute_async_v3(stream)`.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from graphopt.errors import GraphoptError
from graphopt.io import atomic_write_bytes
from graphopt.exporters.manifest import DimRange, SegmentedManifest
from graphopt.exporters.runtime import BlockRunner, run_all_segments
from graphopt.exporters.specs import MODEL_KIND, Segment, TensorSpec, compare_io
from graphopt.exporters.trt_check import all_graphs, restore_bool_where
from graphopt.fxutil import TORCH_DTYPES

PRECISIONS = ("fp32", "fp16", "bf16")
_CAST_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
_INSTALL_HINT = (
    "TensorRT is not installed: on a machine with an NVIDIA GPU and driver, `pip install tensorrt` "
    "(the PyPI package pulls the libraries from NVIDIA's package index), or follow "
    "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html"
)
# Inputs that ONNX types as tensor(float) whatever the model's compute dtype: left in float32 by the cast.
_FLOAT32_ONLY_INPUTS = {"Resize": {2}, "Upsample": {1}}
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
               "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def import_tensorrt() -> Any:
    """The tensorrt module, imported on first use; a missing install is a one-line GraphoptError."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise GraphoptError(_INSTALL_HINT) from exc
    if _version(trt) < (10, 1):
        raise GraphoptError(f"graphopt needs TensorRT >= 10.1 (found {trt.__version__}): pip install -U tensorrt")
    return trt


def _version(trt: Any) -> tuple[int, int]:
    major, minor = trt.__version__.split(".")[:2]
    return int(major), int(minor)


# -- the ONNX-level precision cast (TensorRT 11 strong typing) ----------------------------------------


def cast_float_precision(model: Any, dtype: str, keep_io_types: bool = True) -> Any:
    """A copy of `model` computing in `dtype` ("float16" or "bfloat16") instead of float32.

    Converted: float32 initializers, Constant/ConstantOfShape values, `Cast(to=float)`, dtype attributes
    of Random*/EyeLike, value_info, subgraphs (If/Loop/Scan bodies). Left in float32: inputs ONNX
    requires to be float (Resize scales, Upsample scales) and the Casts that feed them. float64 is left
    as is (graphopt.exporters.trt_check flags it). With `keep_io_types`, the model's float32 inputs and
    outputs stay float32 and Casts are inserted at the boundary, so a segmented manifest's contract is
    unchanged; otherwise they become `dtype`. Initializers must be loaded (not external-data refs).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if dtype == "float16":
        target, np_target = TensorProto.FLOAT16, np.float16
    elif dtype == "bfloat16":
        import ml_dtypes

        target, np_target = TensorProto.BFLOAT16, ml_dtypes.bfloat16
    else:
        raise GraphoptError(f"cast_float_precision casts to 'float16' or 'bfloat16', not {dtype!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graphs = list(all_graphs(out.graph))
    keep_fp32 = {
        node.input[slot]
        for graph in graphs
        for node in graph.node
        for slot in _FLOAT32_ONLY_INPUTS.get(node.op_type, ())
        if slot < len(node.input) and node.input[slot]
    }

    def convert(tensor: Any) -> None:
        if tensor.data_type != TensorProto.FLOAT or tensor.name in keep_fp32:
            return
        if tensor.data_location == TensorProto.EXTERNAL:
            raise GraphoptError(
                f"initializer '{tensor.name}' lives in external data; load the model with its weights "
                "(onnx.load(path), load_external_data=True) before casting"
            )
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np_target), tensor.name))

    def retype(value: Any) -> None:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in keep_fp32:
            value.type.tensor_type.elem_type = target

    for graph in graphs:
        for init in graph.initializer:
            convert(init)
        for value in graph.value_info:
            retype(value)
        if graph is not out.graph:
            for value in list(graph.input) + list(graph.output):
                retype(value)
        for node in graph.node:
            if any(o in keep_fp32 for o in node.output):
                continue  # it computes a float32-only input
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    convert(attr.t)
                elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                    values = np.array(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float32)
                    attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(values.astype(np_target))))
                elif _is_dtype_attr(node.op_type, attr.name) and attr.i == TensorProto.FLOAT:
                    attr.i = target

    main = out.graph
    if keep_io_types:
        init_names = {i.name for i in main.initializer}
        prefix_nodes, suffix_nodes = [], []
        for value in main.input:
            if value.name in init_names:  # old-style models list initializers among the inputs
                retype(value)
            elif value.type.tensor_type.elem_type == TensorProto.FLOAT:
                inner = f"{value.name}__{dtype}"
                _rename_uses(graphs, value.name, inner)
                prefix_nodes.append(helper.make_node("Cast", [value.name], [inner], to=target, name=f"{inner}_cast"))
        input_names = {v.name for v in main.input}
        for value in main.output:
            if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in input_names:
                inner = f"{value.name}__{dtype}"
                _rename_uses(graphs, value.name, inner)
                for node in main.node:
                    node.output[:] = [inner if o == value.name else o for o in node.output]
                for info in main.value_info:
                    if info.name == value.name:
                        info.name = inner
                suffix_nodes.append(
                    helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT, name=f"{inner}_cast")
                )
        nodes = prefix_nodes + list(main.node) + suffix_nodes
        del main.node[:]
        main.node.extend(nodes)
    else:
        for value in list(main.input) + list(main.output):
            retype(value)
    return out


def _is_dtype_attr(op_type: str, attr_name: str) -> bool:
    """Attributes that choose an op's output dtype."""
    if op_type == "Cast":
        return attr_name == "to"
    return attr_name == "dtype" and (op_type.startswith("Random") or op_type == "EyeLike")


def _rename_uses(graphs: Sequence[Any], old: str, new: str) -> None:
    """Point every node input named `old` (in any graph: subgraphs read outer names) at `new`."""
    for graph in graphs:
        for node in graph.node:
            if old in node.input:
                node.input[:] = [new if i == old else i for i in node.input]


# -- build planning (no TensorRT needed) ------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """How to build engines.

    precision: "fp32", "fp16" or "bf16". strongly_typed: None picks what the installed TensorRT supports
    (11+: only strong typing, so the ONNX is cast; 10: builder flags). keep_fp32_kinds: segment kinds
    kept in float32 (default the prologue: the router's gate threshold and rotary tables are
    precision-sensitive, and it is a negligible share of the FLOPs). dim_ranges override the manifest's.
    """

    precision: str = "fp16"
    dim_ranges: Mapping[str, DimRange | tuple[int, int, int]] = field(default_factory=dict)
    timing_cache: str | os.PathLike | None = None
    workspace_bytes: int | None = None
    strongly_typed: bool | None = None
    keep_fp32_kinds: tuple[str, ...] = ("prologue",)
    optimization_level: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise GraphoptError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        ranges = {k: v if isinstance(v, DimRange) else DimRange(*v) for k, v in self.dim_ranges.items()}
        object.__setattr__(self, "dim_ranges", ranges)
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise GraphoptError(f"workspace_bytes must be positive, got {self.workspace_bytes}")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise GraphoptError(f"optimization_level must be in 0..5, got {self.optimization_level}")


@dataclass(frozen=True)
class BuildPlan:
    """One engine to build: its ONNX source, the profile (min, opt, max) per input, and its precision."""

    segment: Segment
    onnx_path: Path
    engine_path: Path
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    precision: str


def profile_shapes(
    inputs: Sequence[TensorSpec], ranges: Mapping[str, DimRange], where: str
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input: fixed dims as is, symbolic dims from `ranges`."""
    profile = {}
    for spec in inputs:
        missing = [d for d in spec.symbolic_dims if d not in ranges]
        if missing:
            raise GraphoptError(
                f"{where}: input '{spec.name}' {list(spec.shape)} has dynamic dim(s) {missing} without a "
                "min/opt/max range: add them to the manifest's 'dims' or pass dim_ranges={'name': (min, opt, max)}"
            )

        def pick(attr: str) -> tuple[int, ...]:
            return tuple(d if isinstance(d, int) else getattr(ranges[d], attr) for d in spec.shape)

        profile[spec.name] = (pick("min"), pick("opt"), pick("max"))
    return profile


def plan_builds(source: str | os.PathLike, out_dir: str | os.PathLike, options: BuildOptions) -> list[BuildPlan]:
    """What `build_engines` will build: a manifest (file or folder) gives one engine per segment, a
    single .onnx file one engine. Engines are named after their ONNX file (`block_03.onnx` ->
    `block_03.engine`)."""
    source, out_dir = Path(source), Path(out_dir)
    if source.suffix == ".onnx":
        segment = Segment.from_onnx(source)
        segments, paths, ranges = [segment], [source], dict(options.dim_ranges)
    else:
        manifest = SegmentedManifest.load(source)
        segments = list(manifest.segments)
        paths = [manifest.path_of(s) for s in segments]
        ranges = {**manifest.dims, **options.dim_ranges}
    plans = []
    for segment, path in zip(segments, paths):
        precision = "fp32" if segment.kind in options.keep_fp32_kinds else options.precision
        profile = profile_shapes(segment.inputs, ranges, path.name)
        plans.append(BuildPlan(segment, path, out_dir / f"{path.stem}.engine", profile, precision))
    return plans


# -- building --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineBuild:
    onnx_path: Path
    engine_path: Path
    precision: str
    strongly_typed: bool
    seconds: float


def build_engines(
    source: str | os.PathLike, out_dir: str | os.PathLike, options: BuildOptions | None = None
) -> list[EngineBuild]:
    """Build TensorRT engines for a segmented manifest (one per segment) or a single ONNX file (one).

    Each engine gets one optimization profile from the dims' (min, opt, max). A timing cache file, when
    given, is read before and rewritten (atomically) after the builds, shared by all of them.
    """
    options = options or BuildOptions()
    out_dir = Path(out_dir)
    plans = plan_builds(source, out_dir, options)
    trt = import_tensorrt()
    strongly_typed = options.strongly_typed
    if strongly_typed is None:
        strongly_typed = _version(trt) >= (11, 0)
    if not strongly_typed and _version(trt) >= (11, 0) and options.precision != "fp32":
        raise GraphoptError(
            "TensorRT 11 removed weakly typed builds (BuilderFlag.FP16/BF16); use strongly_typed=True (or None)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache = None
    results = []
    for plan in plans:
        start = time.perf_counter()
        dtype = _CAST_DTYPES[plan.precision] if strongly_typed and plan.precision != "fp32" else None
        with tensorrt_onnx(plan.onnx_path, out_dir, dtype) as onnx_path:
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise GraphoptError(
                    f"TensorRT's ONNX parser rejected {plan.onnx_path.name}: {errors} "
                    "(graphopt.exporters.trt_check.check_onnx lists the documented causes)"
                )
            config = builder.create_builder_config()
            if options.workspace_bytes:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
            if options.optimization_level is not None:
                config.builder_optimization_level = options.optimization_level
            if not strongly_typed and plan.precision != "fp32":
                config.set_flag(trt.BuilderFlag.FP16 if plan.precision == "fp16" else trt.BuilderFlag.BF16)
            if cache is None:
                saved = cache_path.read_bytes() if cache_path and cache_path.exists() else b""
                cache = config.create_timing_cache(saved)
            config.set_timing_cache(cache, ignore_mismatch=False)
            profile = builder.create_optimization_profile()
            for i in range(network.num_inputs):
                name = network.get_input(i).name
                if name not in plan.profile:
                    raise GraphoptError(
                        f"{plan.onnx_path.name}: network input '{name}' is not in the manifest/ONNX spec")
                profile.set_shape(name, *plan.profile[name])
            config.add_optimization_profile(profile)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise GraphoptError(
                    f"TensorRT could not build {plan.onnx_path.name} (see its log above); check the graph with "
                    "graphopt.exporters.trt_check.check_onnx"
                )
            atomic_write_bytes(plan.engine_path, bytes(serialized))
        seconds = time.perf_counter() - start
        results.append(EngineBuild(plan.onnx_path, plan.engine_path, plan.precision, strongly_typed, seconds))
    if cache_path is not None and cache is not None:
        atomic_write_bytes(cache_path, bytes(cache.serialize()))
    return results


@contextlib.contextmanager
def tensorrt_onnx(path: Path, out_dir: Path, dtype: str | None) -> Iterator[Path]:
    """The ONNX file TensorRT parses for `path`: `path` itself, or a copy in `out_dir` where the model
    must be cast to `dtype` (strong typing) or computes a bool Where on uint8 (onnxruntime's
    workaround, restored by trt_check.restore_bool_where). The copy is removed afterwards, whether
    the build succeeded or failed."""
    import onnx

    if dtype is None and not restore_bool_where(onnx.load(str(path), load_external_data=False)):
        yield path
        return
    model = onnx.load(str(path))            # with its weights: the copy lives in another folder
    restore_bool_where(model)
    if dtype is not None:
        model = cast_float_precision(model, dtype, keep_io_types=True)
    target = out_dir / f"{path.stem}.{dtype or 'float32'}.onnx"
    side = target.with_name(f"{target.name}.data")
    try:
        # Protobuf caps a message at 2 GB: bigger segments keep their weights in a side file.
        external = model.ByteSize() > 1_800_000_000
        onnx.save(model, str(target), save_as_external_data=external, location=side.name if external else None)
        yield target
    finally:
        target.unlink(missing_ok=True)
        side.unlink(missing_ok=True)


# -- running ---------------------------------------------------------------------------------------


class TrtRunner(BlockRunner):
    """One engine with its execution context; runs on torch's current CUDA stream."""

    def __init__(self, engine: Any, context: Any, segment: Segment, device: torch.device | str, keepalive: Any = None):
        super().__init__(segment, device)
        trt = import_tensorrt()
        self.engine, self.context = engine, context
        self._keepalive = keepalive  # the runtime/buffer the engine and context borrow from
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]

        def spec(name: str) -> TensorSpec:
            dtype = _TRT_DTYPES.get(str(engine.get_tensor_dtype(name)).split(".")[-1])
            if dtype is None:
                raise GraphoptError(f"engine tensor '{name}' has type {engine.get_tensor_dtype(name)}, not bindable")
            shape = tuple(d if d >= 0 else f"dynamic{i}" for i, d in enumerate(engine.get_tensor_shape(name)))
            return TensorSpec(name, dtype, shape)

        io = Segment(
            kind=MODEL_KIND,
            file=segment.file,
            inputs=tuple(spec(n) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT),
            outputs=tuple(spec(n) for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT),
        )
        compare_io(segment, io)

    @classmethod
    def from_file(cls, path: str | os.PathLike, segment: Segment, device: torch.device | str = "cuda") -> TrtRunner:
        """A runner owning its own activation memory (e.g. the single-file If layout's one engine)."""
        trt = import_tensorrt()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = _deserialize(runtime, Path(path))
        return cls(engine, engine.create_execution_context(), segment, device, keepalive=runtime)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ready = self.prepare(inputs)
        for name, tensor in ready.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise GraphoptError(
                    f"engine '{self.segment.label}': input '{name}' shape {list(tensor.shape)} is outside the "
                    "optimization profile it was built with; rebuild with wider dim_ranges"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for spec in self.segment.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise GraphoptError(f"engine '{self.segment.label}': output '{spec.name}' has a data-dependent shape")
            out = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype], device=self.device)
            self.context.set_tensor_address(spec.name, out.data_ptr())
            outputs[spec.name] = out
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise GraphoptError(f"TensorRT failed to enqueue engine '{self.segment.label}'")
        return outputs


class TensorRTBackend:
    """Loads `<engine_dir>/<segment stem>.engine` for every segment; all contexts share one activation
    buffer sized to the largest engine's need. Sharing is safe because the orchestrator runs one segment
    at a time on one CUDA stream; do not run two of these runners concurrently."""

    def __init__(self, engine_dir: str | os.PathLike):
        self.engine_dir = Path(engine_dir)
        self.activation_bytes = 0

    def load(self, manifest: SegmentedManifest, device: torch.device) -> list[BlockRunner]:
        trt = import_tensorrt()
        device = torch.device(device)
        if device.type != "cuda":
            raise GraphoptError(f"TensorRT engines run on a CUDA device, not {device}")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines = [_deserialize(runtime, self.engine_dir / f"{seg.label}.engine") for seg in manifest.segments]
        self.activation_bytes = max(int(e.device_memory_size_v2) for e in engines)
        # torch's allocator aligns to 512 bytes, above the 256 TensorRT requires.
        activations = torch.empty(max(self.activation_bytes, 1), dtype=torch.uint8, device=device)
        runners: list[BlockRunner] = []
        for seg, engine in zip(manifest.segments, engines):
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_device_memory(activations.data_ptr(), activations.numel())
            runners.append(TrtRunner(engine, context, seg, device, keepalive=(runtime, activations)))
        return runners


def _deserialize(runtime: Any, path: Path) -> Any:
    if not path.is_file():
        raise GraphoptError(f"engine file not found: {path}; build it with graphopt.exporters.tensorrt.build_engines")
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise GraphoptError(
            f"TensorRT could not load {path}: engines only load on the TensorRT version and GPU they were built for"
        )
    return engine


# -- parity (Polygraphy-style: same inputs through TensorRT and onnxruntime) -------------------------


@dataclass(frozen=True)
class ParityRow:
    segment: str
    output: str
    rel_error: float  # ||trt - ort|| / ||ort||; for bool outputs the fraction of differing elements


@dataclass
class ParityReport:
    rows: list[ParityRow]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(row.rel_error <= self.tolerance for row in self.rows)

    @property
    def worst(self) -> ParityRow:
        return max(self.rows, key=lambda r: r.rel_error)

    def render(self) -> str:
        lines = [f"TensorRT vs onnxruntime (tolerance {self.tolerance:g}): {'ok' if self.ok else 'FAILED'}"]
        for r in self.rows:
            verdict = "FAIL" if r.rel_error > self.tolerance else "ok  "
            lines.append(f"  {verdict} {r.segment}:{r.output} rel. error {r.rel_error:.3e}")
        return "\n".join(lines)


def parity_check(
    source: str | os.PathLike | SegmentedManifest,
    engines: str | os.PathLike,
    feeds: Mapping[str, torch.Tensor],
    device: str | torch.device = "cuda",
    tolerance: float = 1e-2,
) -> ParityReport:
    """Run the same inputs through onnxruntime (CPU, float32 reference) and TensorRT and compare.

    Segmented: `source` is the manifest, `engines` the engine folder; every segment runs (no gating),
    each fed the reference chain's values, so an error is pinned to one segment. Single file: `source`
    is the .onnx, `engines` the .engine file.
    """
    from graphopt.exporters.ort_runner import OrtBackend, OrtRunner

    cpu = torch.device("cpu")
    rows = []
    if isinstance(source, SegmentedManifest) or Path(source).suffix != ".onnx":
        manifest = source if isinstance(source, SegmentedManifest) else SegmentedManifest.load(source)
        trt_runners = TensorRTBackend(engines).load(manifest, torch.device(device))
        trace = run_all_segments(OrtBackend().load(manifest, cpu), manifest, feeds)
        for (ref_runner, seg_inputs, expected), trt_runner in zip(trace, trt_runners):
            got = trt_runner(seg_inputs)
            rows += [ParityRow(ref_runner.segment.label, k, _rel_error(got[k], v)) for k, v in expected.items()]
    else:
        segment = Segment.from_onnx(source)
        expected = OrtRunner(source, segment, cpu)(feeds)
        got = TrtRunner.from_file(engines, segment, device)(feeds)
        rows += [ParityRow(segment.label, k, _rel_error(got[k], v)) for k, v in expected.items()]
    return ParityReport(rows, tolerance)


def _rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got = got.detach().to("cpu")
    if expected.dtype == torch.bool:
        return float((got != expected).double().mean()) if expected.numel() else 0.0
    expected = expected.double()
    return float((got.double() - expected).norm() / expected.norm().clamp_min(1e-30))
