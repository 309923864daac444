"""The family table against the real diffusers classes: shapes, token order, attention layouts, export."""

import dataclasses
import json
import re

import diffusers
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from graphopt.errors import GraphoptError
from graphopt.families import FAMILIES, build_from_recipe, build_model, family_for, spec_from_recipe
from graphopt.layout import InputSpec, SequenceLayout, VideoPosition

# Worked out by hand from each tiny config and default spec: (token grid after patchify, output shape).
EXPECTED = {
    "wan": ((3, 4, 6), (1, 4, 3, 8, 12)),  # patch (1, 2, 2) over 3x8x12
    "skyreels-v2": ((3, 4, 6), (1, 4, 3, 8, 12)),
    "hunyuan-video": ((3, 4, 6), (1, 4, 3, 8, 12)),  # patch_size_t 1, patch_size 2
    "ltx-video": ((3, 8, 12), (1, 288, 4)),  # patch 1: 3*8*12 packed tokens in, tokens out
    "mochi": ((3, 4, 6), (1, 4, 3, 8, 12)),  # frames unpatched, patch 2
    "latte": ((3, 4, 4), (1, 8, 3, 8, 8)),  # patch 2 over 3x8x8, learned sigma: 8 out channels
    "dit": ((1, 4, 4), (2, 8, 8, 8)),  # images: one frame, batch 2
    "pixart": ((1, 4, 4), (2, 8, 8, 8)),
    "cogvideox": ((3, 4, 6), (1, 3, 4, 8, 12)),  # latent and output are (B, F, C, H, W)
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_table_covers_the_requested_families():
    assert set(FAMILIES) == set(EXPECTED)
    for family in FAMILIES.values():
        assert family.timestep_input == "timestep" and family.latent_input == "hidden_states"
        inputs = family.example_inputs(family.tiny_config, family.default_spec)
        named = {family.latent_input, family.timestep_input, *family.text_inputs}
        assert named <= set(inputs), family.name
        assert inputs["return_dict"] is False


@pytest.mark.parametrize("name", EXPECTED)
def test_token_layout_matches_patchify(name):
    family = FAMILIES[name]
    assert family.token_layout(family.tiny_config, family.default_spec) == EXPECTED[name][0]


@pytest.mark.parametrize("name", EXPECTED)
def test_tiny_forward_gives_expected_shape(name):
    family = FAMILIES[name]
    model = build_model(family)
    with torch.no_grad():
        (output,) = model(**family.example_inputs(family.tiny_config, family.default_spec))
    assert tuple(output.shape) == EXPECTED[name][1]
    assert torch.isfinite(output).all() and output.std() > 0


def sdpa_module_paths(program: torch.export.ExportedProgram) -> list[str]:
    paths = []
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.scaled_dot_product_attention.default:
            paths.append(list(node.meta["nn_module_stack"].values())[-1][0])
    return paths


@pytest.mark.parametrize("name", EXPECTED)
def test_tiny_model_exports_and_every_attention_has_a_layout(name):
    family = FAMILIES[name]
    spec = family.default_spec
    model = family.prepare_for_export(build_model(family), spec)
    inputs = family.example_inputs(family.tiny_config, spec)
    program = torch.export.export(model, (), inputs, strict=False)

    paths = sdpa_module_paths(program)
    assert paths, "no scaled_dot_product_attention in the exported graph"
    used = {family.attention_layout(path).path for path in paths}
    assert used == {layout.path for layout in family.attentions}, "a declared attention pattern matches nothing"

    with torch.no_grad():
        (expected,) = model(**inputs)
        (exported,) = program.module()(**inputs)
    assert relative_error(exported, expected) <= 1e-5


class RecordAttention(TorchFunctionMode):
    """Records (module path, q, k) of every F.scaled_dot_product_attention call."""

    def __init__(self, module_stack: list[str]):
        super().__init__()
        self.module_stack = module_stack
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key = (args + tuple(kwargs.values()))[:2]
            self.calls.append((self.module_stack[-1], query.clone(), key.clone()))
        return func(*args, **kwargs)


def run_recording(model: torch.nn.Module, inputs: dict, block_patterns: list[str]):
    """Eager forward that records every attention call and every block's first output."""
    names = {id(module): name for name, module in model.named_modules()}
    stack: list[str] = []
    block_outputs: dict[str, torch.Size] = {}

    def push(module, args):
        stack.append(names.get(id(module), "?"))

    def pop(module, args, output):
        name = stack.pop()
        if any(re.fullmatch(pattern, name) for pattern in block_patterns):
            block_outputs[name] = (output[0] if isinstance(output, tuple) else output).shape

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(push),
        torch.nn.modules.module.register_module_forward_hook(pop),
    ]
    try:
        with torch.no_grad(), RecordAttention(stack) as recorder:
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.calls, block_outputs


@pytest.mark.parametrize("name", EXPECTED)
def test_attention_and_block_layouts_match_eager_shapes(name):
    family = FAMILIES[name]
    config = family.tiny_config
    spec = dataclasses.replace(family.default_spec, batch=2)  # rows != samples for frame/temporal layouts
    calls, block_outputs = run_recording(
        build_model(family), family.example_inputs(config, spec), [b.path for b in family.blocks]
    )

    assert {family.attention_layout(path).path for path, _, _ in calls} == {a.path for a in family.attentions}
    for path, query, key in calls:
        query_layout, key_layout = family.sequence_layouts(path, config, spec)
        for layout, shape in ((query_layout, query.shape), (key_layout, key.shape)):
            assert shape[0] == layout.rows, (path, layout, shape)
            if layout.length is not None:
                assert shape[2] == layout.length, (path, layout, shape)

    layers = sum(config.get(key, 0) for key in ("num_layers", "num_single_layers"))
    if name == "latte":
        layers *= 2  # one spatial and one temporal block per layer
    assert len(block_outputs) == layers
    for path, shape in block_outputs.items():
        stream = family.block_stream(path, config, spec)
        assert (shape[0], shape[1]) == (stream.rows, stream.length), (path, stream, shape)


def perturbed_latent_index(family, spec, sample, frame, y, x):
    """Index of latent pixel (sample, frame, y, x) in the family's latent input layout."""
    if family.latent_layout == "BCFHW":
        return (sample, 0, frame, y, x)
    if family.latent_layout == "BFCHW":
        return (sample, frame, 0, y, x)
    if family.latent_layout == "BCHW":
        return (sample, 0, y, x)
    # "BNC": LTX's pipeline packs row-major (frame, y, x) tokens; its tiny config has patch size 1.
    return (sample, (frame * spec.height + y) * spec.width + x, 0)


def block_input_change(model, inputs_a, inputs_b, block_path):
    """The (row, token) entries of `block_path`'s hidden_states input that differ between two calls."""
    captured = []

    def grab(module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = model.get_submodule(block_path).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs_a)
            model(**inputs_b)
    finally:
        handle.remove()
    changed = (captured[0] - captured[1]).abs().amax(dim=-1) > 0
    return [tuple(index) for index in changed.nonzero().tolist()]


@pytest.mark.parametrize("name", EXPECTED)
def test_one_latent_pixel_moves_the_token_the_layout_names(name):
    family = FAMILIES[name]
    config = family.tiny_config
    spec = dataclasses.replace(family.default_spec, batch=2)
    frames, height, width = family.token_layout(config, spec)
    patch_t, patch_h, patch_w = spec.frames // frames, spec.height // height, spec.width // width
    sample, frame, y, x = 1, spec.frames - 1, spec.height - 1, 2

    model = build_model(family)
    inputs = family.example_inputs(config, spec)
    moved = dict(inputs)
    moved["hidden_states"] = inputs["hidden_states"].clone()
    moved["hidden_states"][perturbed_latent_index(family, spec, sample, frame, y, x)] += 1.0

    expected = VideoPosition(sample, frame // patch_t, y // patch_h, x // patch_w)

    first_block = next(path for path, _ in model.named_modules() if re.fullmatch(family.blocks[0].path, path))
    changed = block_input_change(model, inputs, moved, first_block)
    assert len(changed) == 1
    assert family.block_stream(first_block, config, spec).locate(*changed[0]) == expected

    # The first attention with video queries sees the change at one query token; for joint attention
    # that token's index counts the text tokens placed before the video.
    calls, _ = run_recording(model, inputs, [])
    moved_calls, _ = run_recording(model, moved, [])
    path = next(path for path, _, _ in calls if family.attention_layout(path).query != "text")
    query = torch.cat([q for p, q, _ in calls if p == path])  # per-sample attentions: one call per sample
    moved_query = torch.cat([q for p, q, _ in moved_calls if p == path])
    changed = ((query - moved_query).abs().amax(dim=(1, 3)) > 0).nonzero().tolist()
    assert len(changed) == 1
    layout, _ = family.sequence_layouts(path, config, spec)
    layout = dataclasses.replace(layout, samples=spec.batch)
    assert layout.locate(*changed[0]) == expected


def test_latte_temporal_blocks_see_one_frame_at_every_position():
    family = FAMILIES["latte"]
    config = family.tiny_config
    spec = dataclasses.replace(family.default_spec, batch=2)
    model = build_model(family)
    inputs = family.example_inputs(config, spec)
    moved = dict(inputs)
    moved["hidden_states"] = inputs["hidden_states"].clone()
    moved["hidden_states"][1, 0, 2, 5, 3] += 1.0  # sample 1, frame 2

    changed = block_input_change(model, inputs, moved, "temporal_transformer_blocks.0")
    stream = family.block_stream("temporal_transformer_blocks.0", config, spec)
    positions = {stream.locate(row, token) for row, token in changed}
    # The spatial block before spreads the change over frame 2 of sample 1, and nowhere else.
    assert positions == {VideoPosition(1, 2, row, column) for row in range(4) for column in range(4)}


def test_sequence_layout_locate_and_coords():
    joint = SequenceLayout("video", samples=2, frames=2, height=2, width=3, text_before=4)
    assert joint.rows == 2 and joint.length == 16
    assert joint.locate(1, 3) is None
    assert joint.locate(1, 4 + 6 + 3 + 2) == VideoPosition(1, 1, 1, 2)
    after = SequenceLayout("video", samples=1, frames=2, height=2, width=3, text_after=5)
    assert after.locate(0, 11) == VideoPosition(0, 1, 1, 2) and after.locate(0, 12) is None

    frame = SequenceLayout("frame", samples=2, frames=3, height=2, width=3)
    assert frame.rows == 6 and frame.length == 6
    assert frame.locate(4, 5) == VideoPosition(1, 1, 1, 2)
    temporal = SequenceLayout("temporal", samples=2, frames=3, height=2, width=3)
    assert temporal.rows == 12 and temporal.length == 3
    assert temporal.locate(10, 2) == VideoPosition(1, 2, 1, 1)

    for layout in (joint, after, frame, temporal):
        for row in range(layout.rows):
            located = (layout.locate(row, token) for token in range(layout.length))
            expected = [[-1, -1, -1] if p is None else list(p[1:]) for p in located]
            assert layout.coords(row).tolist() == expected

    with pytest.raises(GraphoptError, match="outside"):
        frame.locate(6, 0)
    with pytest.raises(GraphoptError, match="no video tokens"):
        SequenceLayout("text", samples=1, frames=1, height=1, width=1).coords()


def test_joint_attention_text_placement():
    spec = FAMILIES["hunyuan-video"].default_spec
    query, key = FAMILIES["hunyuan-video"].sequence_layouts("single_transformer_blocks.1.attn", {}, spec)
    assert (query.text_before, query.text_after) == (0, spec.text_len)  # HunyuanVideo: [video, text]
    query, _ = FAMILIES["cogvideox"].sequence_layouts("transformer_blocks.0.attn1", {}, spec)
    assert (query.text_before, query.text_after) == (spec.text_len, 0)  # CogVideoX: [text, video]
    query, key = FAMILIES["wan"].sequence_layouts("blocks.0.attn2", {}, spec)
    assert (query.kind, key.kind, query.length) == ("video", "text", 3 * 4 * 6)


def test_family_for_accepts_model_config_and_names(tmp_path):
    model = build_model("wan")
    wan = FAMILIES["wan"]
    assert family_for(model) is wan
    model.save_config(tmp_path)
    assert family_for(json.loads((tmp_path / "config.json").read_text())) is wan
    assert family_for("WanTransformer3DModel") is wan and family_for("wan") is wan

    class MyWan(diffusers.WanTransformer3DModel):
        pass

    with torch.device("meta"):
        assert family_for(MyWan.from_config(dict(wan.tiny_config))) is wan

    with pytest.raises(GraphoptError, match="WanTransformer3DModel") as error:
        family_for("FluxTransformer2DModel")
    assert "CogVideoXTransformer3DModel" in str(error.value)
    with pytest.raises(GraphoptError, match="_class_name"):
        family_for({"num_layers": 2})
    with pytest.raises(GraphoptError, match="not a supported"):
        family_for(torch.nn.Linear(2, 2))


def test_build_model_is_deterministic_and_leaves_the_rng_alone():
    state = torch.random.get_rng_state()
    first, second = build_model("hunyuan-video"), build_model("hunyuan-video")
    assert torch.equal(state, torch.random.get_rng_state())
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    family = FAMILIES["hunyuan-video"]
    a, b = (family.example_inputs(family.tiny_config, family.default_spec) for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def public_config(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_recipe_records_rebuild_model_and_spec():
    model = build_model("ltx-video")
    record = {  # the shape graphopt.recipe.Recipe.new writes
        "class_name": "LTXVideoTransformer3DModel",
        "family": "ltx-video",
        "config": json.loads(json.dumps(dict(model.config), default=list)),
        "input_spec": {"batch": 2, "frames": 3, "height": 8, "width": 12, "text_len": 7, "dtype": "torch.bfloat16"},
    }
    rebuilt = build_from_recipe(record)
    assert type(rebuilt) is type(model) and public_config(rebuilt.config) == public_config(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name
    spec = spec_from_recipe(record, device="meta")
    assert spec == InputSpec(batch=2, frames=3, height=8, width=12, text_len=7, dtype=torch.bfloat16, device="meta")
    with pytest.raises(GraphoptError, match="no input spec"):
        spec_from_recipe({**record, "input_spec": None})


def test_wan_builds_and_exports_on_meta():
    family = FAMILIES["wan"]
    model = build_model("wan", device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert {t.device.type for t in tensors} == {"meta"}
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_model("wan").parameters())

    spec = dataclasses.replace(family.default_spec, device="meta")
    inputs = family.example_inputs(family.tiny_config, spec)
    assert inputs["hidden_states"].device.type == "meta"
    program = torch.export.export(model, (), inputs, strict=False)
    output = [n for n in program.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(output.meta["val"].shape) == EXPECTED["wan"][1]


def test_cogvideox_exports_at_a_size_other_than_its_sample_size():
    family = FAMILIES["cogvideox"]
    spec = InputSpec(batch=1, frames=2, height=12, width=8, text_len=7)  # config sample size is 3x8x12
    model = build_model(family)
    inputs = family.example_inputs(family.tiny_config, spec)
    keys = set(model.state_dict())
    with torch.no_grad():
        (before,) = model(**inputs)

    family.prepare_for_export(model, spec)
    with torch.no_grad():
        (after,) = model(**inputs)
    assert relative_error(after, before) <= 1e-6
    assert set(model.state_dict()) == keys and model.config.sample_height == 8

    program = torch.export.export(model, (), inputs, strict=False)
    with torch.no_grad():
        (exported,) = program.module()(**inputs)
    assert relative_error(exported, before) <= 1e-5

    with torch.no_grad():  # the default size still runs, through the forward's own rebuild
        (default,) = model(**family.example_inputs(family.tiny_config, family.default_spec))
    assert tuple(default.shape) == EXPECTED["cogvideox"][1]


@pytest.mark.parametrize(
    "variant, spec, expected",
    [
        ({"use_rotary_positional_embeddings": True}, InputSpec(text_len=5), (1, 3, 4, 8, 12)),  # CogVideoX-5b
        (
            {"use_rotary_positional_embeddings": True, "patch_size_t": 2, "ofs_embed_dim": 16},  # 1.5 I2V-style
            InputSpec(frames=4, text_len=5),
            (1, 4, 4, 8, 12),
        ),
    ],
)
def test_cogvideox_rope_variants_take_rope_as_input_and_export(variant, spec, expected):
    family = FAMILIES["cogvideox"]
    config = {**family.tiny_config, **variant}
    model = build_model(family, config)
    inputs = family.example_inputs(config, spec)
    assert "image_rotary_emb" in inputs
    with torch.no_grad():
        (output,) = model(**inputs)
    assert tuple(output.shape) == expected
    torch.export.export(model, (), inputs, strict=False)


def test_wan_i2v_inputs_carry_image_tokens():
    family = FAMILIES["wan"]
    config = {**family.tiny_config, "image_dim": 20, "added_kv_proj_dim": 64}
    inputs = family.example_inputs(config, family.default_spec)
    assert inputs["encoder_hidden_states_image"].shape == (1, 257, 20)
    with torch.no_grad():
        (output,) = build_model(family, config)(**inputs)
    assert tuple(output.shape) == EXPECTED["wan"][1]


@pytest.mark.parametrize(
    "name, spec, message",
    [
        ("wan", InputSpec(width=7), "multiple of the model's patch size 2"),
        ("latte", InputSpec(frames=4, width=8), "video_length=3"),
        ("dit", InputSpec(frames=2, height=8, width=8), "frames must be 1"),
        ("dit", InputSpec(frames=1, height=8, width=12), "square"),
        ("cogvideox", InputSpec(text_len=5), "max_text_seq_length=7"),
    ],
)
def test_bad_specs_name_the_problem(name, spec, message):
    family = FAMILIES[name]
    with pytest.raises(GraphoptError, match=re.escape(message)):
        family.example_inputs(family.tiny_config, spec)


def test_input_spec_rejects_bad_values():
    with pytest.raises(GraphoptError, match="batch"):
        InputSpec(batch=0)
    with pytest.raises(GraphoptError, match="floating"):
        InputSpec(dtype=torch.int64)


def _node_targets(graph) -> list[str]:
    return [str(n.target) for n in graph.gm.graph.nodes if n.op == "call_function"]


def test_mochi_captures_on_meta_as_on_cpu():
    """Mochi's RoPE opens torch.autocast(freqs.device.type, float32), which has no 'meta' device
    type: without the family's fix-up the meta capture fails. With it, the meta graph is the CPU one."""
    from graphopt.capture import capture

    one_block = {**FAMILIES["mochi"].tiny_config, "num_layers": 1}
    cpu = capture(build_model("mochi", one_block))
    meta = capture(build_model("mochi", one_block, "meta"))
    assert meta.is_meta and not cpu.is_meta
    assert _node_targets(meta) == _node_targets(cpu)
    autocast = [n.args[:3] for n in meta.gm.graph.nodes if "autocast" in str(n.target)]
    assert autocast == [("cpu", torch.float32, False)]


def test_mochi_published_architecture_captures_on_meta_at_its_real_latent_size():
    """genmo/mochi-1-preview's transformer (diffusers' defaults) at 163 frames 480x848: every
    published value, with 2 of its 48 blocks so the test stays short (each block is the same
    MochiTransformerBlock; `tools/bench_meta_scale.py --arch mochi-1-10b` runs all 48)."""
    from graphopt.capture import capture
    from graphopt.cost import model_cost
    from graphopt.family_configs import PUBLISHED

    config, spec = PUBLISHED["mochi-1-10b"]
    defaults = public_config(build_model("mochi", {**config, "num_layers": 1}, "meta").config)
    assert {k: v for k, v in config.items() if not k.startswith("_")} == {**defaults, "num_layers": 48}
    model = build_model("mochi", {**config, "num_layers": 2}, "meta")
    graph = capture(model, spec=dataclasses.replace(spec, device="meta"))
    assert graph.is_meta and len(graph.blocks) == 2
    output = [n for n in graph.gm.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(output.meta["val"].shape) == (1, 12, 28, 60, 106)
    tokens = 28 * 30 * 53 + 256
    flops = model_cost(graph).flops
    attention = 2 * 2 * 24 * 128 * tokens**2       # QK^T and PV of one block's joint attention
    assert flops > 2 * attention
