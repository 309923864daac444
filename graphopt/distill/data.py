"""The distillation trainer's input stream: batches of noisy latents (random, or drawn from a
folder of safetensors samples) with text states, from a checkpointable CPU generator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from graphopt.distill.config import DataConfig
from graphopt.errors import GraphoptError


class DistillData:
    """Batches of noisy inputs for one process, drawn from a CPU torch.Generator (so a run gives the
    same batches on any device, and the generator state can be checkpointed).

    Folder mode: every *.safetensors file holds one sample, `latents` (C, F, H, W) and optionally
    `encoder_hidden_states` (L, D); samples are drawn uniformly with replacement. Text states
    absent from the files (or with no folder) are drawn from N(0, I) with data.text_shape.
    """

    def __init__(self, config: DataConfig, *, seed: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.config = config
        self.dtype = dtype
        self.device = device
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.files: list[Path] = []
        self.files_have_text = False
        if config.folder is not None:
            self.files, self.files_have_text = self._scan_folder(Path(config.folder))
        if not self.files_have_text and config.text_shape is None:
            raise GraphoptError(
                "[data] text_shape is needed to draw random text states "
                + ("(the data files have no `encoder_hidden_states`)" if self.files else "(no data folder given)")
                + "; set text_shape = [tokens, dim] of the model's text encoder"
            )

    def _scan_folder(self, folder: Path) -> tuple[list[Path], bool]:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise GraphoptError(f"[data] folder {folder} has no *.safetensors files; add samples or drop `folder`")
        shapes: dict[str, set[tuple[int, ...]]] = {"latents": set(), "encoder_hidden_states": set()}
        with_text = 0
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                keys = set(handle.keys())
                if "latents" not in keys:
                    raise GraphoptError(f"[data] {path} has no `latents` tensor (found {sorted(keys)})")
                for key in shapes:
                    if key in keys:
                        shapes[key].add(tuple(handle.get_slice(key).get_shape()))
                with_text += "encoder_hidden_states" in keys
        for key, found in shapes.items():
            rank = 4 if key == "latents" else 2
            if len(found) > 1 or any(len(s) != rank for s in found):
                raise GraphoptError(
                    f"[data] `{key}` must have one shape of rank {rank} across {folder}, found {sorted(found)}"
                )
        if 0 < with_text < len(files):
            raise GraphoptError(
                f"[data] {with_text} of {len(files)} files in {folder} have `encoder_hidden_states`: all or none must"
            )
        return files, with_text == len(files)

    def next_batch(self) -> dict[str, Any]:
        """The next batch of this process's stream."""
        return self.sample(self.generator)

    def sample(self, generator: torch.Generator) -> dict[str, Any]:
        """A batch drawn from `generator`: x_t = (1 − s)·x0 + s·ε, timestep = s·num_train_timesteps."""
        batch = self.config.batch_size
        text = None
        if self.files:
            picks = torch.randint(len(self.files), (batch,), generator=generator).tolist()
            samples = [load_file(str(self.files[i])) for i in picks]
            x0 = torch.stack([sample["latents"].float() for sample in samples])
            if self.files_have_text:
                text = torch.stack([sample["encoder_hidden_states"].float() for sample in samples])
        else:
            x0 = torch.randn(batch, *self.config.latent_shape, generator=generator)
        if text is None:
            text = torch.randn(batch, *self.config.text_shape, generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        if self.config.timestep_sampling == "uniform":
            s = torch.rand(batch, generator=generator)
        else:
            s = torch.sigmoid(torch.randn(batch, generator=generator))
        s = self.config.shift * s / (1 + (self.config.shift - 1) * s)
        s_b = s.view(-1, 1, 1, 1, 1)
        x_t = (1 - s_b) * x0 + s_b * noise
        return {
            "hidden_states": x_t.to(self.device, self.dtype),
            "timestep": (s * self.config.num_train_timesteps).to(self.device),
            "encoder_hidden_states": text.to(self.device, self.dtype),
            "return_dict": False,
        }
