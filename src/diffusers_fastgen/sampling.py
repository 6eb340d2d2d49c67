"""Reference few-step samplers used at training time (backward simulation, validation).

Same signature family as k-diffusion: `(denoise, x, t_list, ...)` where `denoise(x_t, t) -> x0` and
`t_list` is the student's schedule, decreasing and ending at 0, e.g. [0.999, 0.833, 0.0].
The stock diffusers schedulers configured in `diffusers_fastgen.schedulers` reproduce these step
for step (tests/schedulers); the training scripts and the saved pipelines therefore agree.
"""

from __future__ import annotations

import torch

from .parametrization import Process, _as_time


def check_t_list(t_list, *, t_max: float | None = None) -> torch.Tensor:
    """Validate a student schedule: 1-D, strictly decreasing, last entry 0."""
    t = torch.as_tensor(t_list, dtype=torch.float32)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(f"`t_list` must have at least 2 entries (start ... 0), got {list(t_list)!r}.")
    if float(t[-1]) != 0.0:
        raise ValueError(f"`t_list` must end at 0 (clean data), got {list(t_list)!r}.")
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"`t_list` must be strictly decreasing, got {list(t_list)!r}.")
    if t_max is not None and float(t[0]) > t_max + 1e-6:
        raise ValueError(f"`t_list` starts at {float(t[0])} > the process' t_max={t_max}.")
    return t


@torch.no_grad()
def sample_multistep(denoise, x: torch.Tensor, t_list, *, process: Process, stochastic: bool = True,
                     generator: torch.Generator | None = None, callback=None) -> torch.Tensor:
    """Multistep x0-prediction sampler of consistency models / DMD students.

    For i = 0..N-1:  x0 = denoise(x, t_i);  x = alpha(t_{i+1}) x0 + sigma(t_{i+1}) eps_{i+1},
    with eps fresh N(0, I) noise (stochastic=True: CM multistep sampling, Song et al. 2023 Alg. 1;
    FastGen's SDE mode) or the eps implied by (x, x0) (stochastic=False: deterministic; for RF this is
    exactly an Euler step of the flow). The last step returns x0. `x` is the initial latent at t_0
    (the caller scales it, e.g. sigma_d * noise for TrigFlow).
    """
    t_list = check_t_list(t_list)
    for i in range(len(t_list) - 1):
        t, t_next = t_list[i], t_list[i + 1]
        t_batch = t.expand(x.shape[0]).to(x.device)
        x0 = denoise(x, t_batch)
        if callback is not None:
            callback(i, t, x, x0)
        if t_next == 0:
            x = x0
            break
        if stochastic:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        else:
            a, s = process.alpha(_as_time(t, x)), process.sigma(_as_time(t, x))
            eps = (x.float() - a * x0.float()) / s
        tn = _as_time(t_next, x).to(x.device)
        x = (process.alpha(tn) * x0.float() + process.sigma(tn) * eps.float()).to(x.dtype)
    return x


@torch.no_grad()
def sample_meanflow(average_velocity, x: torch.Tensor, t_list) -> torch.Tensor:
    """MeanFlow few-step sampler (Geng et al. arXiv:2505.13447 eq. 12) on the RF path:
    z_r = z_t - (t - r) u(z_t, r, t), with `average_velocity(z_t, r, t)` the model's u."""
    t_list = check_t_list(t_list)
    for i in range(len(t_list) - 1):
        t, r = t_list[i], t_list[i + 1]
        u = average_velocity(x, r.expand(x.shape[0]), t.expand(x.shape[0]))
        x = (x.float() - (t - r) * u.float()).to(x.dtype)
    return x


@torch.no_grad()
def teacher_ode_states(velocity, noise: torch.Tensor, t_list, *, steps_per_segment: int) -> list[torch.Tensor]:
    """Euler solve of the RF probability-flow ODE dx/dt = v(x, t) from x(t_0) = noise through every
    point of `t_list` (each interval split into `steps_per_segment` uniform Euler steps).

    Returns [x(t_0), x(t_1), ..., x(0)]: the inputs of a multi-step KD student and the final target.
    """
    t_list = check_t_list(t_list)
    if steps_per_segment < 1:
        raise ValueError(f"`steps_per_segment` must be >= 1, got {steps_per_segment}.")
    x, states = noise, [noise]
    for i in range(len(t_list) - 1):
        grid = torch.linspace(float(t_list[i]), float(t_list[i + 1]), steps_per_segment + 1)
        for t, t_next in zip(grid[:-1], grid[1:]):
            v = velocity(x, t.expand(x.shape[0]).to(x.device))
            x = (x.float() + (t_next - t) * v.float()).to(x.dtype)
        states.append(x)
    return states
