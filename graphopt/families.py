"""Model-family adapter table: the one place in graphopt that names a model family.

Passes find structure (blocks, attentions, the timestep embedding) on the captured graph. What a graph
cannot tell lives here, one declarative `Family` entry (graphopt.family) per diffusers class family:

- which forward kwargs carry the video latent, the timestep and the text conditioning;
- example inputs for a latent video of a given size, shaped the way the family's diffusers pipeline
  calls the model (always `return_dict=False`);
- the patch size that gives the video-token grid, and for each attention (matched by module path) how
  its query and key/value sequences map onto that grid (graphopt.layout), so head-role analysis can
  tell "same frame" from "same place"; the same for each block's residual stream (per-frame features
  for distillation);
- a tiny config for tests, and a pre-export fix-up where a family computes constants in forward that
  torch.export cannot keep.

Token order: every family here lays video tokens out row-major over (frame, y, x) after patchify, so
video token v sits at frame v // (h*w), row (v % (h*w)) // w, column v % w.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import diffusers
import torch
from torch import nn

from graphopt.errors import GraphoptError
from graphopt.family import SEED, Family, Sampler, Tokens
from graphopt.family_configs import (
    COGVIDEOX_TINY,
    DIT_TINY,
    HUNYUAN_TINY,
    LATTE_TINY,
    LTX_TINY,
    MOCHI_TINY,
    PIXART_TINY,
    WAN_TINY,
)
from graphopt.layout import AttentionLayout, BlockLayout, InputSpec


def _patch_list(config: Mapping[str, Any]) -> Tokens:
    """Wan's patch_size lists (frames, height, width)."""
    return tuple(config["patch_size"])


def _patch_3d(config: Mapping[str, Any]) -> Tokens:
    """patch_size_t over frames (CogVideoX before 1.5 has none: 1), patch_size over height and width."""
    return config["patch_size_t"] or 1, config["patch_size"], config["patch_size"]


def _patch_per_frame(config: Mapping[str, Any]) -> Tokens:
    """Frames unpatched, patch_size over height and width."""
    return 1, config["patch_size"], config["patch_size"]


# ---------------------------------------------------------------------------------------------------
# Wan 2.1 / SkyReels-V2: Conv3d patchify, self-attention over video tokens, cross-attention to text
# (Wan I2V: CLIP image tokens joined before the text tokens, both on the key side).


def _wan_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    kwargs = {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
        "timestep": sample.timesteps(continuous=True),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_dim"]),
    }
    if config["image_dim"] is not None:
        # Wan I2V: 257 CLIP tokens per image; FLF2V configs say how many (two images) in pos_embed_seq_len.
        image_tokens = config["pos_embed_seq_len"] or 257
        kwargs["encoder_hidden_states_image"] = sample.normal(spec.batch, image_tokens, config["image_dim"])
    return kwargs


_WAN_ATTENTIONS = (
    AttentionLayout(r"blocks\.\d+\.attn1", "video", "video"),
    AttentionLayout(r"blocks\.\d+\.attn2", "video", "text"),
)
_WAN_BLOCKS = (BlockLayout(r"blocks\.\d+", "video"),)


# ---------------------------------------------------------------------------------------------------
# HunyuanVideo: double-stream blocks (joint attention, video and text have their own weights) then
# single-stream blocks (one weight set); both attend over video tokens followed by the text tokens.
# A token refiner (self-attention over text only) runs first on the prompt.


def _hunyuan_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    kwargs = {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
        "timestep": sample.timesteps(continuous=True, dtype=spec.dtype),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_embed_dim"]),
        # The pipeline casts the tokenizer's mask to the transformer dtype.
        "encoder_attention_mask": sample.text_mask(spec.dtype),
        "pooled_projections": sample.normal(spec.batch, config["pooled_projection_dim"]),
    }
    if config["guidance_embeds"]:
        # The pipeline passes guidance_scale * 1000; scales 1..10 cover its use.
        kwargs["guidance"] = sample.uniform(1000.0, 10000.0, spec.batch)
    return kwargs


# ---------------------------------------------------------------------------------------------------
# LTX-Video: the pipeline packs the latent into tokens (B, F'*H'*W', C*pt*p*p) before the call and
# passes the token grid as num_frames/height/width; self-attention over video, cross-attention to text.


def _ltx_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    frames, height, width = tokens
    return {
        "hidden_states": sample.normal(spec.batch, frames * height * width, config["in_channels"]),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["caption_channels"]),
        "timestep": sample.timesteps(continuous=True),
        "encoder_attention_mask": sample.text_mask(torch.bool),
        "num_frames": frames,
        "height": height,
        "width": width,
        # LTXPipeline's values at its default 25 fps: (VAE temporal ratio / fps, VAE spatial ratio x2).
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }


# ---------------------------------------------------------------------------------------------------
# Mochi: per-frame 2D patchify; MMDiT-style joint attention over video tokens followed by the text
# tokens the mask keeps (one attention call per sample); an attention pool over the text feeds the
# conditioning.


def _mochi_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    return {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_embed_dim"]),
        "timestep": sample.timesteps(continuous=True, dtype=spec.dtype),
        "encoder_attention_mask": sample.text_mask(torch.bool),
    }


def _mochi_prepare_for_export(model: nn.Module, spec: InputSpec) -> nn.Module:
    """Let a Mochi model built on the meta device be captured.

    MochiRoPE._create_rope opens `torch.autocast(freqs.device.type, torch.float32)` around its
    frequency einsum, and torch.autocast has no "meta" device type ("User specified an unsupported
    autocast device_type 'meta'"). On meta the region is opened for "cpu" instead, disabled: what
    CPU autocast makes of a float32 region (it has no float32 autocast), so the meta graph is the
    CPU capture's, `wrap_with_autocast('cpu', torch.float32, False)` included. Other devices keep
    diffusers' method.
    """
    rope = model.rope
    if model.pos_frequencies.device.type != "meta" or "_create_rope" in vars(rope):
        return model

    def create_rope(freqs: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", torch.float32, enabled=False):
            freqs = torch.einsum("nd,dhf->nhf", pos.to(torch.float32), freqs.to(torch.float32))
        return torch.cos(freqs), torch.sin(freqs)

    rope._create_rope = create_rope
    return model


# ---------------------------------------------------------------------------------------------------
# Latte: alternating spatial blocks (self-attention inside each frame, cross-attention to text) and
# temporal blocks (self-attention across the frames at each spatial position).


def _latte_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    if spec.frames != config["video_length"]:
        raise GraphoptError(
            f"Latte adds a temporal position table of video_length={config['video_length']} frames: "
            f"InputSpec.frames must equal it, got {spec.frames}"
        )
    return {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
        "timestep": sample.timesteps(continuous=False),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["caption_channels"]),
    }


# ---------------------------------------------------------------------------------------------------
# DiT and PixArt: image models (one frame); DiT is class-conditional, PixArt cross-attends to text.


def _dit_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    if spec.height != spec.width:
        raise GraphoptError(
            f"DiT unpatchifies a square token grid: height and width must match, got {spec.height}x{spec.width}"
        )
    return {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.height, spec.width),
        "timestep": sample.timesteps(continuous=False),
        "class_labels": sample.integers(config["num_embeds_ada_norm"], spec.batch),
    }


def _pixart_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    text_width = config["caption_channels"] or config["cross_attention_dim"]
    kwargs = {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.height, spec.width),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, text_width),
        "timestep": sample.timesteps(continuous=False),
        "encoder_attention_mask": sample.text_mask(torch.int64),
    }
    uses_size = config["use_additional_conditions"]
    if uses_size is None:  # the class's own rule
        uses_size = config["sample_size"] == 128
    if uses_size:
        # What PixArtAlphaPipeline passes: the pixel resolution (VAE factor 8) and height / width.
        pixels = torch.tensor([[spec.height * 8.0, spec.width * 8.0]]).repeat(spec.batch, 1)
        aspect = torch.tensor([[spec.height / spec.width]]).repeat(spec.batch, 1)
        kwargs["added_cond_kwargs"] = {
            "resolution": sample.constant(pixels, spec.dtype),
            "aspect_ratio": sample.constant(aspect, spec.dtype),
        }
    else:
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kwargs


# ---------------------------------------------------------------------------------------------------
# CogVideoX: latent is (B, F, C, H, W); text tokens are concatenated BEFORE the video tokens and every
# block runs joint attention over [text, video]. CogVideoX-2b uses a sin-cos position table (and then
# needs exactly max_text_seq_length text tokens), 5b and 1.5 use RoPE that the pipeline computes and
# passes as image_rotary_emb.


def _crop_region(grid: tuple[int, int], base_width: int, base_height: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """diffusers.pipelines.cogvideo.pipeline_cogvideox.get_resize_crop_region_for_grid, copied to keep
    the pipeline module (and transformers) out of the import."""
    height, width = grid
    if height / width > base_height / base_width:
        resize_height, resize_width = base_height, int(round(base_height / height * width))
    else:
        resize_width, resize_height = base_width, int(round(base_width / width * height))
    top = int(round((base_height - resize_height) / 2.0))
    left = int(round((base_width - resize_width) / 2.0))
    return (top, left), (top + resize_height, left + resize_width)


def _cogvideox_rotary(config: Mapping[str, Any], spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables CogVideoXPipeline._prepare_rotary_positional_embeddings builds (float32, CPU)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    patch, patch_t = config["patch_size"], config["patch_size_t"]
    grid = (spec.height // patch, spec.width // patch)
    base_height, base_width = config["sample_height"] // patch, config["sample_width"] // patch
    if patch_t is None:
        return get_3d_rotary_pos_embed(
            embed_dim=config["attention_head_dim"],
            crops_coords=_crop_region(grid, base_width, base_height),
            grid_size=grid,
            temporal_size=spec.frames,
        )
    return get_3d_rotary_pos_embed(
        embed_dim=config["attention_head_dim"],
        crops_coords=None,
        grid_size=grid,
        temporal_size=(spec.frames + patch_t - 1) // patch_t,
        grid_type="slice",
        max_size=(base_height, base_width),
    )


def _cogvideox_inputs(config: Mapping[str, Any], spec: InputSpec, sample: Sampler, tokens: Tokens) -> dict[str, Any]:
    uses_table = not config["use_rotary_positional_embeddings"] or config["use_learned_positional_embeddings"]
    if uses_table and spec.text_len != config["max_text_seq_length"]:
        raise GraphoptError(
            f"this CogVideoX adds a position table laid out for max_text_seq_length="
            f"{config['max_text_seq_length']} text tokens: InputSpec.text_len must equal it, got {spec.text_len}"
        )
    kwargs = {
        "hidden_states": sample.normal(spec.batch, spec.frames, config["in_channels"], spec.height, spec.width),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_embed_dim"]),
        "timestep": sample.timesteps(continuous=False),
    }
    if config["ofs_embed_dim"]:
        kwargs["ofs"] = sample.constant(torch.full((1,), 2.0), spec.dtype)  # the I2V pipeline's constant
    if config["use_rotary_positional_embeddings"]:
        kwargs["image_rotary_emb"] = tuple(sample.constant(t, torch.float32) for t in _cogvideox_rotary(config, spec))
    return kwargs


def _cogvideox_prepare_for_export(model: nn.Module, spec: InputSpec) -> nn.Module:
    """Precompute CogVideoX's sin-cos position table for `spec` so forward reads a buffer.

    CogVideoXPatchEmbed.forward rebuilds the table whenever the latent size differs from the config's
    sample_height/sample_width/sample_frames, and the rebuild writes into a fresh tensor through
    `.data`; torch.export lifts that tensor as a constant that is still fake ("We found a fake tensor
    in the exported program constant's list ... patch_embed.lifted_tensor_0"). Here the table is built
    once for `spec` with the same function and registered as the (non-persistent) buffer, and the patch
    embedding's sample size set to `spec`, so forward takes its buffer branch: outputs are unchanged
    for every input size (other sizes still rebuild, with the same values). The state dict and the
    model config are untouched. Learned tables (CogVideoX-5b-I2V) only run at their trained size and
    RoPE variants have no table: both are left alone.
    """
    embed = model.patch_embed
    if not embed.use_positional_embeddings or embed.use_learned_positional_embeddings:
        return model
    frames = (spec.frames - 1) * embed.temporal_compression_ratio + 1
    if (embed.sample_height, embed.sample_width, embed.sample_frames) != (spec.height, spec.width, frames):
        table = embed._get_positional_embeddings(spec.height, spec.width, frames, device=embed.pos_embedding.device)
        embed.register_buffer("pos_embedding", table, persistent=False)
        embed.sample_height, embed.sample_width, embed.sample_frames = spec.height, spec.width, frames
    return model


# ---------------------------------------------------------------------------------------------------
# The table

_VIDEO_SPEC = InputSpec(batch=1, frames=3, height=8, width=12, text_len=7)
_SQUARE_VIDEO_SPEC = InputSpec(batch=1, frames=3, height=8, width=8, text_len=7)
_IMAGE_SPEC = InputSpec(batch=2, frames=1, height=8, width=8, text_len=7)

_TRANSFORMER_BLOCKS_VIDEO = (BlockLayout(r"transformer_blocks\.\d+", "video"),)

_WAN = Family(
    name="wan",
    class_names=("WanTransformer3DModel",),
    tiny_config=MappingProxyType(WAN_TINY),
    default_spec=_VIDEO_SPEC,
    latent_layout="BCFHW",
    text_inputs=("encoder_hidden_states",),
    patch_size=_patch_list,
    make_inputs=_wan_inputs,
    attentions=_WAN_ATTENTIONS,
    blocks=_WAN_BLOCKS,
    block_counts=MappingProxyType({"blocks": "num_layers"}),
)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        _WAN,
        # SkyReels-V2 is Wan's architecture under another class name (same config keys and inputs).
        dataclasses.replace(_WAN, name="skyreels-v2", class_names=("SkyReelsV2Transformer3DModel",)),
        Family(
            name="hunyuan-video",
            class_names=("HunyuanVideoTransformer3DModel",),
            tiny_config=MappingProxyType(HUNYUAN_TINY),
            default_spec=_VIDEO_SPEC,
            latent_layout="BCFHW",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"),
            patch_size=_patch_3d,
            make_inputs=_hunyuan_inputs,
            attentions=(
                AttentionLayout(r"transformer_blocks\.\d+\.attn", "video", "video", text="after"),
                AttentionLayout(r"single_transformer_blocks\.\d+\.attn", "video", "video", text="after"),
                AttentionLayout(r"context_embedder\.token_refiner\.refiner_blocks\.\d+\.attn", "text", "text"),
            ),
            blocks=(
                BlockLayout(r"transformer_blocks\.\d+", "video"),
                BlockLayout(r"single_transformer_blocks\.\d+", "video"),
            ),
            block_counts=MappingProxyType({"transformer_blocks": "num_layers",
                                           "single_transformer_blocks": "num_single_layers"}),
        ),
        Family(
            name="ltx-video",
            class_names=("LTXVideoTransformer3DModel",),
            tiny_config=MappingProxyType(LTX_TINY),
            default_spec=_VIDEO_SPEC,
            latent_layout="BNC",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
            patch_size=_patch_3d,
            make_inputs=_ltx_inputs,
            attentions=(
                AttentionLayout(r"transformer_blocks\.\d+\.attn1", "video", "video"),
                AttentionLayout(r"transformer_blocks\.\d+\.attn2", "video", "text"),
            ),
            blocks=_TRANSFORMER_BLOCKS_VIDEO,
        ),
        Family(
            name="mochi",
            class_names=("MochiTransformer3DModel",),
            tiny_config=MappingProxyType(MOCHI_TINY),
            default_spec=_VIDEO_SPEC,
            latent_layout="BCFHW",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
            patch_size=_patch_per_frame,
            make_inputs=_mochi_inputs,
            attentions=(
                # Text tokens in the sequence are the ones the mask keeps (all of them in example_inputs).
                AttentionLayout(r"transformer_blocks\.\d+\.attn1", "video", "video", text="after", per_sample=True),
                AttentionLayout(r"time_embed\.pooler", "text", "text"),
            ),
            blocks=_TRANSFORMER_BLOCKS_VIDEO,
            prepare_for_export=_mochi_prepare_for_export,
        ),
        Family(
            name="latte",
            class_names=("LatteTransformer3DModel",),
            tiny_config=MappingProxyType(LATTE_TINY),
            default_spec=_SQUARE_VIDEO_SPEC,
            latent_layout="BCFHW",
            text_inputs=("encoder_hidden_states",),
            patch_size=_patch_per_frame,
            make_inputs=_latte_inputs,
            attentions=(
                AttentionLayout(r"transformer_blocks\.\d+\.attn1", "frame", "frame"),
                AttentionLayout(r"transformer_blocks\.\d+\.attn2", "frame", "text"),
                AttentionLayout(r"temporal_transformer_blocks\.\d+\.attn1", "temporal", "temporal"),
            ),
            blocks=(
                BlockLayout(r"transformer_blocks\.\d+", "frame"),
                BlockLayout(r"temporal_transformer_blocks\.\d+", "temporal"),
            ),
        ),
        Family(
            name="dit",
            class_names=("DiTTransformer2DModel",),
            tiny_config=MappingProxyType(DIT_TINY),
            default_spec=_IMAGE_SPEC,
            latent_layout="BCHW",
            text_inputs=(),
            patch_size=_patch_per_frame,
            make_inputs=_dit_inputs,
            attentions=(AttentionLayout(r"transformer_blocks\.\d+\.attn1", "frame", "frame"),),
            blocks=(BlockLayout(r"transformer_blocks\.\d+", "frame"),),
        ),
        Family(
            name="pixart",
            class_names=("PixArtTransformer2DModel",),
            tiny_config=MappingProxyType(PIXART_TINY),
            default_spec=_IMAGE_SPEC,
            latent_layout="BCHW",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
            patch_size=_patch_per_frame,
            make_inputs=_pixart_inputs,
            attentions=(
                AttentionLayout(r"transformer_blocks\.\d+\.attn1", "frame", "frame"),
                AttentionLayout(r"transformer_blocks\.\d+\.attn2", "frame", "text"),
            ),
            blocks=(BlockLayout(r"transformer_blocks\.\d+", "frame"),),
        ),
        Family(
            name="cogvideox",
            class_names=("CogVideoXTransformer3DModel",),
            tiny_config=MappingProxyType(COGVIDEOX_TINY),
            default_spec=_VIDEO_SPEC,
            latent_layout="BFCHW",
            text_inputs=("encoder_hidden_states",),
            patch_size=_patch_3d,
            make_inputs=_cogvideox_inputs,
            attentions=(AttentionLayout(r"transformer_blocks\.\d+\.attn1", "video", "video", text="before"),),
            blocks=_TRANSFORMER_BLOCKS_VIDEO,
            prepare_for_export=_cogvideox_prepare_for_export,
        ),
    )
}

_BY_CLASS: dict[str, Family] = {name: family for family in FAMILIES.values() for name in family.class_names}


def _unknown(what: str) -> GraphoptError:
    classes = ", ".join(sorted(_BY_CLASS))
    return GraphoptError(
        f"{what} is not a supported model family. Supported diffusers classes: {classes}. "
        f"Family names: {', '.join(FAMILIES)}. A new family needs one entry in graphopt/families.py "
        f"(and its tiny config in graphopt/family_configs.py)."
    )


def family_for(model_or_config_or_classname: nn.Module | Mapping[str, Any] | str | Family) -> Family:
    """The Family of a model (its class or any base class), a config dict carrying `_class_name`
    (a diffusers config.json), a diffusers class name, or a family name."""
    target = model_or_config_or_classname
    if isinstance(target, Family):
        return target
    if isinstance(target, nn.Module):
        for cls in type(target).__mro__:
            if cls.__name__ in _BY_CLASS:
                return _BY_CLASS[cls.__name__]
        raise _unknown(f"model class {type(target).__name__}")
    if isinstance(target, Mapping):
        if "_class_name" not in target:
            raise GraphoptError(
                "config has no '_class_name' key, so its model class is unknown: pass a diffusers "
                "config.json (it records '_class_name'), the model itself (a model's .config carries "
                "'_class_name' only when it was loaded with from_pretrained) or its class name"
            )
        target = target["_class_name"]
    if isinstance(target, str):
        if target in FAMILIES:
            return FAMILIES[target]
        if target in _BY_CLASS:
            return _BY_CLASS[target]
        raise _unknown(repr(target))
    raise GraphoptError(
        f"family_for takes a model, a config dict, a class name or a family name, got {type(target).__name__}"
    )


def build_model(
    family_or_name: Family | str | Mapping[str, Any] | nn.Module,
    config: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A freshly initialised model in eval mode: `config` (default: the family's tiny_config) with
    weights drawn from a fixed seed (the global RNG is left as it was). On device "meta" no memory
    is allocated: the graph can be captured, the weights streamed in later."""
    family = family_for(family_or_name)
    config = dict(family.tiny_config if config is None else config)
    class_name = config.get("_class_name", family.class_names[0])
    if class_name not in family.class_names:
        raise GraphoptError(f"config is for {class_name}, not one of the {family.name} classes {family.class_names}")
    cls = getattr(diffusers, class_name)
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            model = cls.from_config(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = cls.from_config(config)
        model = model.to(device)
    return model.eval()


def spec_from_recipe(model_record: Mapping[str, Any], device: str | torch.device = "cpu") -> InputSpec:
    """The InputSpec a Recipe's `model` record captured at (its "input_spec"), placed on `device`."""
    record = model_record.get("input_spec")
    if record is None:
        raise GraphoptError(
            "this recipe records no input spec (it was captured from explicit example inputs): "
            "capture the model again with an InputSpec to replay it"
        )
    dtype = getattr(torch, str(record["dtype"]).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise GraphoptError(f"recipe input_spec dtype {record['dtype']!r} is not a torch dtype (e.g. 'torch.float32')")
    sizes = {key: record[key] for key in ("batch", "frames", "height", "width", "text_len")}
    return InputSpec(**sizes, dtype=dtype, device=device)


def build_from_recipe(model_record: Mapping[str, Any], device: str | torch.device = "cpu") -> nn.Module:
    """The architecture a Recipe's `model` record names (class name + config), freshly initialised."""
    config = dict(model_record.get("config") or {})
    class_name = model_record.get("class_name") or config.get("_class_name")
    if class_name is None:
        raise GraphoptError("this recipe records no model class name: it cannot rebuild the model")
    return build_model(family_for(class_name), {**config, "_class_name": class_name}, device)

