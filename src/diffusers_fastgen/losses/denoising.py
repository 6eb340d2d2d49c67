"""Denoising (diffusion / flow-matching) loss — SFT and the fake score of distribution matching."""

from __future__ import annotations

import torch

from ..parametrization import Process, prediction_from_x0_eps


def denoising_loss(prediction: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, *,
                   process: Process, prediction_type: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample  w(t) * mean || F(x_t, t) - target ||^2  with target the true `prediction_type`
    quantity of (x0, eps) at t: flow u = alpha' x0 + sigma' eps (eps - x0 for RF: rectified flow,
    Liu et al. arXiv:2209.03003; SD3 arXiv:2403.03206), eps (DDPM, Ho et al. 2020), v (arXiv:2202.00512)
    or x0. Computed in fp32. Shapes: prediction/x0/eps (B, ...), t (B,), weight (B,) or None -> (B,).
    """
    target = prediction_from_x0_eps(process, x0, eps, t, prediction_type)
    loss = (prediction.float() - target).square().flatten(1).mean(1)
    return loss if weight is None else weight.float() * loss
