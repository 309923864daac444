"""Sampling from a rectified-flow video transformer with classifier-free guidance.

Euler steps of diffusers' FlowMatchEulerDiscreteScheduler (sigma from 1 to 0, x <- x + (sigma_next -
sigma)·v), with the guided velocity

    v = v_uncond + guidance_scale · (v_cond - v_uncond),

where v_uncond is the transformer's output for the all-zero condition. Conditional and unconditional
inputs go through the transformer as one batch of 2B (unconditional first), so a compressed student
sees exactly the calls the teacher saw. Any callable with diffusers' transformer signature works:

    transformer(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from graphopt.errors import GraphoptError


def initial_noise(batch_size: int, video_shape: tuple[int, int, int, int], seed: int) -> torch.Tensor:
    """(B, C, F, H, W) standard normal float32, drawn on the CPU so that it is the same on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *video_shape), generator=gen)


@torch.no_grad()
def sample(
    transformer: Callable,
    encoder_hidden_states: torch.Tensor,
    *,
    video_shape: tuple[int, int, int, int] = (3, 8, 16, 16),
    seed: int = 0,
    num_steps: int = 20,
    guidance_scale: float = 4.0,
    shift: float = 1.0,
    noise: torch.Tensor | None = None,
    step_callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Generate clips (B, C, F, H, W) clamped to [-1, 1], one per row of `encoder_hidden_states`.

    The start noise is `initial_noise(B, video_shape, seed)` unless `noise` is given. With
    guidance_scale == 1 the unconditional branch is skipped (v = v_cond) and each step is one call of
    batch B. `step_callback(step_index, timestep)` runs after every transformer call, so a caller can
    record per-step compute (a router's decisions, say). Runs on the device and in the dtype of
    `encoder_hidden_states`.
    """
    if encoder_hidden_states.ndim != 3:
        raise GraphoptError(
            f"encoder_hidden_states of shape {tuple(encoder_hidden_states.shape)}: expected (batch, tokens, text_dim)"
        )
    if num_steps < 1:
        raise GraphoptError(f"num_steps={num_steps}: must be at least 1")
    if guidance_scale < 1.0:
        raise GraphoptError(f"guidance_scale={guidance_scale}: use 1 (no guidance) or more")
    batch = encoder_hidden_states.shape[0]
    device, dtype = encoder_hidden_states.device, encoder_hidden_states.dtype
    if noise is None:
        noise = initial_noise(batch, video_shape, seed)
    elif noise.shape[0] != batch:
        raise GraphoptError(f"noise has batch {noise.shape[0]} but encoder_hidden_states has {batch}: "
                            f"give one per clip")
    latents = noise.to(device=device, dtype=torch.float32)

    guided = guidance_scale != 1.0
    cond = (torch.cat([torch.zeros_like(encoder_hidden_states), encoder_hidden_states]) if guided
            else encoder_hidden_states)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps, device=device)
    for index, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([latents, latents]) if guided else latents
        timestep = t.expand(model_in.shape[0])
        velocity = transformer(
            hidden_states=model_in.to(dtype), timestep=timestep, encoder_hidden_states=cond, return_dict=False
        )[0].float()
        if guided:
            v_uncond, v_cond = velocity.chunk(2)
            velocity = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if step_callback is not None:
            step_callback(index, t)
    return latents.clamp(-1.0, 1.0)
