"""Model-family adapter table: the one place in graphopt that names a model family.

Passes find structure (blocks, attentions, the timestep embedding) on the captured graph. What a graph
cannot tell lives here, one declarative `Family` entry per diffusers class family:

- which forward kwargs carry the video latent, the timestep and the text conditioning;
- example inputs for a latent video of a given size, shaped the way the family's diffusers pipeline
  calls the model (always `return_dict=False`);
- the video-token grid after patchify, and for each attention (matched by module path) how its query
  and key/value sequences map onto that grid, so head-role analysis can tell "same frame" from "same
  place"; the same for each block's residual stream (per-frame features for distillation);
- a tiny config for tests, and a pre-export fix-up where a family computes constants in forward that
  torch.export cannot keep.

Token order: every family here lays video tokens out row-major over (frame, y, x) after patchify, so
video token v sits at frame v // (h*w), row (v % (h*w)) // w, column v % w.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import diffusers
import torch
from torch import nn

from graphopt.errors import GraphoptError

SequenceKind = Literal["video", "frame", "temporal", "text"]
TextPlacement = Literal["none", "before", "after"]

_SEQUENCE_KINDS = ("video", "frame", "temporal", "text")
_TEXT_PLACEMENTS = ("none", "before", "after")
_SEED = 0


@dataclass(frozen=True)
class InputSpec:
    """The latent video one forward call sees: sizes are in latent units, before patchify."""

    batch: int = 1
    frames: int = 3
    height: int = 8
    width: int = 12
    text_len: int = 7
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch", "frames", "height", "width", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GraphoptError(f"InputSpec.{name} must be a positive int, got {value!r}")
        if not self.dtype.is_floating_point:
            raise GraphoptError(f"InputSpec.dtype must be a floating dtype (the latent's), got {self.dtype}")


class VideoPosition(NamedTuple):
    """Where a token sits in the latent video (token-grid units, after patchify)."""

    sample: int
    frame: int
    y: int
    x: int


@dataclass(frozen=True)
class SequenceLayout:
    """How one attention input (q, or k/v) or one block's residual stream maps onto the video.

    The tensor is (rows, length, ...) with rows = `rows` (the batch dim after heads are split off):
    - "video": rows = samples; length = text_before + frames*height*width + text_after. Tokens
      [text_before, text_before + frames*height*width) are video tokens in row-major (frame, y, x)
      order; the others are text tokens (joint attention: HunyuanVideo and Mochi put text after the
      video, CogVideoX before it).
    - "frame": one frame per row: rows = samples*frames, row r = (sample, frame) = divmod(r, frames);
      length = height*width, token t = (y, x) = divmod(t, width). (Latte spatial blocks, DiT, PixArt.)
    - "temporal": one spatial position per row: rows = samples*height*width,
      row r = (sample, y*width + x) = divmod(r, height*width); length = frames, token t = frame t.
      (Latte temporal blocks.)
    - "text": no video tokens (cross-attention keys, text refiners, pooling); length is not described.
      Its rows are batched like `rows_like` (the query side of a cross-attention: Latte and PixArt
      repeat the text for every frame row), or one per sample.
    """

    kind: SequenceKind
    samples: int
    frames: int
    height: int
    width: int
    text_before: int = 0
    text_after: int = 0
    rows_like: SequenceKind | None = None

    @property
    def rows(self) -> int:
        per_sample = {"video": 1, "frame": self.frames, "temporal": self.height * self.width, "text": 1}
        return self.samples * per_sample[self.rows_like or self.kind]

    @property
    def length(self) -> int | None:
        if self.kind == "video":
            return self.text_before + self.frames * self.height * self.width + self.text_after
        if self.kind == "frame":
            return self.height * self.width
        if self.kind == "temporal":
            return self.frames
        return None

    def locate(self, row: int, token: int) -> VideoPosition | None:
        """The video position of `token` in batch row `row`; None for a text token."""
        self._check_index(row, token)
        if self.kind == "text":
            return None
        if self.kind == "video":
            video_token = token - self.text_before
            if not 0 <= video_token < self.frames * self.height * self.width:
                return None
            frame, within = divmod(video_token, self.height * self.width)
            return VideoPosition(row, frame, *divmod(within, self.width))
        if self.kind == "frame":
            sample, frame = divmod(row, self.frames)
            return VideoPosition(sample, frame, *divmod(token, self.width))
        sample, position = divmod(row, self.height * self.width)
        return VideoPosition(sample, token, *divmod(position, self.width))

    def coords(self, row: int = 0) -> torch.Tensor:
        """(length, 3) int64 tensor of (frame, y, x) per token of batch row `row`; -1 marks text tokens.

        Equal to stacking `locate(row, t)[1:]` over every token t, computed at once.
        """
        self._check_index(row, 0)
        if self.kind == "text":
            raise GraphoptError("a 'text' sequence has no video tokens: there are no coordinates to give")
        token = torch.arange(self.length)
        if self.kind == "video":
            video_token = token - self.text_before
            is_video = (video_token >= 0) & (video_token < self.frames * self.height * self.width)
            frame = video_token // (self.height * self.width)
            within = video_token % (self.height * self.width)
            grid = torch.stack([frame, within // self.width, within % self.width], dim=1)
            return torch.where(is_video[:, None], grid, torch.full_like(grid, -1))
        if self.kind == "frame":
            frame = torch.full_like(token, row % self.frames)
            return torch.stack([frame, token // self.width, token % self.width], dim=1)
        position = row % (self.height * self.width)
        return torch.stack(
            [token, torch.full_like(token, position // self.width), torch.full_like(token, position % self.width)],
            dim=1,
        )

    def _check_index(self, row: int, token: int) -> None:
        if not 0 <= row < self.rows:
            raise GraphoptError(f"batch row {row} is outside this {self.kind} sequence's {self.rows} rows")
        if self.length is not None and not 0 <= token < self.length:
            raise GraphoptError(f"token {token} is outside this {self.kind} sequence's {self.length} tokens")


@dataclass(frozen=True)
class AttentionLayout:
    """Declarative layout of the attentions whose module path fully matches the regex `path`.

    `path` is the attention module's qualified name from the model root, as torch.export records it
    in `nn_module_stack` (e.g. "blocks.3.attn1"). `query` / `key` say what the q and k/v sequences
    hold; `text` says where text tokens are joined to the video tokens of the "video" sides (joint
    attention); `per_sample` means the attention runs one scaled_dot_product_attention per sample
    (batch 1 each, in sample order), as Mochi does because its text length is data dependent.
    """

    path: str
    query: SequenceKind
    key: SequenceKind
    text: TextPlacement = "none"
    per_sample: bool = False

    def __post_init__(self) -> None:
        re.compile(self.path)
        for side in (self.query, self.key):
            if side not in _SEQUENCE_KINDS:
                raise GraphoptError(f"attention layout kind {side!r} is not one of {_SEQUENCE_KINDS}")
        if self.text not in _TEXT_PLACEMENTS:
            raise GraphoptError(f"text placement {self.text!r} is not one of {_TEXT_PLACEMENTS}")
        if self.text != "none" and "video" not in (self.query, self.key):
            raise GraphoptError(f"{self.path}: text placement {self.text!r} needs a 'video' side")

    def resolve(self, tokens: tuple[int, int, int], spec: InputSpec) -> tuple[SequenceLayout, SequenceLayout]:
        """(query layout, key/value layout) for an input of size `spec` whose token grid is `tokens`."""
        return (
            self._side(self.query, self.key, tokens, spec),
            self._side(self.key, self.query, tokens, spec),
        )

    def _side(
        self, kind: SequenceKind, other: SequenceKind, tokens: tuple[int, int, int], spec: InputSpec
    ) -> SequenceLayout:
        text_before = spec.text_len if kind == "video" and self.text == "before" else 0
        text_after = spec.text_len if kind == "video" and self.text == "after" else 0
        samples = 1 if self.per_sample else spec.batch
        rows_like = other if kind == "text" and other != "text" else None
        return SequenceLayout(
            kind, samples, *tokens, text_before=text_before, text_after=text_after, rows_like=rows_like
        )


@dataclass(frozen=True)
class BlockLayout:
    """The residual stream (first output) of the blocks whose module path fully matches `path`."""

    path: str
    stream: SequenceKind

    def resolve(self, tokens: tuple[int, int, int], spec: InputSpec) -> SequenceLayout:
        return SequenceLayout(self.stream, spec.batch, *tokens)


def _unchanged(model: nn.Module, spec: InputSpec) -> nn.Module:
    return model


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: the diffusers classes it covers and everything graphopt must be told about them.

    Callables take the model config (a diffusers config dict; keys it leaves out take the class's
    defaults) and an InputSpec. `prepare_for_export(model, spec)` fixes a model in place so that
    torch.export of a forward on `spec`-sized inputs succeeds, without changing any output.
    """

    name: str
    class_names: tuple[str, ...]
    tiny_config: Mapping[str, Any]
    default_spec: InputSpec
    latent_input: str
    latent_layout: str  # axes of the latent input and of the output: "BCFHW", "BFCHW", "BCHW", or "BNC" (packed tokens)
    timestep_input: str
    text_inputs: tuple[str, ...]  # kwargs computed from the prompt (states, masks, pooled states)
    example_inputs: Callable[[Mapping[str, Any], InputSpec], dict[str, Any]]
    token_layout: Callable[[Mapping[str, Any], InputSpec], tuple[int, int, int]]
    output_shape: Callable[[Mapping[str, Any], InputSpec], tuple[int, ...]]
    attentions: tuple[AttentionLayout, ...]
    blocks: tuple[BlockLayout, ...]
    prepare_for_export: Callable[[nn.Module, InputSpec], nn.Module] = field(default=_unchanged)
    # Each ModuleList of blocks → the config key that sets its length, so that a checkpoint with
    # blocks dropped still has a diffusers config (`graphopt apply`); without it graphopt's format.
    block_counts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def attention_layout(self, module_path: str) -> AttentionLayout:
        """The first entry of `attentions` whose regex fully matches `module_path`."""
        return _first_match(self.attentions, module_path, f"{self.name} attention")

    def block_layout(self, module_path: str) -> BlockLayout:
        return _first_match(self.blocks, module_path, f"{self.name} block")

    def sequence_layouts(
        self, module_path: str, config: Mapping[str, Any], spec: InputSpec
    ) -> tuple[SequenceLayout, SequenceLayout]:
        """(query, key/value) layouts of the attention at `module_path` for `spec`-sized inputs."""
        return self.attention_layout(module_path).resolve(self.token_layout(config, spec), spec)

    def block_stream(self, module_path: str, config: Mapping[str, Any], spec: InputSpec) -> SequenceLayout:
        """Layout of the residual stream leaving the block at `module_path` for `spec`-sized inputs."""
        return self.block_layout(module_path).resolve(self.token_layout(config, spec), spec)


def _first_match(entries, module_path: str, what: str):
    for entry in entries:
        if re.fullmatch(entry.path, module_path):
            return entry
    known = ", ".join(entry.path for entry in entries)
    raise GraphoptError(f"no {what} layout matches module path {module_path!r}; known patterns: {known}")


# ---------------------------------------------------------------------------------------------------
# Helpers shared by the entries


def _complete(class_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` over the class constructor's defaults, without diffusers' private "_..." keys."""
    parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _patchify(spec: InputSpec, patch_t: int, patch_h: int, patch_w: int) -> tuple[int, int, int]:
    axes = (("frames", spec.frames, patch_t), ("height", spec.height, patch_h), ("width", spec.width, patch_w))
    for axis, size, patch in axes:
        if size % patch:
            raise GraphoptError(
                f"latent {axis} {size} is not a multiple of the model's patch size {patch} along it: "
                f"pick a latent {axis} divisible by {patch}"
            )
    return spec.frames // patch_t, spec.height // patch_h, spec.width // patch_w


def _require_single_frame(family: str, spec: InputSpec) -> None:
    if spec.frames != 1:
        raise GraphoptError(f"{family} is an image model: InputSpec.frames must be 1, got {spec.frames}")


class _Sampler:
    """Random inputs from a fixed seed, created on the CPU and moved to the spec's device and dtype."""

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.generator = torch.Generator().manual_seed(_SEED)

    def normal(self, *shape: int) -> torch.Tensor:
        return self._place(torch.randn(shape, generator=self.generator), self.spec.dtype)

    def timesteps(self, *, continuous: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One timestep per sample in [0, 1000): floats for flow-matching schedulers, int64 for DDPM ones."""
        if continuous:
            return self._place(torch.rand(self.spec.batch, generator=self.generator) * 1000, dtype)
        return self._place(torch.randint(0, 1000, (self.spec.batch,), generator=self.generator), torch.int64)

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        return self._place(low + (high - low) * torch.rand(shape, generator=self.generator), self.spec.dtype)

    def integers(self, high: int, *shape: int) -> torch.Tensor:
        return self._place(torch.randint(0, high, shape, generator=self.generator), torch.int64)

    def text_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Keeps every text token: joint-attention layouts then hold exactly spec.text_len text tokens."""
        return self._place(torch.ones(self.spec.batch, self.spec.text_len), dtype)

    def constant(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._place(values, dtype)

    def _place(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return tensor.to(device=self.spec.device, dtype=dtype)


def _video_output(config: Mapping[str, Any], spec: InputSpec, out_channels: int) -> tuple[int, ...]:
    return (spec.batch, out_channels, spec.frames, spec.height, spec.width)


# ---------------------------------------------------------------------------------------------------
# Wan 2.1 / SkyReels-V2: Conv3d patchify, self-attention over video tokens, cross-attention to text
# (Wan I2V: CLIP image tokens joined before the text tokens, both on the key side).


def _wan_like(class_name: str):
    def tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
        return _patchify(spec, *_complete(class_name, config)["patch_size"])

    def inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
        config = _complete(class_name, config)
        tokens(config, spec)
        sample = _Sampler(spec)
        kwargs = {
            "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
            "timestep": sample.timesteps(continuous=True),
            "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_dim"]),
        }
        if config["image_dim"] is not None:
            # Wan I2V: 257 CLIP tokens per image; FLF2V configs say how many (two images) in pos_embed_seq_len.
            image_tokens = config["pos_embed_seq_len"] or 257
            kwargs["encoder_hidden_states_image"] = sample.normal(spec.batch, image_tokens, config["image_dim"])
        kwargs["return_dict"] = False
        return kwargs

    def output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
        config = _complete(class_name, config)
        tokens(config, spec)
        return _video_output(config, spec, config["out_channels"] or config["in_channels"])

    return tokens, inputs, output


_wan_tokens, _wan_inputs, _wan_output = _wan_like("WanTransformer3DModel")
_skyreels_tokens, _skyreels_inputs, _skyreels_output = _wan_like("SkyReelsV2Transformer3DModel")

_WAN_TINY = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 24,
    "freq_dim": 32,
    "ffn_dim": 96,
    "num_layers": 2,
    "rope_max_seq_len": 64,
}
_WAN_ATTENTIONS = (
    AttentionLayout(r"blocks\.\d+\.attn1", "video", "video"),
    AttentionLayout(r"blocks\.\d+\.attn2", "video", "text"),
)
_WAN_BLOCKS = (BlockLayout(r"blocks\.\d+", "video"),)


# ---------------------------------------------------------------------------------------------------
# HunyuanVideo: double-stream blocks (joint attention, video and text have their own weights) then
# single-stream blocks (one weight set); both attend over video tokens followed by the text tokens.
# A token refiner (self-attention over text only) runs first on the prompt.


def _hunyuan_tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
    config = _complete("HunyuanVideoTransformer3DModel", config)
    return _patchify(spec, config["patch_size_t"], config["patch_size"], config["patch_size"])


def _hunyuan_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("HunyuanVideoTransformer3DModel", config)
    _hunyuan_tokens(config, spec)
    sample = _Sampler(spec)
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
    kwargs["return_dict"] = False
    return kwargs


def _hunyuan_output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
    config = _complete("HunyuanVideoTransformer3DModel", config)
    _hunyuan_tokens(config, spec)
    return _video_output(config, spec, config["out_channels"] or config["in_channels"])


_HUNYUAN_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "text_embed_dim": 24,
    "pooled_projection_dim": 20,
    "rope_axes_dim": [4, 6, 6],
}


# ---------------------------------------------------------------------------------------------------
# LTX-Video: the pipeline packs the latent into tokens (B, F'*H'*W', C*pt*p*p) before the call and
# passes the token grid as num_frames/height/width; self-attention over video, cross-attention to text.


def _ltx_tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
    config = _complete("LTXVideoTransformer3DModel", config)
    return _patchify(spec, config["patch_size_t"], config["patch_size"], config["patch_size"])


def _ltx_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("LTXVideoTransformer3DModel", config)
    frames, height, width = _ltx_tokens(config, spec)
    sample = _Sampler(spec)
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
        "return_dict": False,
    }


def _ltx_output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
    config = _complete("LTXVideoTransformer3DModel", config)
    frames, height, width = _ltx_tokens(config, spec)
    return (spec.batch, frames * height * width, config["out_channels"] or config["in_channels"])


_LTX_TINY = {
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "num_layers": 2,
    "caption_channels": 24,
}


# ---------------------------------------------------------------------------------------------------
# Mochi: per-frame 2D patchify; MMDiT-style joint attention over video tokens followed by the text
# tokens the mask keeps (one attention call per sample); an attention pool over the text feeds the
# conditioning.


def _mochi_tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
    patch = _complete("MochiTransformer3DModel", config)["patch_size"]
    return _patchify(spec, 1, patch, patch)


def _mochi_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("MochiTransformer3DModel", config)
    _mochi_tokens(config, spec)
    sample = _Sampler(spec)
    return {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_embed_dim"]),
        "timestep": sample.timesteps(continuous=True, dtype=spec.dtype),
        "encoder_attention_mask": sample.text_mask(torch.bool),
        "return_dict": False,
    }


def _mochi_output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
    config = _complete("MochiTransformer3DModel", config)
    _mochi_tokens(config, spec)
    return _video_output(config, spec, config["out_channels"] or config["in_channels"])


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


_MOCHI_TINY = {
    "patch_size": 2,
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_layers": 2,
    "pooled_projection_dim": 20,
    "in_channels": 4,
    "text_embed_dim": 24,  # the text pool always uses 8 heads: a multiple of 8
    "time_embed_dim": 16,
}


# ---------------------------------------------------------------------------------------------------
# Latte: alternating spatial blocks (self-attention inside each frame, cross-attention to text) and
# temporal blocks (self-attention across the frames at each spatial position).


def _latte_tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
    patch = _complete("LatteTransformer3DModel", config)["patch_size"]
    return _patchify(spec, 1, patch, patch)


def _latte_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("LatteTransformer3DModel", config)
    _latte_tokens(config, spec)
    if spec.frames != config["video_length"]:
        raise GraphoptError(
            f"Latte adds a temporal position table of video_length={config['video_length']} frames: "
            f"InputSpec.frames must equal it, got {spec.frames}"
        )
    sample = _Sampler(spec)
    return {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.frames, spec.height, spec.width),
        "timestep": sample.timesteps(continuous=False),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["caption_channels"]),
        "return_dict": False,
    }


def _latte_output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
    config = _complete("LatteTransformer3DModel", config)
    _latte_tokens(config, spec)
    return _video_output(config, spec, config["out_channels"] or config["in_channels"])


_LATTE_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "cross_attention_dim": 32,
    "sample_size": 8,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": 24,
    "video_length": 3,
}


# ---------------------------------------------------------------------------------------------------
# DiT and PixArt: image models (one frame); DiT is class-conditional, PixArt cross-attends to text.


def _image_tokens(class_name: str):
    def tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
        patch = _complete(class_name, config)["patch_size"]
        _require_single_frame(class_name, spec)
        return _patchify(spec, 1, patch, patch)

    return tokens


_dit_tokens = _image_tokens("DiTTransformer2DModel")
_pixart_tokens = _image_tokens("PixArtTransformer2DModel")


def _image_output(class_name: str, tokens):
    def output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
        config = _complete(class_name, config)
        tokens(config, spec)
        return (spec.batch, config["out_channels"] or config["in_channels"], spec.height, spec.width)

    return output


def _dit_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("DiTTransformer2DModel", config)
    _dit_tokens(config, spec)
    if spec.height != spec.width:
        raise GraphoptError(
            f"DiT unpatchifies a square token grid: height and width must match, got {spec.height}x{spec.width}"
        )
    sample = _Sampler(spec)
    return {
        "hidden_states": sample.normal(spec.batch, config["in_channels"], spec.height, spec.width),
        "timestep": sample.timesteps(continuous=False),
        "class_labels": sample.integers(config["num_embeds_ada_norm"], spec.batch),
        "return_dict": False,
    }


def _pixart_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("PixArtTransformer2DModel", config)
    _pixart_tokens(config, spec)
    sample = _Sampler(spec)
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
    kwargs["return_dict"] = False
    return kwargs


_DIT_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 10,
}
_PIXART_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 12,  # the size conditioning splits the width in three: 4*12 = 48
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 2,
    "cross_attention_dim": 48,
    "sample_size": 8,
    "patch_size": 2,
    "caption_channels": 24,
    "use_additional_conditions": True,
}


# ---------------------------------------------------------------------------------------------------
# CogVideoX: latent is (B, F, C, H, W); text tokens are concatenated BEFORE the video tokens and every
# block runs joint attention over [text, video]. CogVideoX-2b uses a sin-cos position table (and then
# needs exactly max_text_seq_length text tokens), 5b and 1.5 use RoPE that the pipeline computes and
# passes as image_rotary_emb.


def _cogvideox_tokens(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, int, int]:
    config = _complete("CogVideoXTransformer3DModel", config)
    return _patchify(spec, config["patch_size_t"] or 1, config["patch_size"], config["patch_size"])


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


def _cogvideox_inputs(config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
    config = _complete("CogVideoXTransformer3DModel", config)
    _cogvideox_tokens(config, spec)
    uses_table = not config["use_rotary_positional_embeddings"] or config["use_learned_positional_embeddings"]
    if uses_table and spec.text_len != config["max_text_seq_length"]:
        raise GraphoptError(
            f"this CogVideoX adds a position table laid out for max_text_seq_length="
            f"{config['max_text_seq_length']} text tokens: InputSpec.text_len must equal it, got {spec.text_len}"
        )
    sample = _Sampler(spec)
    kwargs = {
        "hidden_states": sample.normal(spec.batch, spec.frames, config["in_channels"], spec.height, spec.width),
        "encoder_hidden_states": sample.normal(spec.batch, spec.text_len, config["text_embed_dim"]),
        "timestep": sample.timesteps(continuous=False),
    }
    if config["ofs_embed_dim"]:
        kwargs["ofs"] = sample.constant(torch.full((1,), 2.0), spec.dtype)  # the I2V pipeline's constant
    if config["use_rotary_positional_embeddings"]:
        kwargs["image_rotary_emb"] = tuple(sample.constant(t, torch.float32) for t in _cogvideox_rotary(config, spec))
    kwargs["return_dict"] = False
    return kwargs


def _cogvideox_output(config: Mapping[str, Any], spec: InputSpec) -> tuple[int, ...]:
    config = _complete("CogVideoXTransformer3DModel", config)
    _cogvideox_tokens(config, spec)
    return (spec.batch, spec.frames, config["out_channels"] or config["in_channels"], spec.height, spec.width)


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


_COGVIDEOX_TINY = {
    "num_attention_heads": 4,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "time_embed_dim": 16,
    "text_embed_dim": 24,
    "num_layers": 2,
    "sample_width": 12,
    "sample_height": 8,
    "sample_frames": 9,  # (3 latent frames - 1) * temporal_compression_ratio 4 + 1
    "patch_size": 2,
    "max_text_seq_length": 7,
}


# ---------------------------------------------------------------------------------------------------
# The table

_VIDEO_SPEC = InputSpec(batch=1, frames=3, height=8, width=12, text_len=7)
_SQUARE_VIDEO_SPEC = InputSpec(batch=1, frames=3, height=8, width=8, text_len=7)
_IMAGE_SPEC = InputSpec(batch=2, frames=1, height=8, width=8, text_len=7)

_TRANSFORMER_BLOCKS_VIDEO = (BlockLayout(r"transformer_blocks\.\d+", "video"),)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="wan",
            class_names=("WanTransformer3DModel",),
            tiny_config=MappingProxyType(_WAN_TINY),
            default_spec=_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BCFHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states",),
            example_inputs=_wan_inputs,
            token_layout=_wan_tokens,
            output_shape=_wan_output,
            attentions=_WAN_ATTENTIONS,
            blocks=_WAN_BLOCKS,
            block_counts=MappingProxyType({"blocks": "num_layers"}),
        ),
        Family(
            name="skyreels-v2",
            class_names=("SkyReelsV2Transformer3DModel",),
            tiny_config=MappingProxyType(_WAN_TINY),
            default_spec=_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BCFHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states",),
            example_inputs=_skyreels_inputs,
            token_layout=_skyreels_tokens,
            output_shape=_skyreels_output,
            attentions=_WAN_ATTENTIONS,
            blocks=_WAN_BLOCKS,
            block_counts=MappingProxyType({"blocks": "num_layers"}),
        ),
        Family(
            name="hunyuan-video",
            class_names=("HunyuanVideoTransformer3DModel",),
            tiny_config=MappingProxyType(_HUNYUAN_TINY),
            default_spec=_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BCFHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"),
            example_inputs=_hunyuan_inputs,
            token_layout=_hunyuan_tokens,
            output_shape=_hunyuan_output,
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
            tiny_config=MappingProxyType(_LTX_TINY),
            default_spec=_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BNC",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
            example_inputs=_ltx_inputs,
            token_layout=_ltx_tokens,
            output_shape=_ltx_output,
            attentions=(
                AttentionLayout(r"transformer_blocks\.\d+\.attn1", "video", "video"),
                AttentionLayout(r"transformer_blocks\.\d+\.attn2", "video", "text"),
            ),
            blocks=_TRANSFORMER_BLOCKS_VIDEO,
        ),
        Family(
            name="mochi",
            class_names=("MochiTransformer3DModel",),
            tiny_config=MappingProxyType(_MOCHI_TINY),
            default_spec=_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BCFHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
            example_inputs=_mochi_inputs,
            token_layout=_mochi_tokens,
            output_shape=_mochi_output,
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
            tiny_config=MappingProxyType(_LATTE_TINY),
            default_spec=_SQUARE_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BCFHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states",),
            example_inputs=_latte_inputs,
            token_layout=_latte_tokens,
            output_shape=_latte_output,
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
            tiny_config=MappingProxyType(_DIT_TINY),
            default_spec=_IMAGE_SPEC,
            latent_input="hidden_states",
            latent_layout="BCHW",
            timestep_input="timestep",
            text_inputs=(),
            example_inputs=_dit_inputs,
            token_layout=_dit_tokens,
            output_shape=_image_output("DiTTransformer2DModel", _dit_tokens),
            attentions=(AttentionLayout(r"transformer_blocks\.\d+\.attn1", "frame", "frame"),),
            blocks=(BlockLayout(r"transformer_blocks\.\d+", "frame"),),
        ),
        Family(
            name="pixart",
            class_names=("PixArtTransformer2DModel",),
            tiny_config=MappingProxyType(_PIXART_TINY),
            default_spec=_IMAGE_SPEC,
            latent_input="hidden_states",
            latent_layout="BCHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states", "encoder_attention_mask"),
            example_inputs=_pixart_inputs,
            token_layout=_pixart_tokens,
            output_shape=_image_output("PixArtTransformer2DModel", _pixart_tokens),
            attentions=(
                AttentionLayout(r"transformer_blocks\.\d+\.attn1", "frame", "frame"),
                AttentionLayout(r"transformer_blocks\.\d+\.attn2", "frame", "text"),
            ),
            blocks=(BlockLayout(r"transformer_blocks\.\d+", "frame"),),
        ),
        Family(
            name="cogvideox",
            class_names=("CogVideoXTransformer3DModel",),
            tiny_config=MappingProxyType(_COGVIDEOX_TINY),
            default_spec=_VIDEO_SPEC,
            latent_input="hidden_states",
            latent_layout="BFCHW",
            timestep_input="timestep",
            text_inputs=("encoder_hidden_states",),
            example_inputs=_cogvideox_inputs,
            token_layout=_cogvideox_tokens,
            output_shape=_cogvideox_output,
            attentions=(AttentionLayout(r"transformer_blocks\.\d+\.attn1", "video", "video", text="before"),),
            blocks=_TRANSFORMER_BLOCKS_VIDEO,
            prepare_for_export=_cogvideox_prepare_for_export,
        ),
    )
}

_BY_CLASS: dict[str, Family] = {name: family for family in FAMILIES.values() for name in family.class_names}

# Full-size architectures, from the published diffusers configs (transformer/config.json of
# Wan-AI/Wan2.1-T2V-14B-Diffusers, hunyuanvideo-community/HunyuanVideo and genmo/mochi-1-preview,
# whose values are MochiTransformer3DModel's defaults), with the latent each is run at (Wan: 81
# frames 480p; HunyuanVideo: 129 frames 720p; Mochi: 163 frames 480x848, VAE ratios 6 and 8). For meta-device work: capture,
# structural passes and cost without the weights (`build_model(name, PUBLISHED[name][0], "meta")`).
PUBLISHED: Mapping[str, tuple[dict[str, Any], InputSpec]] = MappingProxyType({
    "wan2.1-t2v-14b": ({
        "_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 40,
        "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
        "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
    }, InputSpec(batch=1, frames=21, height=60, width=104, text_len=512)),
    "hunyuan-video-13b": ({
        "_class_name": "HunyuanVideoTransformer3DModel", "in_channels": 16, "out_channels": 16,
        "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20,
        "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
        "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True,
        "text_embed_dim": 4096, "pooled_projection_dim": 768, "rope_theta": 256.0,
        "rope_axes_dim": [16, 56, 56],
    }, InputSpec(batch=1, frames=33, height=90, width=160, text_len=256)),
    "mochi-1-10b": ({
        "_class_name": "MochiTransformer3DModel", "patch_size": 2, "num_attention_heads": 24,
        "attention_head_dim": 128, "num_layers": 48, "pooled_projection_dim": 1536,
        "in_channels": 12, "out_channels": None, "qk_norm": "rms_norm", "text_embed_dim": 4096,
        "time_embed_dim": 256, "activation_fn": "swiglu", "max_sequence_length": 256,
    }, InputSpec(batch=1, frames=28, height=60, width=106, text_len=256)),
})


def _unknown(what: str) -> GraphoptError:
    classes = ", ".join(sorted(_BY_CLASS))
    return GraphoptError(
        f"{what} is not a supported model family. Supported diffusers classes: {classes}. "
        f"Family names: {', '.join(FAMILIES)}. A new family needs one entry in graphopt/families.py."
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
            torch.manual_seed(_SEED)
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


__all__ = [
    "FAMILIES",
    "PUBLISHED",
    "AttentionLayout",
    "BlockLayout",
    "Family",
    "InputSpec",
    "SequenceLayout",
    "VideoPosition",
    "build_from_recipe",
    "build_model",
    "family_for",
    "spec_from_recipe",
]
