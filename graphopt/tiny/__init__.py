"""The project's own small video teacher: a WanTransformer3DModel trained on procedural moving shapes.

    model, data_config = load_tiny_teacher()
    clips = generate(data_config, 8, seed=0)                      # conditions (and ground truth)
    videos = sample(model, embed_tokens(data_config, clips.tokens), seed=0)

The weights ship as package data (graphopt/assets/<name>/: config.json, safetensors weights,
generator.json); tools/train_tiny_teacher.py made them.
"""

from __future__ import annotations

import json
from importlib.resources import files

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load as load_safetensors

from graphopt.errors import GraphoptError
from graphopt.tiny.data import ClipBatch, GeneratorConfig, describe, embed_tokens, generate
from graphopt.tiny.sampler import initial_noise, sample

# Public name -> folder under graphopt/assets.
TEACHERS = {"tiny-wan": "tiny_wan"}

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def load_tiny_teacher(name: str = "tiny-wan") -> tuple[WanTransformer3DModel, GeneratorConfig]:
    """(the teacher in eval mode, float32 on the CPU; the GeneratorConfig of its training data).

    Read through importlib.resources, so it works from a wheel, an editable install or a zip; the same
    folder also loads with `WanTransformer3DModel.from_pretrained(folder)`.
    """
    if name not in TEACHERS:
        raise GraphoptError(f"unknown tiny teacher {name!r}: choose one of {sorted(TEACHERS)}")
    folder = files("graphopt") / "assets" / TEACHERS[name]
    try:
        model_config = json.loads((folder / "config.json").read_text())
        weights = load_safetensors((folder / WEIGHTS_FILE).read_bytes())
        data_config = GeneratorConfig.from_dict(json.loads((folder / "generator.json").read_text()))
    except FileNotFoundError as err:
        raise GraphoptError(
            f"tiny teacher {name!r} is missing a file ({err.filename}): reinstall graphopt, or retrain it "
            f"with `python tools/train_tiny_teacher.py --out graphopt/assets/{TEACHERS[name]}`"
        ) from err
    model = WanTransformer3DModel.from_config(model_config)
    model.load_state_dict(weights, strict=True)
    return model.to(torch.float32).eval(), data_config


__all__ = [
    "ClipBatch",
    "GeneratorConfig",
    "TEACHERS",
    "describe",
    "embed_tokens",
    "generate",
    "initial_noise",
    "load_tiny_teacher",
    "sample",
]
