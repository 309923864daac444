"""Mini-VBench: quality metrics for generated moving-shape clips, given the conditions they were made from.

Clips are (B, 3, F, H, W) in [-1, 1] (numpy or torch); conditions are the per-object attribute
indices of `graphopt.tiny.data` (anything with `shapes`, `colours`, `directions` arrays of shape
(B, max_objects), -1 for an absent object, e.g. a `ClipBatch`).

How objects are found: every pixel takes the palette entry (background or one of the config's
colours) nearest to it in RGB, or none if it is farther than `COLOUR_TOLERANCE` from all of them; an
object of colour c in a frame is the largest 4-connected component of c-pixels, and counts as present
when it has at least half the pixels of the smallest shape template.

Metrics (per clip, then the mean over clips; all in [0, 1], higher is better, unless a unit is named):

- psnr_db (dB, only with a reference): 10·log10(2² / MSE), 2 being the value range; capped at 100.
- relative_error (only with a reference): ||clip - reference|| / ||reference||; lower is better.
- colour_accuracy: per frame, the Jaccard index |D ∩ C| / |D ∪ C| of the set D of colours present
  and the set C of conditioned colours (a missing object and a spurious one both count).
- shape_accuracy: fraction of (object, frame) pairs whose blob is classified as the conditioned
  shape; the classifier picks the template with the best IoU over all placements; a missing blob is wrong.
- subject_consistency: mean over objects and frames t ≥ 1 of the IoU between the frame-t blob and the
  frame-0 blob after moving them onto the same rounded centroid (0 where either is missing):
  the object keeps its identity and form.
- motion_smoothness: exp(-rmse / 1 px), rmse the root-mean-square distance between the object's
  bounding-box centre track and the best constant-velocity track that bounces off the walls
  (walls from the median box size; fitted per axis on a grid of 0.25 px and 0.25 px/frame, speeds up to
  2·max(config.speeds) + 1); 0 for an object present in fewer than 3 frames.
- motion_rmse_px (pixels): that rmse, averaged over the objects that were fitted; lower is better.
- direction_adherence: fraction of objects whose fitted first-step velocity (at least 0.5 px/frame)
  points, among the config's directions, closest (by cosine) to the conditioned one.
- temporal_flicker: 1 - mean |x_{t+1} - x_t| / 2 over the pixels that are background in both frames
  (VBench's (255 - MAE) / 255 on our value range): a static background scores 1.

The generator's own clips score exactly 1 on every [0, 1] metric (0 px rmse): that is the ceiling.
"""

from __future__ import annotations

import numpy as np
import torch

from graphopt.errors import GraphoptError
from graphopt.tiny.data import DIRECTION_VECTORS, GeneratorConfig

COLOUR_TOLERANCE = 0.6
MOTION_SCALE_PX = 1.0
MIN_TRACK_FRAMES = 3
GRID_PX = 0.25


def _as_numpy(clips) -> np.ndarray:
    if isinstance(clips, torch.Tensor):
        clips = clips.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(clips, dtype=np.float32)


def _check_clips(config: GeneratorConfig, clips: np.ndarray) -> None:
    expected = (3, config.num_frames, config.height, config.width)
    if clips.ndim != 5 or clips.shape[1:] != expected:
        raise GraphoptError(f"clips of shape {clips.shape}: expected (batch, {', '.join(map(str, expected))})")


def psnr_db(clips, reference) -> np.ndarray:
    """Per clip 10·log10(4 / MSE) in dB (value range 2), capped at 100 dB for identical clips."""
    a, b = _as_numpy(clips), _as_numpy(reference)
    if a.shape != b.shape:
        raise GraphoptError(f"clips {a.shape} and reference {b.shape} differ in shape: compare like with like")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    return np.minimum(10 * np.log10(4.0 / np.maximum(mse, 1e-30)), 100.0)


def relative_error(clips, reference) -> np.ndarray:
    """Per clip ||clips - reference|| / ||reference|| (Frobenius norms)."""
    a, b = _as_numpy(clips), _as_numpy(reference)
    if a.shape != b.shape:
        raise GraphoptError(f"clips {a.shape} and reference {b.shape} differ in shape: compare like with like")
    diff = np.linalg.norm((a - b).reshape(a.shape[0], -1), axis=1)
    return diff / np.maximum(np.linalg.norm(b.reshape(b.shape[0], -1), axis=1), 1e-30)


def palette_labels(config: GeneratorConfig, clips) -> np.ndarray:
    """(B, F, H, W) int: 0 background, k for the config's colour k-1, -1 for a pixel near no palette entry."""
    x = _as_numpy(clips)
    _check_clips(config, x)
    pixels = x.transpose(0, 2, 3, 4, 1)[..., None, :]  # (B, F, H, W, 1, 3)
    distance = np.linalg.norm(pixels - config.palette(), axis=-1)  # (B, F, H, W, K+1)
    labels = distance.argmin(axis=-1)
    return np.where(distance.min(axis=-1) <= COLOUR_TOLERANCE, labels, -1)


def largest_component(masks: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of each (..., H, W) boolean mask (ties: the lowest pixel index).

    Label propagation: every pixel starts with its own index and repeatedly takes the smallest index of
    its 4-neighbours inside the mask, until nothing changes.
    """
    shape = masks.shape
    flat = masks.reshape(-1, *shape[-2:])
    n, h, w = flat.shape
    big = h * w
    labels = np.where(flat, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        neighbours = np.minimum.reduce([
            labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]
        ])
        updated = np.where(flat, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    counts = np.zeros((n, big + 1), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(n), big), labels.reshape(n, -1).ravel()), 1)
    counts[:, big] = 0
    best = counts.argmax(axis=1)
    keep = (labels == best[:, None, None]) & (counts.max(axis=1) > 0)[:, None, None]
    return keep.reshape(shape)


def object_blobs(config: GeneratorConfig, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(B, O, F, H, W) bool: each conditioned object's blob (largest component of its colour), empty if absent."""
    colour_masks = labels[:, None] == (1 + colours)[:, :, None, None, None]  # (B, O, F, H, W)
    blobs = largest_component(colour_masks) & (colours >= 0)[:, :, None, None, None]
    return blobs & (blobs.sum(axis=(-2, -1), keepdims=True) >= _min_area(config))


def _min_area(config: GeneratorConfig) -> int:
    return int(config.templates().sum(axis=(1, 2)).min()) // 2


def classify_shapes(config: GeneratorConfig, blobs: np.ndarray) -> np.ndarray:
    """Shape index per (..., H, W) blob: the template with the best IoU over all placements; -1 if empty."""
    templates = config.templates().astype(np.float32)  # (K, S, S)
    S = config.object_size
    flat = blobs.reshape(-1, config.height, config.width).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(flat, (S, S), axis=(1, 2))  # (N, H-S+1, W-S+1, S, S)
    inter = np.einsum("nyxij,kij->nyxk", windows, templates)
    union = flat.sum(axis=(1, 2))[:, None, None, None] + templates.sum(axis=(1, 2)) - inter
    iou = (inter / np.maximum(union, 1)).reshape(flat.shape[0], -1, len(config.shapes)).max(axis=1)
    shape = np.where(flat.sum(axis=(1, 2)) > 0, iou.argmax(axis=1), -1)
    return shape.reshape(blobs.shape[:-2])


def _centred_windows(config: GeneratorConfig, blobs: np.ndarray) -> np.ndarray:
    """(..., 2S+1, 2S+1) crops of each blob around its centroid rounded half up (a translation-exact rounding)."""
    S, H, W = config.object_size, config.height, config.width
    flat = blobs.reshape(-1, H, W)
    area = np.maximum(flat.sum(axis=(1, 2)), 1)
    ys, xs = np.mgrid[0:H, 0:W]
    cy = np.floor((flat * ys).sum(axis=(1, 2)) / area + 0.5).astype(np.int64)
    cx = np.floor((flat * xs).sum(axis=(1, 2)) / area + 0.5).astype(np.int64)
    padded = np.pad(flat, ((0, 0), (S, S), (S, S)))
    offsets = np.arange(2 * S + 1)
    rows = (cy[:, None] + offsets)[:, :, None]
    cols = (cx[:, None] + offsets)[:, None, :]
    crops = padded[np.arange(flat.shape[0])[:, None, None], rows, cols]
    return crops.reshape(*blobs.shape[:-2], 2 * S + 1, 2 * S + 1)


def subject_consistency(config: GeneratorConfig, blobs: np.ndarray) -> np.ndarray:
    """(B, O): mean over frames t >= 1 of IoU(centred blob_t, centred blob_0); 0 where either is empty."""
    crops = _centred_windows(config, blobs)  # (B, O, F, w, w)
    first, rest = crops[:, :, :1], crops[:, :, 1:]
    inter = (first & rest).sum(axis=(-2, -1))
    union = (first | rest).sum(axis=(-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).mean(axis=-1)


def _bounce_fit(track: np.ndarray, present: np.ndarray, lo: float, hi: float, max_speed: float):
    """Best (start, velocity) on the grid for p(t) = triangle wave of start + v·t inside [lo, hi].

    Returns (squared error summed over present frames, velocity). Among equal fits, one whose first
    step stays inside the walls wins (a start on the wall moving into it is the same track as moving
    away from it; the generator only draws the latter).
    """
    span = max(hi - lo, GRID_PX)
    starts = np.arange(lo, hi + GRID_PX / 2, GRID_PX)
    speeds = np.arange(-max_speed, max_speed + GRID_PX / 2, GRID_PX)
    t = np.arange(track.shape[0])
    raw = (starts[:, None, None] - lo) + speeds[None, :, None] * t  # (P, V, F)
    model = lo + span - np.abs(np.mod(raw, 2 * span) - span)
    err = (((model - track) ** 2) * present).sum(axis=-1)
    first = starts[:, None] + speeds[None, :]
    err = err + 1e-6 * ((first < lo - 1e-9) | (first > hi + 1e-9))
    p, v = np.unravel_index(err.argmin(), err.shape)
    return err[p, v], speeds[v]


def fit_motion(config: GeneratorConfig, blobs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rmse px (B, O), fitted velocity (B, O, 2) as (vy, vx)); NaN for objects present in < 3 frames."""
    B, O, F, H, W = blobs.shape
    present = blobs.any(axis=(-2, -1))  # (B, O, F)
    rows_any, cols_any = blobs.any(axis=-1), blobs.any(axis=-2)  # (B, O, F, H) and (B, O, F, W)
    rmse = np.full((B, O), np.nan)
    velocity = np.full((B, O, 2), np.nan)
    max_speed = 2 * max(config.speeds) + 1
    for b in range(B):
        for o in range(O):
            frames = present[b, o]
            if frames.sum() < MIN_TRACK_FRAMES:
                continue
            total = 0.0
            for axis, occupied, size in ((0, rows_any[b, o], H), (1, cols_any[b, o], W)):
                first = np.where(frames, np.argmax(occupied, axis=-1), 0)
                last = np.where(frames, size - 1 - np.argmax(occupied[:, ::-1], axis=-1), 0)
                centre = (first + last) / 2
                extent = np.median((last - first + 1)[frames])
                lo, hi = (extent - 1) / 2, (size - 1) - (extent - 1) / 2
                sq, v = _bounce_fit(centre, frames, lo, hi, max_speed)
                total += sq
                velocity[b, o, axis] = v
            rmse[b, o] = np.sqrt(total / frames.sum())
    return rmse, velocity


def direction_matches(config: GeneratorConfig, velocity: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """(B, O) bool: the fitted velocity is at least 0.5 px/frame and closest in angle to the conditioned direction."""
    units = np.array([DIRECTION_VECTORS[d] for d in config.directions], dtype=np.float64)
    units /= np.linalg.norm(units, axis=1, keepdims=True)
    speed = np.linalg.norm(velocity, axis=-1)
    cosine = np.einsum("boc,kc->bok", np.nan_to_num(velocity), units)
    nearest = cosine.argmax(axis=-1)
    return (speed >= 0.5) & (nearest == directions)


def temporal_flicker(clips: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(B,): 1 - mean |x_{t+1} - x_t| / 2 over pixels that are background in frames t and t+1 (1 if none)."""
    diff = np.abs(np.diff(clips, axis=2)).mean(axis=1)  # (B, F-1, H, W)
    background = (labels[:, 1:] == 0) & (labels[:, :-1] == 0)
    total = (diff * background).sum(axis=(1, 2, 3))
    count = background.sum(axis=(1, 2, 3))
    return np.where(count > 0, 1 - total / np.maximum(count, 1) / 2, 1.0)


def clip_scores(config: GeneratorConfig, clips, conditions, reference=None) -> dict[str, np.ndarray]:
    """Per-clip metrics (see the module docstring): name -> (B,) array."""
    x = _as_numpy(clips)
    _check_clips(config, x)
    shapes, colours, directions = (np.asarray(getattr(conditions, k)) for k in ("shapes", "colours", "directions"))
    if (shapes.shape != (x.shape[0], config.max_objects) or colours.shape != shapes.shape
            or directions.shape != shapes.shape):
        raise GraphoptError(
            f"conditions of shapes {shapes.shape}/{colours.shape}/{directions.shape}: expected ({x.shape[0]}, "
            f"{config.max_objects}) each, one row per clip"
        )
    exists = shapes >= 0
    n_objects = exists.sum(axis=1)
    if (n_objects == 0).any():
        raise GraphoptError(f"clips {np.flatnonzero(n_objects == 0).tolist()} have no object in their condition: "
                            "every clip needs at least one (shape index >= 0)")
    labels = palette_labels(config, x)
    blobs = object_blobs(config, labels, colours)  # (B, O, F, H, W)
    F = config.num_frames

    colour_present = np.stack([
        largest_component(labels == 1 + k).sum(axis=(-2, -1)) >= _min_area(config) for k in range(len(config.colours))
    ], axis=-1)  # (B, F, K)
    wanted = ((colours[:, :, None] == np.arange(len(config.colours))) & exists[:, :, None]).any(axis=1)  # (B, K)
    wanted = np.broadcast_to(wanted[:, None], colour_present.shape)
    union = (colour_present | wanted).sum(-1)
    jaccard = np.where(union > 0, (colour_present & wanted).sum(-1) / np.maximum(union, 1), 1.0)

    predicted = classify_shapes(config, blobs)  # (B, O, F)
    shape_ok = (predicted == shapes[:, :, None]) & exists[:, :, None]

    consistency = subject_consistency(config, blobs)
    rmse, velocity = fit_motion(config, blobs)
    smooth = np.where(np.isnan(rmse), 0.0, np.exp(-np.nan_to_num(rmse) / MOTION_SCALE_PX))
    direction_ok = direction_matches(config, velocity, directions)

    def per_clip(values: np.ndarray) -> np.ndarray:
        return (values * exists).sum(axis=1) / n_objects

    fitted = ~np.isnan(rmse) & exists
    fitted_count = fitted.sum(axis=1)
    mean_rmse = np.where(fitted, rmse, 0.0).sum(axis=1) / np.maximum(fitted_count, 1)
    scores = {
        "colour_accuracy": jaccard.mean(axis=1),
        "shape_accuracy": per_clip(shape_ok.sum(axis=-1) / F),
        "subject_consistency": per_clip(consistency),
        "motion_smoothness": per_clip(smooth),
        "motion_rmse_px": np.where(fitted_count > 0, mean_rmse, np.nan),
        "direction_adherence": per_clip(direction_ok.astype(np.float64)),
        "temporal_flicker": temporal_flicker(x, labels),
    }
    if reference is not None:
        scores["psnr_db"] = psnr_db(x, reference)
        scores["relative_error"] = relative_error(x, reference)
    return scores


def evaluate_clips(config: GeneratorConfig, clips, conditions, reference=None) -> dict[str, float]:
    """Means over clips of `clip_scores` (motion_rmse_px over the clips where some object was fitted)."""
    return {name: float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
            for name, values in clip_scores(config, clips, conditions, reference).items()}


# The content and motion metrics the aggregate averages (all in [0, 1], higher is better).
AGGREGATE_METRICS = ("colour_accuracy", "shape_accuracy", "subject_consistency", "motion_smoothness",
                     "direction_adherence")


def aggregate_score(scores: dict[str, float], teacher: dict[str, float]) -> float:
    """One number per model: the mean over AGGREGATE_METRICS of min(score / teacher's score, 1).

    Relative to the teacher, because a student can at best reproduce it (the teacher is the
    reference; the generator's own clips would score 1 on every metric, the teacher a little less).
    Capped at 1, so that beating the teacher on one metric by chance cannot hide a loss on another.
    A NaN score (nothing measured) counts as 0.
    """
    parts = []
    for name in AGGREGATE_METRICS:
        base = teacher.get(name)
        if base is None or not np.isfinite(base) or base <= 0:
            raise GraphoptError(f"the teacher's {name} is {base}: the aggregate needs a positive reference value "
                                "(score the teacher on more clips)")
        value = scores[name]
        parts.append(min(value / base, 1.0) if np.isfinite(value) else 0.0)
    return float(np.mean(parts))
