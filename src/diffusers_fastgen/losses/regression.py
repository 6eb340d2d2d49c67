"""Knowledge distillation by regression onto teacher ODE endpoints."""

from __future__ import annotations

import torch


def kd_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample  mean || x0_student(x_t_i, t_i) - ODE_teacher(x_t_i -> 0) ||^2  (B,).

    Knowledge distillation of Luhman & Luhman (arXiv:2101.02388): the student maps a point x_t_i of
    the teacher's probability-flow ODE trajectory (noise at t_0 = 1, or an intermediate point for a
    multi-step student) to the trajectory's endpoint computed by a many-step teacher solver. The
    target is data (no gradient), fp32.
    """
    return (x0_student.float() - x0_teacher.detach().float()).square().flatten(1).mean(1)
