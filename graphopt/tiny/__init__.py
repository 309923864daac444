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
from importlib.resources.abc import Traversable
from pathlib import Path

from diffusers import WanTransformer3DModel
from safetensors.torch import load as load_safetensors

from graphopt.errors import GraphoptError
from graphopt.tiny.data import ClipBatch, GeneratorConfig, describe, embed_tokens, generate
from graphopt.tiny.sampler import initial_noise, sample

# Public name -> folder under graphopt/assets.
TEACHERS = {"tiny-wan": "tiny_wan"}

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def load_teacher_folder(folder: str | Path | Traversable) -> tuple[WanTransformer3DModel, GeneratorConfig]:
    """(the model in eval mode, float32 on the CPU; the GeneratorConfig of its training data) from a folder
    written by tools/train_tiny_teacher.py.

    Reads config.json and the safetensors weights directly (`from_config` + a strict `load_state_dict`):
    diffusers' `WanTransformer3DModel.from_pretrained(folder)` loads the same folder, but only where
    `accelerate` is installed (Wan keeps modules in fp32, which diffusers 0.42 refuses to do without it).
    """
    folder = Path(folder) if isinstance(folder, str) else folder
    try:
        model_config = json.loads((folder / "config.json").read_text())
        weights = load_safetensors((folder / WEIGHTS_FILE).read_bytes())
        data_config = GeneratorConfig.from_dict(json.loads((folder / "generator.json").read_text()))
    except FileNotFoundError as err:
        raise GraphoptError(
            f"{folder} is missing {Path(err.filename).name}: point at a folder written by "
            f"tools/train_tiny_teacher.py (config.json, {WEIGHTS_FILE}, generator.json)"
        ) from err
    model = WanTransformer3DModel.from_config(model_config)
    model.load_state_dict(weights, strict=True)
    return model.eval(), data_config


def load_tiny_teacher(name: str = "tiny-wan") -> tuple[WanTransformer3DModel, GeneratorConfig]:
    """The shipped teacher `name` and its GeneratorConfig (see `load_teacher_folder`).

    Read through importlib.resources, so it works from a wheel, an editable install or a zip.
    """
    if name not in TEACHERS:
        raise GraphoptError(f"unknown tiny teacher {name!r}: choose one of {sorted(TEACHERS)}")
    return load_teacher_folder(files("graphopt") / "assets" / TEACHERS[name])


__all__ = [
    "ClipBatch",
    "GeneratorConfig",
    "TEACHERS",
    "describe",
    "embed_tokens",
    "generate",
    "initial_noise",
    "load_teacher_folder",
    "load_tiny_teacher",
    "sample",
]
