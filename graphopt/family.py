"""One model family's adapter: the `Family` record and the mechanism every entry of the table in
`graphopt.families` shares.

An entry declares what differs between families (the forward kwargs, how the config sets the patch
size, which attention holds what); this module turns that into example inputs, the token grid and
the sequence layouts of `graphopt.layout`.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import diffusers
import torch
from torch import nn

from graphopt.errors import GraphoptError
from graphopt.layout import AttentionLayout, BlockLayout, InputSpec, SequenceLayout

SEED = 0
Tokens = tuple[int, int, int]  # the video-token grid after patchify: (frames, height, width)


class Sampler:
    """Random inputs from a fixed seed, created on the CPU and moved to the spec's device and dtype."""

    def __init__(self, spec: InputSpec):
        self.spec = spec
        self.generator = torch.Generator().manual_seed(SEED)

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


def _unchanged(model: nn.Module, spec: InputSpec) -> nn.Module:
    return model


@dataclass(frozen=True, eq=False)
class Family:
    """One model family: the diffusers classes it covers and everything graphopt must be told about them.

    `patch_size(config)` gives the (frames, height, width) patch size and `make_inputs(config, spec,
    sample, tokens)` the forward kwargs for `spec`-sized inputs (drawn from `sample`, a seeded
    Sampler; `return_dict` is added); both get the config completed with the class's defaults.
    `prepare_for_export(model, spec)` fixes a model in place so that torch.export of a forward on
    `spec`-sized inputs succeeds, without changing any output.
    """

    name: str
    class_names: tuple[str, ...]
    tiny_config: Mapping[str, Any]
    default_spec: InputSpec
    latent_layout: str  # axes of the latent input and of the output: "BCFHW", "BFCHW", "BCHW", or "BNC" (packed tokens)
    text_inputs: tuple[str, ...]  # kwargs computed from the prompt (states, masks, pooled states)
    patch_size: Callable[[Mapping[str, Any]], Tokens]
    make_inputs: Callable[[Mapping[str, Any], InputSpec, Sampler, Tokens], dict[str, Any]]
    attentions: tuple[AttentionLayout, ...]
    blocks: tuple[BlockLayout, ...]
    latent_input: str = "hidden_states"
    timestep_input: str = "timestep"
    prepare_for_export: Callable[[nn.Module, InputSpec], nn.Module] = field(default=_unchanged)
    # Each ModuleList of blocks → the config key that sets its length, so that a checkpoint with
    # blocks dropped still has a diffusers config (`graphopt apply`); without it graphopt's format.
    block_counts: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def token_layout(self, config: Mapping[str, Any], spec: InputSpec) -> Tokens:
        """The video-token grid after patchify of a `spec`-sized latent (a GraphoptError if it does not divide)."""
        if self.latent_layout == "BCHW" and spec.frames != 1:
            raise GraphoptError(f"{self.class_names[0]} is an image model: InputSpec.frames must be 1, "
                                f"got {spec.frames}")
        return _patchify(spec, *self.patch_size(_complete(self.class_names[0], config)))

    def example_inputs(self, config: Mapping[str, Any], spec: InputSpec) -> dict[str, Any]:
        """Forward kwargs for a latent video of size `spec`, shaped the way the family's diffusers
        pipeline calls the model, from a fixed seed (always `return_dict=False`)."""
        config = _complete(self.class_names[0], config)
        kwargs = self.make_inputs(config, spec, Sampler(spec), self.token_layout(config, spec))
        return {**kwargs, "return_dict": False}

    def attention_layout(self, module_path: str) -> AttentionLayout:
        """The first entry of `attentions` whose regex fully matches `module_path`."""
        return _first_match(self.attentions, module_path, f"{self.name} attention")

    def sequence_layouts(
        self, module_path: str, config: Mapping[str, Any], spec: InputSpec
    ) -> tuple[SequenceLayout, SequenceLayout]:
        """(query, key/value) layouts of the attention at `module_path` for `spec`-sized inputs."""
        return self.attention_layout(module_path).resolve(self.token_layout(config, spec), spec)

    def block_stream(self, module_path: str, config: Mapping[str, Any], spec: InputSpec) -> SequenceLayout:
        """Layout of the residual stream leaving the block at `module_path` for `spec`-sized inputs."""
        block = _first_match(self.blocks, module_path, f"{self.name} block")
        return block.resolve(self.token_layout(config, spec), spec)


def _first_match(entries, module_path: str, what: str):
    for entry in entries:
        if re.fullmatch(entry.path, module_path):
            return entry
    known = ", ".join(entry.path for entry in entries)
    raise GraphoptError(f"no {what} layout matches module path {module_path!r}; known patterns: {known}")


def _complete(class_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` over the class constructor's defaults, without diffusers' private "_..." keys."""
    parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


def _patchify(spec: InputSpec, patch_t: int, patch_h: int, patch_w: int) -> Tokens:
    axes = (("frames", spec.frames, patch_t), ("height", spec.height, patch_h), ("width", spec.width, patch_w))
    for axis, size, patch in axes:
        if size % patch:
            raise GraphoptError(
                f"latent {axis} {size} is not a multiple of the model's patch size {patch} along it: "
                f"pick a latent {axis} divisible by {patch}"
            )
    return spec.frames // patch_t, spec.height // patch_h, spec.width // patch_w
