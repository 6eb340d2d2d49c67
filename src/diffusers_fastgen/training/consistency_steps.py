"""One step function per consistency-family method, shared by `train_cm`, `train_tcm`, `train_scm` and
`train_meanflow`. Each builds its inputs from a batch of real data (x0, eps, cond), runs the student
(and, for distillation, the frozen teacher) and returns the scalar loss plus detached diagnostics;
the script owns backward and the optimizer (`training.update`).

Training from data vs distillation is one argument: `teacher=None` takes the ODE information from
the data pair (x0, eps) (consistency training, sCT, MeanFlow from data), a teacher Denoiser takes it
from the teacher's (CFG) prediction (consistency distillation, sCD, MeanFlow distillation).
Time convention everywhere: t = 0 is data; CM/TCM/MeanFlow times are the student's own process
(RF for the digits teacher), sCM times are TrigFlow radians.
"""

from __future__ import annotations

import torch

from ..guidance import guided_prediction
from ..losses.consistency import consistency_loss, ddim_step, noise_ratio_gap, tcm_batch_loss, tcm_loss
from ..losses.meanflow import meanflow_loss
from ..losses.scm import scm_loss
from ..models.trigflow import trigflow_network
from ..parametrization import RectifiedFlow, add_noise

SOURCES = ("teacher", "data")  # where a script's ODE information comes from: distillation / training from data


def _ode_point(student, teacher, x0, eps, x_t, t, r, cond, uncond, guidance_scale):
    """x_r: the same-noise point (training) or one teacher DDIM step t -> r (distillation), no grad."""
    if teacher is None:
        return add_noise(student.process, x0, eps, r)
    x0_teacher = guided_prediction(teacher, x_t, t, cond, uncond, guidance_scale)
    return ddim_step(student.process, x_t, x0_teacher, t, r).to(x_t.dtype)


def cm_step(student, x0, eps, t, r, cond, *, teacher=None, uncond=None, guidance_scale: float = 1.0,
            huber_c: float | None = None):
    """ECT / consistency distillation: d(f(x_t, t), sg f(x_r, r)) / (sigma_t - sigma_r) (ECT's weight, in the EDM
    noise ratio sigma = sigma(t) / alpha(t) of the process), f = student's x0.

    Network evaluations: student fwd (no grad) at r, student fwd + bwd at t; distillation: + teacher fwd
    (one 2B call with CFG)."""
    x_t = add_noise(student.process, x0, eps, t)
    with torch.no_grad():
        x_r = _ode_point(student, teacher, x0, eps, x_t, t, r, cond, uncond, guidance_scale)
        f_r = student(x_r, r, cond)
        # r = 0 (ECT's mapping clamps there): the consistency function is the identity, so the target is the point
        # itself -- the data (consistency training) or the teacher's ODE end point (distillation).
        at_zero = (r == 0).view((-1,) + (1,) * (x0.ndim - 1))
        f_r = torch.where(at_zero, x0 if teacher is None else x_r, f_r)
    f_t = student(x_t, t, cond)
    gap = noise_ratio_gap(student.process, t, r)  # ECT's weight 1 / (sigma_t - sigma_r), in the noise ratio
    return consistency_loss(f_t, f_r, t, r, huber_c=huber_c, gap=gap).mean(), {}


def tcm_step(student, stage1, x0, eps, t, r, cond, *, t_boundary: float, boundary_weight: float,
             teacher=None, uncond=None, guidance_scale: float = 1.0, huber_c: float | None = None,
             reduction: str = "separate"):
    """TCM stage 2: like `cm_step` on t >= t_boundary, with the frozen stage-1 CM as the target where
    r < t_boundary (losses.consistency.tcm_loss). Both targets are computed for the whole batch (one
    batched call each, no data-dependent branching or host sync).

    Network evaluations: student fwd (no grad), stage-1 fwd (no grad), student fwd + bwd; distillation:
    + teacher fwd."""
    x_t = add_noise(student.process, x0, eps, t)
    with torch.no_grad():
        x_r = _ode_point(student, teacher, x0, eps, x_t, t, r, cond, uncond, guidance_scale)
        f_r, f_r_stage1 = student(x_r, r, cond), stage1(x_r, r, cond)
    f_t = student(x_t, t, cond)
    per_sample = tcm_loss(f_t, f_r, f_r_stage1, t, r, t_boundary=t_boundary, boundary_weight=1.0, huber_c=huber_c,
                          gap=noise_ratio_gap(student.process, t, r))
    loss = tcm_batch_loss(per_sample, r < t_boundary, boundary_weight=boundary_weight, reduction=reduction)
    return loss, {"boundary_fraction": (r < t_boundary).float().mean()}


def scm_step(student, x0, eps, t, cond, *, sigma_d: float, teacher=None, uncond=None, guidance_scale: float = 1.0,
             warmup: float = 1.0, tangent_c: float = 0.1, logvar_head=None, jvp_method: str = "exact",
             tangent_norm: str = "rms", prior_weight: bool = True, fd_eps: float = 3e-5,
             t_range: tuple[float, float] | None = None):
    """sCT / sCD (arXiv:2410.11081 Alg. 1) on the TrigFlow view of the student (models.trigflow).

    x_t = cos(t) x0 + sin(t) sigma_d eps; dx_t/dt = cos(t) sigma_d eps - sin(t) x0 (sCT) or the teacher's
    sigma_d F (sCD, CFG on F). t_range: the student's TrigFlow times (`timesteps.trigflow_time_range`, computed
    once by the caller), which the finite-difference stencil stays inside. Network evaluations: student JVP
    (primal with graph) + bwd; sCD: + teacher fwd."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    cos, sin = torch.cos(t).view(view), torch.sin(t).view(view)
    z = sigma_d * eps
    x_t = cos * x0 + sin * z
    with torch.no_grad():
        if teacher is None:
            dxt_dt = cos * z - sin * x0
        else:  # CFG on F, cond and uncond in one batched call
            def teacher_F(x_scaled, t_, c):
                return trigflow_network(teacher, c, sigma_d=sigma_d)(x_scaled, t_)
            dxt_dt = sigma_d * guided_prediction(teacher_F, x_t / sigma_d, t, cond, uncond, guidance_scale)
    logvar = logvar_head(t) if logvar_head is not None else None
    loss, diag = scm_loss(trigflow_network(student, cond, sigma_d=sigma_d), x_t, t, dxt_dt, sigma_d=sigma_d,
                          warmup=warmup, tangent_c=tangent_c, logvar=logvar, jvp_method=jvp_method, eps=fd_eps,
                          tangent_norm=tangent_norm, prior_weight=prior_weight,
                          t_range=t_range)
    return loss.mean(), {"mse": diag["mse"].mean()}


def meanflow_step(student, x0, eps, t, r, cond, *, teacher=None, uncond=None, guidance_scale: float = 1.0,
                  jvp_method: str = "exact", fd_eps: float = 3e-5, adaptive_p: float = 1.0, warmup: float = 1.0):
    """MeanFlow (arXiv:2505.13447 Alg. 1): u_theta(z_t, r, t) regressed on v - (t - r) du/dt, v = eps - x0
    (from data) or the teacher's CFG velocity (distillation). The student is an RF flow model with the
    interval input (models.interval). warmup scales the derivative term (tangent warm-up); the finite-
    difference stencil stays inside t <= t_max. Network evaluations: student JVP + bwd; distillation:
    + teacher fwd."""
    if not isinstance(student.process, RectifiedFlow):
        raise ValueError(f"MeanFlow is defined on the rectified-flow path; the student's process is "
                         f"{type(student.process).__name__}.")
    z_t = add_noise(student.process, x0, eps, t)
    if teacher is None:
        v = eps - x0
    else:
        with torch.no_grad():
            v = guided_prediction(teacher, z_t, t, cond, uncond, guidance_scale, target="flow")

    def u_fn(z, r_, t_):
        return student(z, t_, cond, target="flow", r=r_)

    loss, diag = meanflow_loss(u_fn, z_t, r, t, v, jvp_method=jvp_method, eps=fd_eps, adaptive_p=adaptive_p,
                               warmup=warmup, t_max=student.process.t_max)
    return loss.mean(), {"mse": diag["mse"].mean()}
