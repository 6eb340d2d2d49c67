"""A second time input r for flow-map / MeanFlow students (u(z_t, r, t)), added to a stock diffusers
UNet2DConditionModel without forking it.

UNet2DConditionModel already has a vector condition on its time embedding: with config
`time_cond_proj_dim = d`, `time_embedding.cond_proj` (Linear(d -> C), no bias) maps `timestep_cond`
(B, d) and adds it to the sinusoidal timestep projection before the time MLP (LCM uses it for the
guidance scale). `add_interval_input` turns a trained model into that configuration with cond_proj
zero-initialised, so the student starts as exactly the teacher for every r; `Denoiser(..., r=r)`
feeds the sinusoidal embedding of the native interval timestep(t) - timestep(r) as `timestep_cond`.
The student remains a stock UNet2DConditionModel: `save_pretrained` / `from_pretrained` need no
custom code, and the teacher's weights load into it unchanged (only cond_proj is new).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding


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


def interval_embedding(timestep_t: torch.Tensor, timestep_r: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of the native interval timestep_t - timestep_r (0 when r = t), with
    the frequencies of the UNet's own timestep projection (pass its flip_sin_to_cos / freq_shift)."""
    return get_timestep_embedding(timestep_t - timestep_r, dim, flip_sin_to_cos=flip_sin_to_cos,
                                  downscale_freq_shift=freq_shift)
