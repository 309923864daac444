"""The tiny teacher's data generator, shipped weights, sampler and mini-VBench metrics."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from graphopt.errors import GraphoptError
from graphopt.eval import clip_scores, evaluate_clips, largest_component, psnr_db, relative_error
from graphopt.tiny import (GeneratorConfig, embed_tokens, generate, initial_noise, load_teacher_folder,
                           load_tiny_teacher, sample)
from graphopt.tiny.data import DIRECTION_VECTORS
from graphopt.tiny.testbed import eval_conditions, quality

REPO = Path(__file__).resolve().parent.parent
CONFIG = GeneratorConfig()
ACCURACY_METRICS = ("colour_accuracy", "shape_accuracy", "subject_consistency", "motion_smoothness",
                    "direction_adherence", "temporal_flicker")


@pytest.fixture(scope="module")
def clips():
    return generate(CONFIG, 48, seed=7)


@pytest.fixture(scope="module")
def teacher():
    return load_tiny_teacher()


# --- generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic_and_shaped(clips):
    again = generate(CONFIG, 48, seed=7)
    for name in ("videos", "shapes", "colours", "directions", "tokens", "masks", "centroids"):
        np.testing.assert_array_equal(getattr(clips, name), getattr(again, name))
    assert not np.array_equal(generate(CONFIG, 48, seed=8).videos, clips.videos)
    B, O, F, H, W = 48, CONFIG.max_objects, CONFIG.num_frames, CONFIG.height, CONFIG.width
    assert clips.videos.shape == (B, 3, F, H, W) and clips.videos.dtype == np.float32
    assert clips.masks.shape == (B, O, F, H, W) and clips.centroids.shape == (B, O, F, 2)
    assert clips.tokens.shape == (B, CONFIG.num_tokens)
    assert clips.videos.min() >= -1 and clips.videos.max() <= 1
    present = clips.shapes >= 0
    assert present[:, 0].all() and 0 < present[:, 1].mean() < 1  # one or two objects
    two = present[:, 1]
    assert (clips.colours[two, 0] != clips.colours[two, 1]).all()
    assert not (clips.masks[:, 0] & clips.masks[:, 1]).any()  # objects never overlap


def test_generator_pixels_are_exact_palette_colours(clips):
    palette = CONFIG.palette()
    for b in range(4):
        for o in range(CONFIG.max_objects):
            if clips.shapes[b, o] < 0:
                assert not clips.masks[b, o].any()
                continue
            pixels = clips.videos[b].transpose(1, 2, 3, 0)[clips.masks[b, o]]
            np.testing.assert_array_equal(pixels, np.broadcast_to(palette[1 + clips.colours[b, o]], pixels.shape))
            # Every frame shows the whole template.
            area = CONFIG.templates()[clips.shapes[b, o]].sum()
            assert (clips.masks[b, o].sum(axis=(-2, -1)) == area).all()


def test_generator_motion_is_constant_speed_with_bounces(clips):
    S = CONFIG.object_size
    bounced = 0
    for b, o in zip(*np.nonzero(clips.shapes >= 0)):
        track = clips.centroids[b, o]  # (F, 2)
        step = np.diff(track, axis=0)
        unit = np.array(DIRECTION_VECTORS[CONFIG.directions[clips.directions[b, o]]])
        speed = clips.speeds[b, o]
        np.testing.assert_allclose(step[0], unit * speed, atol=1e-5)  # the first move goes the conditioned way
        np.testing.assert_allclose(np.abs(step), np.broadcast_to(np.abs(unit) * speed, step.shape), atol=1e-5)
        bounced += int((np.sign(step.round()) != np.sign(step[0].round())).any())
        rows, cols = np.nonzero(clips.masks[b, o].any(axis=0))
        assert rows.min() >= 0 and rows.max() < CONFIG.height and cols.max() < CONFIG.width
        assert clips.masks[b, o].any(axis=(-1)).sum(axis=-1).max() == S
    assert bounced > 0


def test_generator_config_checks_and_round_trips(tmp_path):
    with pytest.raises(GraphoptError, match="shapes"):
        GeneratorConfig(shapes=("square", "hexagon"))
    with pytest.raises(GraphoptError, match="object_size"):
        GeneratorConfig(object_size=12)
    with pytest.raises(GraphoptError, match="unknown fields"):
        GeneratorConfig.from_dict({"frames": 8})
    config = GeneratorConfig(directions=("right", "up-left"), speeds=(1, 2))
    config.save(tmp_path / "generator.json")
    assert GeneratorConfig.load(tmp_path / "generator.json") == config


def test_condition_embedding_tells_slots_apart(clips):
    cond = embed_tokens(CONFIG, clips.tokens)
    assert cond.shape == (48, CONFIG.num_tokens, CONFIG.text_dim) and cond.dtype == torch.float32
    torch.testing.assert_close(cond, embed_tokens(CONFIG, clips.tokens), rtol=0, atol=0)
    # The same attributes in the other object slot give a different embedding.
    swapped = np.concatenate([clips.tokens[:, 3:], clips.tokens[:, :3]], axis=1)
    two = clips.shapes[:, 1] >= 0
    assert (embed_tokens(CONFIG, swapped)[two] - cond[two]).abs().amax(dim=(1, 2)).min() > 0.1
    with pytest.raises(GraphoptError, match="expected"):
        embed_tokens(CONFIG, clips.tokens[:, :4])


# --- shipped teacher and sampler ---------------------------------------------------------------


def test_shipped_teacher_loads_in_float32(teacher):
    model, config = teacher
    folder = files("graphopt") / "assets" / "tiny_wan"
    assert config == GeneratorConfig.load(folder / "generator.json")
    assert model.config.in_channels == 3 and model.config.text_dim == config.text_dim
    assert tuple(model.config.patch_size) == (1, 2, 2)
    size = (Path(str(folder)) / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 8_000_000 and all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(GraphoptError, match="unknown tiny teacher"):
        load_tiny_teacher("tiny-hunyuan")


def test_shipped_teacher_loads_with_from_pretrained(teacher):
    # diffusers 0.42 loads Wan (it has _keep_in_fp32_modules) only through accelerate's low-memory path.
    pytest.importorskip("accelerate", reason="WanTransformer3DModel.from_pretrained needs accelerate")
    model, _ = teacher
    again = WanTransformer3DModel.from_pretrained(str(files("graphopt") / "assets" / "tiny_wan"))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_four_step_sample_is_fast_and_deterministic(teacher):
    model, config = teacher
    data = generate(config, 2, seed=3)
    cond = embed_tokens(config, data.tokens)
    calls = []

    def counting(**kwargs):  # the real teacher, recording each call's batch
        calls.append(kwargs["hidden_states"].shape[0])
        return model(**kwargs)

    steps = []
    out = sample(counting, cond, video_shape=data.videos.shape[1:], seed=11, num_steps=4, guidance_scale=4.0,
                 step_callback=lambda i, t: steps.append((i, float(t))))
    assert out.shape == (2, *data.videos.shape[1:]) and out.min() >= -1 and out.max() <= 1
    assert calls == [4] * 4  # conditional + unconditional in one batch of 2B
    assert [i for i, _ in steps] == [0, 1, 2, 3] and steps[0][1] == 1000.0 and steps[-1][1] < steps[0][1]
    again = sample(model, cond, video_shape=data.videos.shape[1:], seed=11, num_steps=4, guidance_scale=4.0)
    assert torch.equal(out, again)
    calls.clear()
    sample(counting, cond, video_shape=data.videos.shape[1:], seed=11, num_steps=2, guidance_scale=1.0)
    assert calls == [2, 2]  # no guidance: the unconditional branch is skipped


def test_sampler_starts_from_the_seeded_noise(teacher):
    model, config = teacher
    cond = embed_tokens(config, generate(config, 2, seed=3).tokens)
    shape = (3, config.num_frames, config.height, config.width)
    from_seed = sample(model, cond, video_shape=shape, seed=5, num_steps=2)
    given = sample(model, cond, video_shape=shape, noise=initial_noise(2, shape, 5), num_steps=2)
    assert torch.equal(from_seed, given)
    with pytest.raises(GraphoptError, match="guidance_scale"):
        sample(model, cond, guidance_scale=0.5)


def test_shipped_teacher_draws_the_conditioned_motion(teacher):
    # The motion columns of the README's teacher table (tools/eval_tiny_teacher.py), on 6 of its clips.
    model, config = teacher
    data = eval_conditions(config, 6)
    scores, _ = quality(model, config, data, steps=10)
    assert scores["colour_accuracy"] > 0.9 and scores["shape_accuracy"] > 0.9
    assert scores["motion_smoothness"] > 0.8 and scores["direction_adherence"] > 0.8
    assert scores["temporal_flicker"] > 0.95


def test_training_script_writes_a_loadable_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_teacher", REPO / "tools" / "train_tiny_teacher.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    out = tmp_path / "tiny"
    trainer.main(["--out", str(out), "--steps", "2", "--batch-size", "2", "--layers", "1", "--heads", "2",
                  "--head-dim", "12", "--warmup", "1"])
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "generator.json", "training.json"]
    model, config = load_teacher_folder(out)
    assert model.config.num_layers == 1 and config == GeneratorConfig()
    record = json.loads((out / "training.json").read_text())
    assert record["steps_done"] == 2 and np.isfinite(record["loss_ema"])


def test_training_resumes_where_it_stopped(tmp_path):
    spec = importlib.util.spec_from_file_location("train_tiny_teacher", REPO / "tools" / "train_tiny_teacher.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    tiny = ["--steps", "4", "--batch-size", "2", "--layers", "1", "--heads", "2", "--head-dim", "12", "--warmup", "1"]
    trainer.main(tiny + ["--out", str(tmp_path / "whole")])
    state = tmp_path / "resume.pt"
    trainer.main(tiny + ["--out", str(tmp_path / "parts"), "--resume", str(state), "--stop-after", "0"])
    assert json.loads((tmp_path / "parts" / "training.json").read_text())["steps_done"] == 1
    trainer.main(tiny + ["--out", str(tmp_path / "parts"), "--resume", str(state)])
    whole, parts = (load_teacher_folder(tmp_path / name)[0].state_dict() for name in ("whole", "parts"))
    for name, value in whole.items():
        assert torch.equal(value, parts[name]), name   # the same batches, noise and EMA as one run


# --- metrics -----------------------------------------------------------------------------------


def test_training_data_scores_the_ceiling(clips):
    scores = evaluate_clips(CONFIG, clips.videos, clips, reference=clips.videos)
    for name in ACCURACY_METRICS:
        assert scores[name] == pytest.approx(1.0), name
    assert scores["motion_rmse_px"] == 0.0 and scores["relative_error"] == 0.0 and scores["psnr_db"] == 100.0


def test_shuffled_frames_lose_motion_but_keep_content(clips):
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(CONFIG.num_frames) for _ in range(len(clips))])
    shuffled = np.take_along_axis(clips.videos, order[:, None, :, None, None], axis=2)
    scores = evaluate_clips(CONFIG, shuffled, clips)
    assert scores["motion_smoothness"] < 0.5 and scores["motion_rmse_px"] > 1.0
    assert scores["direction_adherence"] < 0.6
    for name in ("colour_accuracy", "shape_accuracy", "subject_consistency"):
        assert scores[name] == pytest.approx(1.0), name


def test_pure_noise_scores_low(clips):
    noise = np.clip(np.random.default_rng(1).standard_normal(clips.videos.shape), -1, 1).astype(np.float32)
    scores = evaluate_clips(CONFIG, noise, clips, reference=clips.videos)
    for name in ("colour_accuracy", "shape_accuracy", "subject_consistency", "motion_smoothness",
                 "direction_adherence"):
        assert scores[name] < 0.2, name
    assert scores["temporal_flicker"] < 0.9 and scores["psnr_db"] < 10


def test_wrong_conditions_score_low(clips):
    scores = evaluate_clips(CONFIG, clips.videos, generate(CONFIG, len(clips), seed=99))
    assert scores["colour_accuracy"] < 0.5 and scores["direction_adherence"] < 0.5


def test_fidelity_metrics_match_their_formulas(clips):
    a = clips.videos[:4]
    b = a + 0.1  # MSE 0.01 -> 10·log10(4 / 0.01)
    np.testing.assert_allclose(psnr_db(b, a), 10 * np.log10(400.0), rtol=1e-5)
    rel = relative_error(b, a)
    expected = 0.1 * np.sqrt(a[0].size) / np.linalg.norm(a.reshape(4, -1), axis=1)
    np.testing.assert_allclose(rel, expected, rtol=1e-5)
    with pytest.raises(GraphoptError, match="differ in shape"):
        psnr_db(a, a[:2])


def test_largest_component_keeps_the_biggest_four_connected_blob():
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, 0, 0:2] = True  # 2 pixels
    mask[0, 2:5, 2:5] = True  # 9 pixels
    mask[0, 5, 5] = True  # diagonal to the square: not 4-connected
    keep = largest_component(mask)
    expected = np.zeros_like(mask)
    expected[0, 2:5, 2:5] = True
    np.testing.assert_array_equal(keep, expected)


def test_metrics_reject_mismatched_inputs(clips):
    with pytest.raises(GraphoptError, match="expected"):
        clip_scores(CONFIG, clips.videos[:, :, :4], clips)
    with pytest.raises(GraphoptError, match="one row per clip"):
        clip_scores(CONFIG, clips.videos[:4], clips)
    empty = generate(CONFIG, 2, seed=1)
    with pytest.raises(GraphoptError, match="no object"):
        clip_scores(CONFIG, empty.videos, dataclasses.replace(empty, shapes=np.full((2, 2), -1)))
