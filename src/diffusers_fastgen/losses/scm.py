"""Continuous-time consistency loss of sCM (Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", arXiv:2410.11081, Alg. 1).

TrigFlow: x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I), t in [0, pi/2] (t = 0 data). The
consistency function is f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, t). Along the
PF-ODE, f must stay constant; with F^- = sg(F_theta) the loss

    || F_theta - F^- - g ||^2,   g = -cos^2(t) (sigma_d F^- - dx_t/dt) - cos(t) sin(t) (x_t + sigma_d dF^-/dt)

has gradient -2 g . dF_theta/dtheta, and g = cos(t) df^-/dt: the continuous-time consistency
gradient (eq. 8). dF^-/dt is one JVP of F along the tangent (dx_t/dt / sigma_d, 1), taken here with
the tangent scaled by cos(t) sin(t) as in Alg. 1 (the product is what enters g). dx_t/dt is the
PF-ODE velocity: cos(t) z - sin(t) x0 for sCT (from data), sigma_d F_teacher(x_t / sigma_d, t) for sCD
(from a pretrained TrigFlow teacher, with CFG if wanted). Stabilisers: tangent warm-up (the second
term of g scaled by `warmup` from 0 to 1), tangent normalisation g / (||g||_RMS + c) (the RMS over
elements, as the reference implementation: c then means the same for any latent size), the prior weight
1 / (sigma_d tan t), and an adaptive weight e^(-logvar(t)) with a learned log-variance added to the loss.
"""

from __future__ import annotations

import torch

from ..jvp import jvp

TANGENT_NORMS = ("rms", "l2")


def scm_loss(F_fn, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, *, sigma_d: float,
             warmup: float = 1.0, tangent_c: float = 0.1, logvar: torch.Tensor | None = None,
             jvp_method: str = "exact", eps: float = 3e-5, tangent_norm: str = "rms", prior_weight: bool = True,
             t_range: tuple[float, float] | None = None):
    """Per-sample sCM loss (B,) and detached diagnostics {"g" (unnormalised), "mse"}.

    F_fn(x_scaled, t) -> F: the network's TrigFlow output for x_t / sigma_d, t (B,) in radians.
    dxt_dt: the PF-ODE velocity at (x_t, t) (see module doc), (B, ...), no graph needed.
    logvar: (B,) learned log-variance (adaptive weighting) or None.
    loss = w mse e^(-logvar) + logvar (w mse without logvar), w = 1 / (sigma_d tan t) with `prior_weight`
    (else 1). warmup in [0, 1]; tangent_c > 0 (0 disables normalisation) with `tangent_norm` "rms"
    (g / (sqrt(mean g^2) + c), the reference's) or "l2" (g / (||g||_2 + c), ours before).
    eps: the finite-difference step along the scaled tangent, so the stencil spans t +- eps cos t sin t: a
    small eps is the derivative, a large one (0.1 - 0.3) a secant over the network's fine-scale roughness in t.
    t_range (low, high): TrigFlow times the network is defined on (a VP teacher's schedule ends inside
    (0, pi/2)); where the stencil would leave it, that sample's step shrinks to fit (at least 3e-5).
    """
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"`warmup` must be in [0, 1], got {warmup}.")
    if tangent_norm not in TANGENT_NORMS:
        raise ValueError(f"`tangent_norm` must be one of {TANGENT_NORMS}, got {tangent_norm!r}.")
    view = (-1,) + (1,) * (x_t.ndim - 1)
    cos, sin = torch.cos(t).view(view), torch.sin(t).view(view)
    # 1. F_theta and cos(t) sin(t) dF^-/dt in one JVP (tangent scaled as in Alg. 1). A finite difference whose
    #    stencil would leave t_range takes a shorter step there: the tangent times m <= 1, the result / m.
    m = torch.ones_like(t)
    if jvp_method == "finite_difference" and t_range is not None:
        half = eps * torch.cos(t) * torch.sin(t)
        room = torch.minimum(t - t_range[0], t_range[1] - t)
        m = (room / half).clamp(min=3e-5 / eps, max=1.0)
    F, dF = jvp(F_fn, (x_t / sigma_d, t), (m.view(view) * cos * sin * dxt_dt / sigma_d, m * torch.cos(t) * torch.sin(t)),
                method=jvp_method, eps=eps)
    F_minus, dF = F.detach(), (dF / m.view(view)).detach()
    # 2. The tangent g = cos(t) df^-/dt, fp32 (at least), stop-gradient throughout.
    dtype = torch.promote_types(F.dtype, torch.float32)
    g = -cos**2 * (sigma_d * F_minus.to(dtype) - dxt_dt.to(dtype)) - warmup * (cos * sin * x_t.to(dtype) + sigma_d * dF.to(dtype))
    # 3. Tangent normalisation.
    if tangent_c > 0:
        size = g.flatten(1).norm(dim=1)
        if tangent_norm == "rms":
            size = size / g[0].numel() ** 0.5
        g_used = g / (size.view(view) + tangent_c)
    else:
        g_used = g
    # 4. Regression of F_theta onto F^- + g, prior-weighted, with optional adaptive weight.
    mse = (F.to(dtype) - F_minus.to(dtype) - g_used).square().flatten(1).mean(1)
    weighted = mse / (sigma_d * torch.tan(t.to(dtype))) if prior_weight else mse
    loss = weighted if logvar is None else weighted * torch.exp(-logvar.float()) + logvar.float()
    return loss, {"g": g.detach(), "mse": mse.detach()}
