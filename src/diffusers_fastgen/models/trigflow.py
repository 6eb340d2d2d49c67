"""The TrigFlow network F of any diffusers denoiser (sCM, Lu & Song arXiv:2410.11081 Sec. 2-3).

sCM writes the consistency function and the PF-ODE in TrigFlow time (t in [0, pi/2], t = 0 data):

    x_t = cos(t) x0 + sin(t) sigma_d eps,    dx_t/dt = sigma_d F(x_t / sigma_d, t),
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t)        (= the x0 prediction).

A model trained on another process (RF for the digits teacher, SD3, Flux, Wan; VP for SD1.5) is that
same F after a change of variables: the TrigFlow point (x_t, t) is the point (x_t * scale, t_src) of the
source path with the same noise ratio (`parametrization.change_process`), where the model predicts
(x0, eps); then F = cos(t) eps - sin(t) x0 / sigma_d. Every step is a differentiable function of
(x_t, t), so a JVP through `trigflow_network` is the JVP sCM needs, and the trained network stays a
stock diffusers model of its own process (its few-step sampler is saved in that process, see
`schedulers.recipes.scm_rf_scheduler`).
"""

from __future__ import annotations

import torch

from ..parametrization import TrigFlow, change_process, x0_eps_from_prediction


def trigflow_network(denoiser, cond, *, sigma_d: float):
    """F_fn(x_scaled, t) -> F (B, ...): the TrigFlow output of `denoiser` (a models.Denoiser) for
    x_scaled = x_t / sigma_d and TrigFlow time t (B,), with conditioning `cond`. Computed in fp32."""
    if sigma_d <= 0:
        raise ValueError(f"`sigma_d` must be > 0, got {sigma_d}.")
    trig = TrigFlow(sigma_data=sigma_d)

    def F_fn(x_scaled: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t = sigma_d * x_scaled
        # 1. The same point on the denoiser's own path (equal noise ratio sigma/alpha).
        x_src, t_src, _ = change_process(x_t, t, trig, denoiser.process)
        # 2. Its (x0, eps) prediction there.
        pred = denoiser(x_src, t_src, cond, target=denoiser.prediction_type)
        x0, eps = x0_eps_from_prediction(denoiser.process, pred, x_src, t_src, denoiser.prediction_type)
        # 3. F = dx_t/dt / sigma_d on the TrigFlow path.
        view = (-1,) + (1,) * (x_t.ndim - 1)
        t32 = t.float().view(view)
        return torch.cos(t32) * eps - torch.sin(t32) * x0 / sigma_d

    return F_fn

