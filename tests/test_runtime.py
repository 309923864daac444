"""Segmented layout: manifest contract, onnxruntime runners, and the host-side orchestrator.

The fixture is a real (tiny) routed video DiT in torch: prologue (patch embed, timestep MLP, text
projection, router -> gates), four adaLN blocks with self- and cross-attention (blocks 1 and 2 routed),
epilogue (final norm + unpatchify). Each segment is exported to ONNX with a dynamic batch and frame
count, a manifest is written, and the orchestrator is compared against the torch composition.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from graphopt.errors import GraphoptError
from graphopt.exporters.manifest import SegmentedManifest, next_name
from graphopt.exporters.ort_runner import OrtBackend, OrtRunner
from graphopt.exporters.runtime import SegmentedModel
from graphopt.exporters.specs import Segment, TensorSpec

CHANNELS, HEIGHT, WIDTH, FRAMES = 4, 8, 8, 2
DIM, HEADS, TEXT_DIM, TEXT_LEN = 64, 4, 32, 8
TOKENS_PER_FRAME = (HEIGHT // 2) * (WIDTH // 2)
N_BLOCKS, ROUTED = 4, (1, 2)  # blocks 1 and 2 own gate columns 0 and 1
TOLERANCE = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Prologue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(CHANNELS * 4, DIM)
        self.t_in = nn.Linear(32, DIM)
        self.t_out = nn.Linear(DIM, DIM)
        self.mod = nn.Linear(DIM, 6 * DIM)
        self.text = nn.Linear(TEXT_DIM, DIM)
        self.router = nn.Linear(2 * DIM, len(ROUTED))

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, h, w = hidden_states.shape
        patches = hidden_states.reshape(b, c, f, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 1, 4, 6)
        x = self.patch(patches.reshape(b, -1, c * 4))
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
        angles = timestep[:, None] * freqs[None]
        temb = self.t_out(F.silu(self.t_in(torch.cat([angles.cos(), angles.sin()], dim=1))))
        mod = self.mod(F.silu(temb)).unflatten(1, (6, DIM))
        ctx = self.text(encoder_hidden_states)
        gates = self.router(torch.cat([temb, x.mean(1)], dim=1)) > 0
        return x, temb, mod, ctx, gates


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))

    def forward(self, x, ctx):
        def heads(t):
            return t.unflatten(2, (HEADS, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(ctx)), heads(self.v(ctx)))
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, DIM) * 0.1)
        self.self_attn, self.cross_attn = Attention(), Attention()
        self.ff = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x, mod, ctx):
        sh1, sc1, g1, sh2, sc2, g2 = (mod + self.table).unbind(1)
        y = F.layer_norm(x, (DIM,)) * (1 + sc1[:, None]) + sh1[:, None]
        x = x + g1[:, None] * self.self_attn(y, y)
        x = x + self.cross_attn(F.layer_norm(x, (DIM,)), ctx)
        y = F.layer_norm(x, (DIM,)) * (1 + sc2[:, None]) + sh2[:, None]
        return x + g2[:, None] * self.ff(y)


class Epilogue(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mod = nn.Linear(DIM, 2 * DIM)
        self.proj = nn.Linear(DIM, CHANNELS * 4)

    def forward(self, x, temb):
        shift, scale = self.mod(F.silu(temb)).chunk(2, dim=1)
        out = self.proj(F.layer_norm(x, (DIM,)) * (1 + scale[:, None]) + shift[:, None])
        b = out.shape[0]
        out = out.reshape(b, -1, HEIGHT // 2, WIDTH // 2, CHANNELS, 2, 2).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(b, CHANNELS, -1, HEIGHT, WIDTH)


class TinyRoutedDiT(nn.Module):
    """The torch reference: per-sample gating is stream = where(gate, block(stream), stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.prologue = Prologue()
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.epilogue = Epilogue()

    @torch.no_grad()
    def forward(self, hidden_states, timestep, encoder_hidden_states, gates=None):
        # Single-threaded: for ops this small, thread hand-offs cost ~100x the math on a busy 2-core box.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            x, temb, mod, ctx, router_gates = self.prologue(hidden_states, timestep, encoder_hidden_states)
            gates = router_gates if gates is None else torch.as_tensor(gates)
            for index, block in enumerate(self.blocks):
                new = block(x, mod, ctx)
                if index in ROUTED:
                    new = torch.where(gates[:, ROUTED.index(index)].view(-1, 1, 1), new, x)
                x = new
            return self.epilogue(x, temb), router_gates
        finally:
            torch.set_num_threads(threads)


def make_inputs(batch: int, frames: int = FRAMES, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, CHANNELS, frames, HEIGHT, WIDTH, generator=g),
        "timestep": torch.linspace(50.0, 950.0, batch),
        "encoder_hidden_states": torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
    }


def spec(name, dtype, *shape):
    return TensorSpec(name, dtype, shape)


def build_manifest() -> SegmentedManifest:
    hs = spec("hidden_states", "float32", "batch", CHANNELS, "frames", HEIGHT, WIDTH)
    ts = spec("timestep", "float32", "batch")
    text = spec("encoder_hidden_states", "float32", "batch", TEXT_LEN, TEXT_DIM)
    x = spec("x", "float32", "batch", "tokens", DIM)
    temb = spec("temb", "float32", "batch", DIM)
    mod = spec("mod", "float32", "batch", 6, DIM)
    ctx = spec("ctx", "float32", "batch", TEXT_LEN, DIM)
    gates = spec("gates", "bool", "batch", len(ROUTED))
    sample = spec("sample", "float32", "batch", CHANNELS, "frames", HEIGHT, WIDTH)
    blocks = [
        Segment(
            "block", f"block_{i:02d}.onnx", (x, mod, ctx), (spec(next_name("x"), "float32", *x.shape),),
            block=i, gate=ROUTED.index(i) if i in ROUTED else None,
        )
        for i in range(N_BLOCKS)
    ]
    return SegmentedManifest(
        inputs=(hs, ts, text),
        outputs=(sample,),
        stream=("x",),
        gates="gates",
        segments=(
            Segment("prologue", "prologue.onnx", (hs, ts, text), (x, temb, mod, ctx, gates)),
            *blocks,
            Segment("epilogue", "epilogue.onnx", (x, temb), (sample,)),
        ),
        dims={"batch": {"min": 1, "opt": 2, "max": 4}, "frames": {"min": 1, "opt": 2, "max": 4},
              "tokens": {"min": 16, "opt": 32, "max": 64}},
        config={"in_channels": CHANNELS, "patch_size": [1, 2, 2]},
    )


def export(module, args, path, input_names, output_names, dynamic_axes):
    # The legacy exporter is ~10x faster than dynamo=True here; the dynamo path is covered below.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyRoutedDiT().eval()
    inputs = make_inputs(3)
    # Place the router's threshold between samples so its decisions are mixed and far from 0:
    # column 0 keeps the two highest-scoring samples, column 1 only the highest.
    with torch.no_grad():
        x, temb, *_ = model.prologue(*inputs.values())
        logits = model.prologue.router(torch.cat([temb, x.mean(1)], dim=1))
        ranked = logits.sort(dim=0).values
        thresholds = torch.stack([(ranked[0, 0] + ranked[1, 0]) / 2, (ranked[1, 1] + ranked[2, 1]) / 2])
        model.prologue.router.bias -= thresholds
    root = tmp_path_factory.mktemp("segmented")
    bt = {0: "batch"}
    with torch.no_grad():
        x, temb, mod, ctx, _ = model.prologue(*inputs.values())
        export(model.prologue, tuple(inputs.values()), root / "prologue.onnx",
               ["hidden_states", "timestep", "encoder_hidden_states"], ["x", "temb", "mod", "ctx", "gates"],
               {"hidden_states": {0: "batch", 2: "frames"}, "timestep": bt, "encoder_hidden_states": bt,
                "x": {0: "batch", 1: "tokens"}, "temb": bt, "mod": bt, "ctx": bt, "gates": bt})
        for i, block in enumerate(model.blocks):
            export(block, (x, mod, ctx), root / f"block_{i:02d}.onnx", ["x", "mod", "ctx"], ["x_next"],
                   {"x": {0: "batch", 1: "tokens"}, "mod": bt, "ctx": bt, "x_next": {0: "batch", 1: "tokens"}})
        export(model.epilogue, (x, temb), root / "epilogue.onnx", ["x", "temb"], ["sample"],
               {"x": {0: "batch", 1: "tokens"}, "temb": bt, "sample": {0: "batch", 2: "frames"}})
    manifest = build_manifest()
    manifest.save(root)
    return root, model, inputs


@pytest.fixture()
def runtime(segmented):
    root, model, inputs = segmented
    return SegmentedModel(SegmentedManifest.load(root)), model, inputs


def test_manifest_round_trip_and_file_io_match(segmented):
    root, _, _ = segmented
    loaded = SegmentedManifest.load(root / "manifest.json")
    saved = loaded.to_json()
    assert set(saved.pop("files")) == {s.file for s in loaded.segments}   # save adds their hashes
    assert saved == build_manifest().to_json()
    assert [b.block for b in loaded.blocks] == [0, 1, 2, 3] and loaded.n_routed == 2
    loaded.verify_onnx()
    assert not list(root.glob(".manifest.*")), "atomic save leaves no temp file behind"


def test_all_gates_on_equals_torch_composition(runtime):
    model, reference, inputs = runtime
    model.force_gates = "all"
    (out,) = model(**inputs, return_dict=False)
    expected, _ = reference(**inputs, gates=torch.ones(3, len(ROUTED), dtype=torch.bool))
    assert out.shape == expected.shape == (3, CHANNELS, FRAMES, HEIGHT, WIDTH)
    assert rel_err(out, expected) < TOLERANCE
    assert model.records[-1].executed == (0, 1, 2, 3) and model.records[-1].skipped == ()


def test_mixed_forced_gates_give_each_sample_what_it_gets_alone(runtime):
    model, reference, inputs = runtime
    mask = np.array([[True, False], [False, True], [True, True]])
    model.force_gates = mask
    out = model(**inputs, return_dict=False)[0]
    expected, _ = reference(**inputs, gates=torch.from_numpy(mask))
    assert rel_err(out, expected) < TOLERANCE
    for i in range(3):
        alone = {k: v[i : i + 1] for k, v in inputs.items()}
        expected_alone, _ = reference(**alone, gates=torch.from_numpy(mask[i : i + 1]))
        assert rel_err(out[i : i + 1], expected_alone) < TOLERANCE
        model.force_gates = mask[i]  # one row, broadcast over the batch of one
        assert rel_err(model(**alone, return_dict=False)[0], expected_alone) < TOLERANCE


def test_router_decided_gates_match_torch(runtime):
    model, reference, inputs = runtime
    out = model(**inputs, return_dict=False)[0]
    expected, router_gates = reference(**inputs)
    record = model.records[-1]
    np.testing.assert_array_equal(record.gates, router_gates.numpy())
    assert record.gates.sum(0).tolist() == [2, 1], "the fixture's router must make mixed decisions"
    assert rel_err(out, expected) < TOLERANCE


def test_skipped_blocks_are_not_run(runtime):
    model, reference, inputs = runtime
    model.force_gates = np.array([False, True])  # block 1 off for every sample
    before = model.runner_calls()
    out = model(**inputs, return_dict=False)[0]
    after = model.runner_calls()
    ran = {name for name in after if after[name] != before[name]}
    assert ran == {"prologue", "block_00", "block_02", "block_03", "epilogue"}
    assert model.records[-1].executed == (0, 2, 3) and model.records[-1].skipped == (1,)
    expected, _ = reference(**inputs, gates=torch.tensor([[False, True]] * 3))
    assert rel_err(out, expected) < TOLERANCE


def test_dynamic_frames_and_batch(runtime):
    model, reference, _ = runtime
    model.force_gates = "all"
    for batch, frames in ((1, 3), (2, 1), (1, 3)):
        inputs = make_inputs(batch, frames, seed=batch + frames)
        out = model(**inputs, return_dict=False)[0]
        expected, _ = reference(**inputs, gates=torch.ones(batch, len(ROUTED), dtype=torch.bool))
        assert out.shape == (batch, CHANNELS, frames, HEIGHT, WIDTH)
        assert rel_err(out, expected) < TOLERANCE


def test_diffusers_call_conventions(runtime):
    model, reference, inputs = runtime
    assert model.config.in_channels == CHANNELS and model.dtype == torch.float32
    with model.cache_context("cond", step_index=0):
        result = model(
            hidden_states=inputs["hidden_states"], timestep=torch.tensor(500.0),  # one timestep for the batch
            encoder_hidden_states=inputs["encoder_hidden_states"], attention_kwargs=None,
        )
    expected, _ = reference(inputs["hidden_states"], torch.full((3,), 500.0), inputs["encoder_hidden_states"])
    assert rel_err(result.sample, expected) < TOLERANCE
    assert model.records[-1].context == "cond" and model.records[-1].seconds > 0
    with pytest.raises(GraphoptError, match="no input for \\['guidance'\\]"):
        model(**inputs, guidance=torch.ones(3))
    with pytest.raises(GraphoptError, match="needs 'encoder_hidden_states'"):
        model(hidden_states=inputs["hidden_states"], timestep=inputs["timestep"])
    with pytest.raises(GraphoptError, match="expects \\['batch', 4, 'frames', 8, 8\\]"):
        model(**{**inputs, "hidden_states": torch.randn(3, CHANNELS, 2, 16, 16)})
    with pytest.raises(GraphoptError, match="bool of shape \\[2\\]"):
        model.force_gates = np.ones(3, dtype=bool)


def test_denoising_loop_records_each_call(runtime):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, _, inputs = runtime
    model.reset_records()
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(3)
    latents = inputs["hidden_states"]
    for i, t in enumerate(scheduler.timesteps):
        with model.cache_context("cond", step_index=i):
            noise = model(hidden_states=latents, timestep=t.expand(3),
                          encoder_hidden_states=inputs["encoder_hidden_states"], return_dict=False)[0]
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
    assert torch.isfinite(latents).all()
    assert [r.step for r in model.records] == [0, 1, 2]
    assert all(set(r.executed) >= {0, 3} for r in model.records)  # unrouted blocks always run


def test_dynamo_exported_block_runs_through_the_same_contract(segmented, tmp_path):
    root, reference, inputs = segmented
    manifest = SegmentedManifest.load(root)
    block = manifest.blocks[1]
    with torch.no_grad():
        x, _, mod, ctx, _ = reference.prologue(*inputs.values())
        batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(reference.blocks[1], (x, mod, ctx), str(tmp_path / block.file), dynamo=True,
                              input_names=["x", "mod", "ctx"], output_names=["x_next"], verbose=False,
                              dynamic_shapes={"x": {0: batch, 1: tokens}, "mod": {0: batch}, "ctx": {0: batch}})
        runner = OrtRunner(tmp_path / block.file, block)
        out = runner({"x": x, "mod": mod, "ctx": ctx})["x_next"]
        assert rel_err(out, reference.blocks[1](x, mod, ctx)) < TOLERANCE


def test_segments_pass_the_tensorrt_checker(segmented):
    from graphopt.exporters.trt_check import check_segmented

    root, _, _ = segmented
    reports = check_segmented(root)
    files = ["prologue.onnx", *(f"block_{i:02d}.onnx" for i in range(N_BLOCKS)), "epilogue.onnx"]
    assert [r.source for r in reports] == files
    assert all(r.findings == [] for r in reports), "\n".join(r.render() for r in reports)


def _write_variant(root, tmp_path, edit):
    target = tmp_path / "variant"
    shutil.copytree(root, target)
    data = json.loads((target / "manifest.json").read_text())
    edit(data)
    (target / "manifest.json").write_text(json.dumps(data))
    return target / "manifest.json"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(version=2), "version 2 is not supported"),
        (lambda d: d.update(format="other"), "not a graphopt segmented manifest"),
        (lambda d: d["segments"][2].update(file="block_09.onnx"), "'block_09.onnx' is missing"),
        (lambda d: d["segments"][2]["inputs"][2].update(name="context"), "reads 'context', which is none of"),
        (lambda d: d["segments"][2]["inputs"][1].update(dtype="float16"), "reads 'mod' as float16"),
        (lambda d: d["segments"][2]["outputs"][0].update(name="x_out"), "stream name \\+ '_next'"),
        (lambda d: d["segments"][3].update(gate=0), "gate columns are \\[0, 0\\]"),
        (lambda d: d["segments"][3].update(block=0), "must increase strictly"),
        (lambda d: d.update(gates=None), "have a gate column but the manifest has no 'gates'"),
        (lambda d: d["segments"][-1]["outputs"][0].update(name="out"), "epilogue outputs \\['out'\\] differ"),
        (lambda d: d["dims"].update(height={"min": 1, "opt": 1, "max": 1}), "no tensor uses"),
        (lambda d: d["dims"]["batch"].update(min=3), "min <= opt <= max"),
        (lambda d: d["segments"].reverse(), "one prologue, the blocks in order, then one epilogue"),
        (lambda d: d["segments"][2].update(reuse={"slots": {"x": "b_s0"}, "forecast": {"slopes": {"y": "b_d"},
                                                                                       "time": "b_t"}}),
         "'reuse' must be .*forecast.* for the same streams"),
        (lambda d: d["segments"][2].update(reuse={"forecast": {"slopes": {"x": "b_d"}, "time": "b_t"}}),
         "'reuse' must be"),
    ],
)
def test_bad_manifest_is_refused_with_a_named_problem(segmented, tmp_path, edit, message):
    root, _, _ = segmented
    with pytest.raises(GraphoptError, match=message):
        SegmentedManifest.load(_write_variant(root, tmp_path, edit))


def test_manifest_that_disagrees_with_the_onnx_file_is_refused(segmented, tmp_path):
    root, _, _ = segmented

    def rename_everywhere(d):  # consistent manifest, but the files still say 'ctx'
        for seg in d["segments"]:
            for t in seg["inputs"] + seg["outputs"]:
                t["name"] = "context" if t["name"] == "ctx" else t["name"]

    path = _write_variant(root, tmp_path, rename_everywhere)
    manifest = SegmentedManifest.load(path)
    with pytest.raises(GraphoptError, match="outputs are .*'ctx'.* but the manifest declares .*'context'"):
        manifest.verify_onnx()
    with pytest.raises(GraphoptError, match="but the manifest declares"):
        OrtBackend().load(manifest, torch.device("cpu"))


@pytest.mark.trt
def test_tensorrt_segmented_engines_match(segmented, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install tensorrt on an NVIDIA machine)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA device")
    from graphopt.exporters.tensorrt import BuildOptions, TensorRTBackend, build_engines, parity_check

    root, reference, inputs = segmented
    builds = build_engines(root, tmp_path, BuildOptions("fp16", timing_cache=tmp_path / "timing.cache"))
    stems = ["prologue", *(f"block_{i:02d}" for i in range(N_BLOCKS)), "epilogue"]
    assert [b.engine_path.name for b in builds] == [f"{s}.engine" for s in stems]
    report = parity_check(root, tmp_path, inputs, tolerance=2e-2)
    assert report.ok, report.render()
    backend = TensorRTBackend(tmp_path)
    mask = np.array([[True, False], [False, True], [True, True]])
    model = SegmentedModel(root, backend=backend, device="cuda", force_gates=mask)
    out = model(**inputs, return_dict=False)[0]
    expected, _ = reference(**inputs, gates=torch.from_numpy(mask))
    assert out.device.type == "cuda" and rel_err(out.cpu(), expected) < 2e-2
    assert backend.activation_bytes > 0
