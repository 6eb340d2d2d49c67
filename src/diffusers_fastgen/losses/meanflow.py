"""MeanFlow loss (Geng et al., "Mean Flows for One-step Generative Modeling", arXiv:2505.13447).

Time convention: rectified flow, t = 0 data, t = 1 noise, z_t = (1 - t) x + t eps, velocity
v = dz/dt (= eps - x conditionally on a data point).

The average velocity over [r, t] is u(z_t, r, t) = 1/(t - r) * integral_r^t v(z_tau, tau) dtau, so
(t - r) u = z_t - z_r and one step z_r = z_t - (t - r) u jumps along the ODE. Differentiating
(t - r) u(z_t, r, t) in t along the trajectory gives the MeanFlow identity (eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u,

whose right side, evaluated with the network and stop-gradient, is the regression target (eq. 9-10).
The total derivative is one JVP of u_theta along the tangent (dz, dr, dt) = (v, 0, 1).
"""

from __future__ import annotations

import torch

from ..jvp import jvp


def meanflow_target(u_fn, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, *,
                    jvp_method: str = "exact", eps: float = 3e-5, warmup: float = 1.0, t_max: float | None = None):
    """(u_theta(z_t, r, t), u_tgt) with u_tgt = sg[v - warmup (t - r) (v . d_z u + d_t u)] (eq. 10).

    u_fn(z, r, t) -> u: the network's average velocity (B, ...) for z (B, ...), r and t (B,).
    v: the velocity at (z_t, t) — eps - x for training from data, the (CFG) teacher's velocity for
    distillation. The JVP is exact (forward-mode AD) or a finite difference with step `eps` along the
    trajectory (z moves with v, r fixed): central where t - eps and t + eps both lie inside
    [max(r, 0), t_max], one-sided where one of them does not (forward from t when t - eps would cross below r
    or 0, backward to t when t + eps would pass t_max), as the reference implementation does, so the network
    is never evaluated outside that interval (t_max None: no upper bound). warmup in [0, 1] scales the
    derivative term (tangent warm-up, as in sCM: 0 is flow matching on v, 1 the MeanFlow target). u keeps its
    graph (it is the prediction); u_tgt is detached.
    """
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"`warmup` must be in [0, 1], got {warmup}.")
    view = (-1,) + (1,) * (z_t.ndim - 1)
    if jvp_method == "finite_difference":
        u = u_fn(z_t, r, t)
        low = torch.clamp(r, min=0.0)
        high = torch.full_like(t, float("inf") if t_max is None else t_max)
        room_below, room_above = t - eps >= low, t + eps <= high
        # both sides inside: central; one side: one-sided from / to t; neither: the widest stencil inside
        plus = torch.where(room_above, t + eps, torch.where(room_below, t, torch.minimum(high, t + eps)))
        minus = torch.where(room_below, t - eps, torch.where(room_above, t, torch.maximum(low, t - eps)))
        with torch.no_grad():
            u_plus = u_fn(z_t + (plus - t).view(view) * v, r, plus)
            u_minus = u_fn(z_t + (minus - t).view(view) * v, r, minus)
        wide = torch.promote_types(u_plus.dtype, torch.float32)  # fp32 at least; float64 stays float64
        width = (plus - minus).to(wide).clamp_min(torch.finfo(wide).tiny).view(view)  # r = t: 0 / tiny = 0
        dudt = (u_plus.to(wide) - u_minus.to(wide)) / width
    else:
        u, dudt = jvp(lambda z, tt: u_fn(z, r, tt), (z_t, t), (v, torch.ones_like(t)), method=jvp_method, eps=eps)
    u_tgt = v - warmup * (t - r).view(view) * dudt  # fp32 target; the tangent output carries no graph
    return u, u_tgt.detach()


def meanflow_loss(u_fn, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, *,
                  jvp_method: str = "exact", eps: float = 3e-5, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                  warmup: float = 1.0, t_max: float | None = None):
    """Per-sample MeanFlow loss  sg(w) * ||u_theta - u_tgt||^2  with the adaptive weight
    w = 1 / (||u_theta - u_tgt||^2 + c)^p (paper Sec. 4.3; p = 0 is the plain squared error, p = 1
    the paper's default, p = 0.5 a pseudo-Huber-like loss). The squared norm is the mean over
    elements per sample. Returns ((B,) loss, {"u_tgt", "mse"} detached diagnostics).
    """
    u, u_tgt = meanflow_target(u_fn, z_t, r, t, v, jvp_method=jvp_method, eps=eps, warmup=warmup, t_max=t_max)
    dtype = torch.promote_types(u.dtype, torch.float32)  # at least fp32 (bf16 autocast outputs)
    mse = (u.to(dtype) - u_tgt.to(dtype)).square().flatten(1).mean(1)  # (B,)
    weight = (mse.detach() + adaptive_c).pow(-adaptive_p)
    return weight * mse, {"u_tgt": u_tgt, "mse": mse.detach()}
