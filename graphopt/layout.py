"""The layout types analyses consume: the input size a capture is made at, and how attention
sequences and residual streams map onto the latent video's token grid.

`graphopt.families` resolves them per family (which attention holds what); head-role analysis,
block importance and distillation read them. Token order: video tokens are laid out row-major over
(frame, y, x) after patchify, so video token v sits at frame v // (h*w), row (v % (h*w)) // w,
column v % w.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from graphopt.errors import GraphoptError

SequenceKind = Literal["video", "frame", "temporal", "text"]
TextPlacement = Literal["none", "before", "after"]

_SEQUENCE_KINDS = ("video", "frame", "temporal", "text")
_TEXT_PLACEMENTS = ("none", "before", "after")


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

