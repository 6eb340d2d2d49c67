"""Discrete-time consistency losses: CM / iCT / ECT training (from data) and distillation.

A consistency function f(x_t, t) maps every point of a probability-flow ODE trajectory to its t = 0
end (Song et al. arXiv:2303.01469); with EDM's parametrization f = c_skip x_t + c_out F, so f(x, 0) = x
holds by construction — our `Denoiser(..., target="x0")` is that f for any process. Training pulls
f(x_t, t) towards the stop-gradient target f(x_r, r) at an earlier point r < t of the same trajectory:

  training (iCT arXiv:2310.14189, ECT arXiv:2406.14548): x_t = alpha_t x0 + sigma_t eps and
      x_r = alpha_r x0 + sigma_r eps with the same eps — a one-sample estimate of the ODE step;
  distillation: x_r = one teacher ODE step from x_t (`ddim_step` with the teacher's x0).

Loss (ECT eq. 4-5): w(t, r) d(f(x_t, t), sg f(x_r, r)), w = 1 / (t - r) and d the pseudo-Huber
distance sqrt(||a - b||^2 + c^2) - c (iCT: c = 0.00054 sqrt(D) for D elements per sample).
ECT shrinks t - r during training (`timesteps.sample_t_r_ect`). Time convention: t = 0 is data.

TCM (truncated consistency models, Lee et al. arXiv:2410.14895), stage 2: the network only learns
t >= t' (the boundary time); below t' the consistency function is the frozen stage-1 CM f_1. The
target at r is therefore f_1(x_r, r) when r < t' (the boundary loss: it pins the network to the
stage-1 model at the edge of its range and keeps it from collapsing to a trivial solution) and
sg f_theta(x_r, r) otherwise (the consistency loss). `tcm_loss` weights the boundary part by w_b.
"""

from __future__ import annotations

import math

import torch

from ..parametrization import Process, add_noise


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample (B,), L2 norm over all non-batch elements, at least fp32.
    c=None uses iCT's 0.00054 sqrt(D)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    d = (a.to(dtype) - b.to(dtype)).flatten(1)
    if c is None:
        c = 0.00054 * math.sqrt(d.shape[1])
    return (d.square().sum(1) + c * c).sqrt() - c


def consistency_pair(process: Process, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, r: torch.Tensor):
    """(x_t, x_r) on the same noise: consistency training's points (shapes (B, ...), t and r (B,))."""
    return add_noise(process, x0, eps, t), add_noise(process, x0, eps, r)


def ddim_step(process: Process, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """First-order PF-ODE step t -> r given an x0 prediction at (x_t, t): x_r = alpha_r x0 + sigma_r eps_hat,
    eps_hat = (x_t - alpha_t x0) / sigma_t (DDIM; equal to Euler for RF and EDM). Computed in fp32."""
    view = (-1,) + (1,) * (x_t.ndim - 1)
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    t, r = t.to(dtype).view(view), r.to(dtype).view(view)
    x_t, x0 = x_t.to(dtype), x0.to(dtype)
    eps_hat = (x_t - process.alpha(t) * x0) / process.sigma(t)
    return process.alpha(r) * x0 + process.sigma(r) * eps_hat


def consistency_loss(f_t: torch.Tensor, f_r: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *,
                     huber_c: float | None = None, gap: torch.Tensor | None = None) -> torch.Tensor:
    """ECT's per-sample loss  d(f_t, sg f_r) / gap  (B,), gap = t - r unless given (ECT takes it in the EDM
    noise ratio, sigma_t - sigma_r: `noise_ratio_gap`). f_t = f_theta(x_t, t) carries the graph; f_r =
    f_theta(x_r, r) (same network, run without grad or detached here) is the target. Needs r < t for every
    sample (the (t, r) samplers guarantee it; not checked here, which would sync the device)."""
    gap = (t - r) if gap is None else gap
    return pseudo_huber(f_t, f_r.detach(), huber_c) / gap.to(torch.promote_types(t.dtype, torch.float32))


def noise_ratio_gap(process, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """sigma(t)/alpha(t) - sigma(r)/alpha(r): ECT's t - r on the EDM noise-ratio axis, for any process
    (RF: t/(1-t) - r/(1-r); on a VP schedule it stays O(0.03) at the lowest times, where t - r in VP time can
    be 1e-5 and its inverse a weight of 1e5)."""
    def ratio(x):
        x64 = x.to(torch.float64)
        return process.sigma(x64).to(torch.float64) / process.alpha(x64).to(torch.float64)
    return (ratio(t) - ratio(r)).to(torch.promote_types(t.dtype, torch.float32))


def tcm_loss(f_t: torch.Tensor, f_r: torch.Tensor, f_r_stage1: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *,
             t_boundary: float, boundary_weight: float = 1.0, huber_c: float | None = None,
             gap: torch.Tensor | None = None) -> torch.Tensor:
    """TCM stage-2 per-sample loss (B,): w d(f_t, sg target) / (t - r) with
    target = f_r_stage1 (frozen stage-1 CM at (x_r, r)) where r < t_boundary, else f_r (the network
    itself at (x_r, r)); w = boundary_weight on the boundary samples, 1 elsewhere. t >= t_boundary > r
    for boundary samples, r < t always."""
    view = (-1,) + (1,) * (f_t.ndim - 1)
    below = r < t_boundary  # (B,) boundary samples
    target = torch.where(below.view(view), f_r_stage1, f_r).detach()
    weight = torch.where(below, boundary_weight, 1.0).to(torch.promote_types(t.dtype, torch.float32))
    return weight * consistency_loss(f_t, target, t, r, huber_c=huber_c, gap=gap)


TCM_REDUCTIONS = ("separate", "pooled")


def tcm_batch_loss(per_sample: torch.Tensor, below: torch.Tensor, *, boundary_weight: float,
                   reduction: str = "separate") -> torch.Tensor:
    """The batch loss of TCM stage 2 from the unweighted per-sample losses (`tcm_loss` with boundary_weight 1).

    reduction="separate" (TCM's): mean over the ordinary samples + boundary_weight x the mean over the boundary
      samples (r < t'), each mean over its own samples (an absent group adds 0);
    reduction="pooled" (this package's first version): one batch mean with weight boundary_weight on the
      boundary samples."""
    if reduction not in TCM_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {TCM_REDUCTIONS}, got {reduction!r}.")
    below = below.to(per_sample.dtype)
    if reduction == "pooled":
        return (per_sample * (1 + (boundary_weight - 1) * below)).mean()
    ordinary = 1 - below
    mean_ordinary = (per_sample * ordinary).sum() / ordinary.sum().clamp_min(1)
    mean_boundary = (per_sample * below).sum() / below.sum().clamp_min(1)
    return mean_ordinary + boundary_weight * mean_boundary
