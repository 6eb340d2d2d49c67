"""The rectified-flow view of a denoiser trained on another process (MeanFlow on an SD1.5 / SDXL teacher).

MeanFlow (arXiv:2505.13447) is written on the straight path z_t = (1 - t) x0 + t eps. A VP model is that path
after a change of variables: the VP point x = a x0 + s eps and the RF point z = x / (a + s) share (x0, eps), at
t_rf = s / (a + s) (`parametrization.change_process`). So a VP eps-UNet u-parametrizes an RF model: at (z, t)
it is called at the VP point, its (x0, eps) are read off, and the RF prediction is built from them (the
velocity eps - x0). For a MeanFlow student the second time r goes through the same map.

Why this is the stock sampler: DDIM's step from timestep t to r, x0 = (x - s eps) / a then a_r x0 + s_r eps, is
in RF coordinates z_r = z_t - (t_rf - r_rf)(eps - x0). With the student's eps that is MeanFlow's jump
z_r = z_t - (t - r) u(z_t, r, t), so stock DDIMScheduler (trailing spacing, alpha 1 at the end) samples a
MeanFlow student exactly, given the interval (`models.interval.guidance_interval_embedding`).

The view is differentiable in (z, t) (the VP noise schedule is interpolated in log space), so MeanFlow's JVP
runs through it. An RF denoiser is its own view.
"""

from __future__ import annotations

import torch

from ..parametrization import (
    RectifiedFlow,
    change_process,
    prediction_from_x0_eps,
    x0_eps_from_prediction,
)


class FlowView:
    """A `models.Denoiser` seen on the rectified-flow path: `view(z, t, cond, target=..., r=...)` with RF times
    t, r in [0, process.t_max] (t_max < 1 for a VP schedule that stops short of pure noise: SD1.5's is 0.936)."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        source = denoiser.process
        self.process = RectifiedFlow(t_max=float(self.rf_time(float(source.t_max))))
        self.prediction_type = "flow"
        # RF time of the source's first noise level (timestep 0), where `interval_time` switches map; once, on the host
        self._tau0 = None if isinstance(source, RectifiedFlow) else float(self.rf_time(0.0))

    def rf_time(self, t_src) -> torch.Tensor:
        """The RF time with the noise ratio of the denoiser's own time t_src (float64)."""
        t_src = torch.as_tensor(t_src, dtype=torch.float64).reshape(-1)
        source = self.denoiser.process
        if isinstance(source, RectifiedFlow):
            return t_src
        return RectifiedFlow().t_from_noise_ratio(source.sigma(t_src) / source.alpha(t_src))

    @property
    def model(self):
        return self.denoiser.model

    @property
    def adapter(self):
        """The denoiser's LoRA adapter name (None for a full model): what the adversarial term re-activates."""
        return self.denoiser.adapter

    def source_time(self, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's own time with the noise ratio of RF time t (t = 0 stays 0)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        if isinstance(self.denoiser.process, RectifiedFlow):
            return t
        ratio = t / (1 - t)
        return self.denoiser.process.t_from_noise_ratio(ratio)

    def interval_time(self, r: torch.Tensor) -> torch.Tensor:
        """The denoiser time whose native timestep stands for RF time r in the interval input. Above the VP
        schedule's first noise level tau_0 (timestep 0; 0.028 for SD1.5) it is `source_time(r)`; on [0, tau_0]
        timesteps run linearly from -1 to 0, because DDIM (trailing spacing, alpha 1 at the end) lands on
        "timestep -1": its jumps 999 -> 499 -> -1 are then 500 timesteps each, as the stock call's constant
        interval embedding says (`interval_guidance_scale`)."""
        source = self.denoiser.process
        if isinstance(source, RectifiedFlow):
            return r
        steps, tau0 = source.num_train_timesteps - 1, self._tau0
        above = self.source_time(r.clamp(min=tau0))
        return torch.where(r >= tau0, above, (r / tau0 - 1) / steps)

    def __call__(self, z: torch.Tensor, t, cond: dict | None = None, *, target: str = "flow", r=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        source, native = self.denoiser.process, self.denoiser.prediction_type
        x, t_src, _ = change_process(z, t, self.process, source)
        r_src = None
        if r is not None:
            r_src = self.interval_time(torch.as_tensor(r, device=z.device, dtype=torch.float32).expand_as(t))
        pred = self.denoiser(x, t_src, cond, target=native, r=r_src)
        x0, eps = x0_eps_from_prediction(source, pred, x, t_src, native)  # shared by both paths
        return prediction_from_x0_eps(self.process, x0, eps, t, target).to(z.dtype)
