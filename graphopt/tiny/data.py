"""Procedural "moving shapes" videos: the training data and the ground truth of the tiny teacher.

A clip holds one or two objects (a square, circle or triangle, each in its own colour) on a plain dark
background. Every object moves at a constant integer speed in its conditioned direction and bounces
off the walls: along each axis its top-left corner follows the triangle wave

    p(t) = L - |((p0 + v·t) mod 2L) - L|,   L = frame size - object size,

so positions stay exact integers and the rendered pixels are exactly the palette colours. Objects
never overlap in any frame (their boxes are kept apart by rejection sampling), so every object is fully
visible and can be found again by its colour alone. The first step of every object goes in its
conditioned direction (a start against the wall it moves towards is never drawn), so "direction" is
the direction of the first move and is never ambiguous.

The condition is a token sequence, three tokens per object slot: (shape, colour, direction), with the
"none" token in all three places of an empty slot. `embed_tokens` turns it into `encoder_hidden_states`
through a fixed table drawn from `GeneratorConfig.embedding_seed`: token vector + slot vector, so that
cross-attention can tell which attributes belong to the same object. The unconditional input of
classifier-free guidance is the all-zero embedding.

Everything is a pure function of (config, seed): the same call gives the same bytes on any machine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphopt.errors import GraphoptError
from graphopt.io import atomic_write_text

# Unit steps (dy, dx) per frame; y grows downwards, as in image rows.
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {
    "right": (0, 1),
    "left": (0, -1),
    "up": (-1, 0),
    "down": (1, 0),
    "up-right": (-1, 1),
    "up-left": (-1, -1),
    "down-right": (1, 1),
    "down-left": (1, -1),
}

# RGB in [-1, 1].
COLOUR_VALUES: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "magenta": (1.0, -1.0, 1.0),
    "cyan": (-1.0, 1.0, 1.0),
}

SHAPE_NAMES = ("square", "circle", "triangle")


def shape_template(shape: str, size: int) -> np.ndarray:
    """Boolean (size, size) bitmap of a shape.

    square: every pixel. circle: pixels whose centre lies within size/2 - 0.25 of the box centre (for
    size 6 an octagon of 24 pixels with rows 2, 4, 6, 6, 4, 2 wide; for size 5 the corners cut). triangle:
    pointing up, row r (from the top) spans the centred width 2·ceil((r+1)/2) (even sizes) or
    2·floor(r/2)+1 (odd sizes), so it is as tall as the box and as wide at its base.
    """
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    centre = (size - 1) / 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (rows - centre) ** 2 + (cols - centre) ** 2 <= (size / 2 - 0.25) ** 2
    if shape == "triangle":
        r = np.arange(size)
        widths = 2 * ((r + 2) // 2) if size % 2 == 0 else 2 * (r // 2) + 1
        half = widths[:, None] / 2
        return np.abs(cols - centre) < half
    raise GraphoptError(f"unknown shape {shape!r}: use one of {SHAPE_NAMES}")


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything that defines the data distribution; saved as generator.json beside the weights."""

    num_frames: int = 8
    height: int = 16
    width: int = 16
    object_size: int = 6
    max_objects: int = 2
    shapes: tuple[str, ...] = SHAPE_NAMES
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
    directions: tuple[str, ...] = ("right", "left", "up", "down")
    speeds: tuple[int, ...] = (1,)
    background: tuple[float, float, float] = (-0.8, -0.8, -0.8)
    text_dim: int = 32
    embedding_seed: int = 1234

    def __post_init__(self) -> None:
        for name in ("shapes", "colours", "directions", "speeds", "background"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.num_frames < 2:
            raise GraphoptError(f"num_frames={self.num_frames}: a clip needs at least 2 frames")
        if not 2 <= self.object_size <= min(self.height, self.width) // 2:
            raise GraphoptError(
                f"object_size={self.object_size} for a {self.height}x{self.width} frame: use 2 to "
                f"{min(self.height, self.width) // 2} so that objects have room to move"
            )
        if self.max_objects not in (1, 2):
            raise GraphoptError(f"max_objects={self.max_objects}: use 1 or 2")
        for field, known in (("shapes", SHAPE_NAMES), ("colours", COLOUR_VALUES), ("directions", DIRECTION_VECTORS)):
            values = getattr(self, field)
            unknown = [v for v in values if v not in known]
            if not values or unknown or len(set(values)) != len(values):
                raise GraphoptError(f"{field}={values}: give distinct names from {tuple(known)}")
        if len(self.colours) < self.max_objects:
            raise GraphoptError(f"{len(self.colours)} colours for {self.max_objects} objects: objects need "
                                f"distinct colours")
        limit = min(self.height, self.width) - self.object_size
        if not self.speeds or any(not 1 <= s <= limit for s in self.speeds):
            raise GraphoptError(f"speeds={self.speeds}: use integers from 1 to {limit} (pixels per frame)")
        if len(self.background) != 3 or any(not -1.0 <= c <= 1.0 for c in self.background):
            raise GraphoptError(f"background={self.background}: give 3 values in [-1, 1]")
        if self.text_dim < 1:
            raise GraphoptError(f"text_dim={self.text_dim}: must be positive")

    # Vocabulary: 0 = none, then shapes, colours, directions.
    @property
    def vocab_size(self) -> int:
        return 1 + len(self.shapes) + len(self.colours) + len(self.directions)

    @property
    def num_tokens(self) -> int:
        return 3 * self.max_objects

    def palette(self) -> np.ndarray:
        """(1 + num_colours, 3) RGB: row 0 the background, then the colours in config order."""
        return np.array([self.background] + [COLOUR_VALUES[c] for c in self.colours], dtype=np.float32)

    def templates(self) -> np.ndarray:
        """(num_shapes, object_size, object_size) boolean bitmaps in config order."""
        return np.stack([shape_template(s, self.object_size) for s in self.shapes])

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> GeneratorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GraphoptError(f"generator config has unknown fields {unknown}: expected a subset of {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temp file + os.replace)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> GeneratorConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class ClipBatch:
    """A batch of clips with their conditions and ground truth. Absent objects have index -1.

    videos:     (B, 3, F, H, W) float32 in [-1, 1]
    shapes, colours, directions, speeds: (B, max_objects) int64 indices into the config's tuples
    tokens:     (B, 3·max_objects) int64 condition tokens
    masks:      (B, max_objects, F, H, W) bool, each object's pixels
    centroids:  (B, max_objects, F, 2) float32 (y, x) mask centroids, NaN for absent objects
    """

    videos: np.ndarray
    shapes: np.ndarray
    colours: np.ndarray
    directions: np.ndarray
    speeds: np.ndarray
    tokens: np.ndarray
    masks: np.ndarray
    centroids: np.ndarray

    def __len__(self) -> int:
        return self.videos.shape[0]


def _bounce(start: np.ndarray, step: np.ndarray, frames: np.ndarray, limit: int) -> np.ndarray:
    """Triangle wave in [0, limit]: start + step·t reflected at both walls (exact for integers)."""
    raw = start[..., None] + step[..., None] * frames
    return limit - np.abs(np.mod(raw, 2 * limit) - limit)


def tokens_from_attributes(config: GeneratorConfig, shapes, colours, directions) -> np.ndarray:
    """(B, 3·max_objects) tokens: per slot (shape, colour, direction), 0 ('none') for an absent object."""
    shapes, colours, directions = (np.asarray(a, dtype=np.int64) for a in (shapes, colours, directions))
    present = shapes >= 0
    shape_tok = 1 + shapes
    colour_tok = 1 + len(config.shapes) + colours
    direction_tok = 1 + len(config.shapes) + len(config.colours) + directions
    per_slot = np.stack([shape_tok, colour_tok, direction_tok], axis=-1) * present[..., None]
    return per_slot.reshape(shapes.shape[0], -1)


def generate(config: GeneratorConfig, num_clips: int, seed: int) -> ClipBatch:
    """Draw `num_clips` clips; a pure function of (config, num_clips, seed)."""
    if num_clips < 1:
        raise GraphoptError(f"num_clips={num_clips}: must be at least 1")
    rng = np.random.default_rng(seed)
    B, O, F, H, W, S = num_clips, config.max_objects, config.num_frames, config.height, config.width, config.object_size

    num_objects = rng.integers(1, O + 1, size=B)
    present = np.arange(O)[None, :] < num_objects[:, None]
    shapes = rng.integers(0, len(config.shapes), size=(B, O))
    # Distinct colours per clip: the first O entries of a random permutation.
    colours = np.argsort(rng.random((B, len(config.colours))), axis=1)[:, :O]
    directions = rng.integers(0, len(config.directions), size=(B, O))
    speeds = np.asarray(config.speeds)[rng.integers(0, len(config.speeds), size=(B, O))]
    unit = np.array([DIRECTION_VECTORS[d] for d in config.directions], dtype=np.int64)[directions]
    step = unit * speeds[..., None]  # (B, O, 2)

    limits = np.array([H - S, W - S])
    frames = np.arange(F)
    # Start so that the first step stays inside: moving +, start <= limit - step; moving -, start >= |step|.
    low = np.maximum(-step, 0)
    high = limits - np.maximum(step, 0)
    start = np.empty((B, O, 2), dtype=np.int64)
    pending = np.ones(B, dtype=bool)
    while pending.any():
        idx = np.flatnonzero(pending)
        start[idx] = rng.integers(low[idx], high[idx] + 1)
        corner = np.stack([_bounce(start[idx, :, a], step[idx, :, a], frames, limits[a]) for a in (0, 1)], -1)
        if O == 2:
            gap = np.abs(corner[:, 0] - corner[:, 1])  # (n, F, 2)
            overlap = np.all(gap < S, axis=-1).any(axis=-1) & present[idx, 1]
            pending[idx] = overlap
        else:
            pending[idx] = False
    corners = np.stack([_bounce(start[..., a], step[..., a], frames, limits[a]) for a in (0, 1)], -1)  # (B,O,F,2)

    templates = config.templates()
    rows = np.arange(H)[:, None] - corners[..., 0][..., None, None]  # (B, O, F, H, 1)
    cols = np.arange(W)[None, :] - corners[..., 1][..., None, None]  # (B, O, F, 1, W)
    inside = (rows >= 0) & (rows < S) & (cols >= 0) & (cols < S)
    shape_idx = shapes[:, :, None, None, None]
    masks = inside & templates[shape_idx, np.clip(rows, 0, S - 1), np.clip(cols, 0, S - 1)]
    masks &= present[:, :, None, None, None]

    palette = config.palette()
    labels = np.zeros((B, F, H, W), dtype=np.int64)
    for o in range(O):
        labels = np.where(masks[:, o], 1 + colours[:, o, None, None, None], labels)
    videos = np.ascontiguousarray(palette[labels].transpose(0, 4, 1, 2, 3))

    grid_y, grid_x = np.mgrid[0:H, 0:W]
    area = masks.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        centroids = np.stack([(masks * grid_y).sum(axis=(-2, -1)) / area,
                              (masks * grid_x).sum(axis=(-2, -1)) / area], -1)

    absent = ~present
    shapes, colours, directions, speeds = (np.where(absent, -1, a) for a in (shapes, colours, directions, speeds))
    return ClipBatch(
        videos=videos,
        shapes=shapes,
        colours=colours,
        directions=directions,
        speeds=speeds,
        tokens=tokens_from_attributes(config, shapes, colours, directions),
        masks=masks,
        centroids=centroids.astype(np.float32),
    )


def embedding_tables(config: GeneratorConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(token table (vocab, text_dim), slot table (max_objects, text_dim)), N(0, 1) entries from embedding_seed."""
    gen = torch.Generator().manual_seed(config.embedding_seed)
    tokens = torch.randn(config.vocab_size, config.text_dim, generator=gen)
    slots = torch.randn(config.max_objects, config.text_dim, generator=gen)
    return tokens, slots


def embed_tokens(config: GeneratorConfig, tokens) -> torch.Tensor:
    """encoder_hidden_states (B, 3·max_objects, text_dim) float32: token vector + its object slot's vector."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[1] != config.num_tokens:
        raise GraphoptError(f"tokens of shape {tuple(tokens.shape)}: expected (batch, {config.num_tokens})")
    if tokens.min() < 0 or tokens.max() >= config.vocab_size:
        raise GraphoptError(f"token ids must lie in [0, {config.vocab_size}); got {tokens.min()}..{tokens.max()}")
    token_table, slot_table = embedding_tables(config)
    slot_of_position = torch.arange(config.num_tokens) // 3
    return token_table[tokens] + slot_table[slot_of_position]


def describe(config: GeneratorConfig, clips: ClipBatch, index: int) -> str:
    """A clip's condition in words, e.g. 'red square moving right; blue triangle moving up'."""
    parts = []
    for o in range(config.max_objects):
        if clips.shapes[index, o] >= 0:
            parts.append(
                f"{config.colours[clips.colours[index, o]]} {config.shapes[clips.shapes[index, o]]} "
                f"moving {config.directions[clips.directions[index, o]]}"
            )
    return "; ".join(parts)
