"""A second time input r for flow-map / MeanFlow students (u(z_t, r, t)), added to a stock diffusers
UNet2DConditionModel without forking it.

UNet2DConditionModel already has a vector condition on its time embedding: with config
`time_cond_proj_dim = d`, `time_embedding.cond_proj` (Linear(d -> C), no bias) maps `timestep_cond`
(B, d) and adds it to the sinusoidal timestep projection before the time MLP (LCM uses it for the
guidance scale). `add_interval_input` turns a trained model into that configuration with cond_proj
zero-initialised, so the student starts as exactly the teacher for every r; `Denoiser(..., r=r)`
feeds Fourier features of the interval (timestep(t) - timestep(r)) / 1000 as `timestep_cond`.
The student remains a stock UNet2DConditionModel: `save_pretrained` / `from_pretrained` need no
custom code, and the teacher's weights load into it unchanged (only cond_proj is new).

Two embeddings of the interval: `interval_embedding` (Fourier features, our DigitsPipeline feeds them) and
`guidance_interval_embedding`, the one stock StableDiffusion(XL)Pipeline computes by itself for a UNet with
time_cond_proj_dim: its LCM guidance-scale embedding of w = guidance_scale - 1. A student trained on it with
w = INTERVAL_GUIDANCE_SCALE x interval samples N equal jumps through the stock call with
`guidance_scale=interval_guidance_scale(N)` (the pipeline then runs no CFG: it is folded into the student).
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel


def add_interval_input(unet: UNet2DConditionModel, dim: int = 256) -> UNet2DConditionModel:
    """A copy of `unet` with `time_cond_proj_dim=dim` and a zero `time_embedding.cond_proj`."""
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"`unet` must be a UNet2DConditionModel, got {type(unet).__name__}.")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"`unet` already has time_cond_proj_dim={unet.config.time_cond_proj_dim}.")
    if dim < 2 or dim % 2:
        raise ValueError(f"`dim` must be an even number >= 2, got {dim}.")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    student = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if missing != ["time_embedding.cond_proj.weight"] or unexpected:
        raise RuntimeError(f"unexpected state-dict difference: missing {missing}, unexpected {unexpected}.")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(device=unet.device, dtype=unet.dtype)


# Native timesteps of diffusers models span 0..1000; the interval is embedded in units of that range.
INTERVAL_TIMESTEP_RANGE = 1000.0
INTERVAL_MIN_FREQUENCY, INTERVAL_MAX_FREQUENCY = 0.5, 8.0  # radians per unit of d


def interval_embedding(timestep_t: torch.Tensor, timestep_r: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) Fourier features [cos(w_k d), sin(w_k d)] of the interval d = (timestep_t - timestep_r) / 1000
    in [0, 1], with dim / 2 frequencies w_k geometric in [0.5, 8] radians per unit, computed in fp32.

    Not the UNet's sinusoidal timestep projection: its frequencies reach 1000 radians per unit of d (one
    per native timestep), and once cond_proj leaves zero those features make u(z, r, t) oscillate in t —
    MeanFlow's target v - (t - r) du/dt differentiates u in t and blows up (seen on the digits teacher:
    the per-sample squared error of the target grew from ~0.6 to 20-300 within 300 steps). With
    w_k <= 8 every feature's derivative is bounded by 8 per unit of d."""
    if dim < 2 or dim % 2:
        raise ValueError(f"`dim` must be an even number >= 2, got {dim}.")
    delta = ((timestep_t - timestep_r).float() / INTERVAL_TIMESTEP_RANGE)[:, None]  # (B, 1)
    freqs = torch.logspace(math.log10(INTERVAL_MIN_FREQUENCY), math.log10(INTERVAL_MAX_FREQUENCY), dim // 2,
                           device=delta.device)
    return torch.cat([torch.cos(freqs * delta), torch.sin(freqs * delta)], dim=1)


# w = INTERVAL_GUIDANCE_SCALE * interval: the stock embedding multiplies w by 1000 and its fastest feature turns
# one radian per unit of that, so the interval's features turn at most 10 radians per unit (as the bound above).
INTERVAL_GUIDANCE_SCALE = 0.01


def guidance_interval_embedding(timestep_t: torch.Tensor, timestep_r: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) the guidance-scale embedding StableDiffusionPipeline feeds as `timestep_cond` (sin of w * 1000 *
    f_k, then cos; f_k = 10000^(-k / (dim/2 - 1))), for w = INTERVAL_GUIDANCE_SCALE * (timestep_t - timestep_r) /
    1000: the stock call's `guidance_scale` is then 1 + w (`interval_guidance_scale`)."""
    if dim < 4 or dim % 2:
        raise ValueError(f"`dim` must be an even number >= 4, got {dim}.")
    w = INTERVAL_GUIDANCE_SCALE * (timestep_t - timestep_r).float() / INTERVAL_TIMESTEP_RANGE * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def interval_guidance_scale(num_steps: int) -> float:
    """The stock call's `guidance_scale` for a student trained on `guidance_interval_embedding` sampled in
    `num_steps` equal jumps over the whole timestep range (DDIM trailing spacing: 1000 / num_steps timesteps each)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"`num_steps` must be an int >= 1, got {num_steps!r}.")
    return 1.0 + INTERVAL_GUIDANCE_SCALE / num_steps
