"""Samplers of continuous time t and of (t, r) pairs. t = 0 is data.

Every sampler takes (shape, device, dtype, generator) and returns a tensor of `shape`.
"""

from __future__ import annotations

import torch


def _uniform(shape, device, generator):
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float64)


def _normal(shape, device, generator):
    return torch.randn(shape, device=device, generator=generator, dtype=torch.float64)


def sample_uniform(shape, *, t_min: float = 0.0, t_max: float = 1.0, device=None, dtype=torch.float32, generator=None):
    """t ~ U[t_min, t_max]."""
    if not t_min < t_max:
        raise ValueError(f"`t_min` must be < `t_max`, got t_min={t_min}, t_max={t_max}.")
    return (t_min + (t_max - t_min) * _uniform(shape, device, generator)).to(dtype)


def sample_logit_normal(shape, *, mean: float = 0.0, std: float = 1.0, device=None, dtype=torch.float32, generator=None):
    """t = sigmoid(n), n ~ N(mean, std^2) (SD3, arXiv:2403.03206 eq. 19)."""
    if std <= 0:
        raise ValueError(f"`std` must be > 0, got {std}.")
    return torch.sigmoid(mean + std * _normal(shape, device, generator)).to(dtype)


def sample_log_normal(shape, *, mean: float = -1.2, std: float = 1.2, device=None, dtype=torch.float32, generator=None):
    """sigma = exp(n), n ~ N(mean, std^2) (EDM's training distribution, P_mean=-1.2, P_std=1.2)."""
    if std <= 0:
        raise ValueError(f"`std` must be > 0, got {std}.")
    return torch.exp(mean + std * _normal(shape, device, generator)).to(dtype)


def shift_time(t, shift: float):
    """t' = s t / (1 + (s - 1) t): the resolution shift of SD3/Flux/Wan (s > 1 moves mass towards noise)."""
    if shift <= 0:
        raise ValueError(f"`shift` must be > 0, got {shift}.")
    return shift * t / (1 + (shift - 1) * t)


def sample_shifted(shape, *, shift: float = 3.0, base: str = "uniform", device=None, dtype=torch.float32, generator=None):
    """Shifted t: draw t from `base` ('uniform' or 'logit_normal') and apply `shift_time`."""
    if base == "uniform":
        t = sample_uniform(shape, device=device, dtype=torch.float64, generator=generator)
    elif base == "logit_normal":
        t = sample_logit_normal(shape, device=device, dtype=torch.float64, generator=generator)
    else:
        raise ValueError(f"`base` must be 'uniform' or 'logit_normal', got {base!r}.")
    return shift_time(t, shift).to(dtype)


def sample_from_list(shape, t_list, *, device=None, dtype=torch.float32, generator=None, include_last: bool = False):
    """t drawn uniformly from a discrete student schedule t_list (e.g. [0.999, 0.833, 0.0]).

    The final entry (normally 0, the clean end) is excluded unless `include_last`.
    """
    values = torch.as_tensor(t_list, dtype=torch.float64, device=device)
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"`t_list` must be a 1-D list with at least 2 entries, got {t_list!r}.")
    candidates = values if include_last else values[:-1]
    idx = torch.randint(0, candidates.numel(), shape, device=device, generator=generator)
    return candidates[idx].to(dtype)


def sample_t_r_meanflow(shape, *, ratio_r_neq_t: float = 0.25, mean: float = -0.4, std: float = 1.0, device=None,
                        dtype=torch.float32, generator=None):
    """(t, r) pairs of MeanFlow (Geng et al. arXiv:2505.13447 Sec. 4.3): two logit-normal draws, t = max,
    r = min; with probability 1 - ratio_r_neq_t we set r = t (the flow-matching case)."""
    if not 0.0 <= ratio_r_neq_t <= 1.0:
        raise ValueError(f"`ratio_r_neq_t` must be in [0, 1], got {ratio_r_neq_t}.")
    a = sample_logit_normal(shape, mean=mean, std=std, device=device, dtype=torch.float64, generator=generator)
    b = sample_logit_normal(shape, mean=mean, std=std, device=device, dtype=torch.float64, generator=generator)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    keep = _uniform(shape, device, generator) < ratio_r_neq_t
    r = torch.where(keep, r, t)
    return t.to(dtype), r.to(dtype)


def ect_ratio(iteration: int, *, total_iterations: int, num_stages: int = 8, q: float = 2.0) -> float:
    """The gap ratio n of ECT's curriculum (Geng et al. arXiv:2406.14548), r = t (1 - n).

    Training is cut into `num_stages` equal stages; in stage k (0-based) n = 1 / q^(k+1), so with
    q = 2 every stage halves the gap t - r and the consistency condition tightens towards the ODE.
    """
    if total_iterations <= 0 or num_stages <= 0:
        raise ValueError("`total_iterations` and `num_stages` must be > 0.")
    stage = min(int(iteration * num_stages / total_iterations), num_stages - 1)
    return 1.0 / q ** (stage + 1)


def sample_t_r_ect(shape, *, iteration: int, total_iterations: int, num_stages: int = 8, q: float = 2.0,
                   mean: float = -1.1, std: float = 2.0, device=None, dtype=torch.float32, generator=None):
    """(t, r) of ECT: t = sigma ~ LogNormal(mean, std) (EDM time), r = t (1 - n(iteration))."""
    t = sample_log_normal(shape, mean=mean, std=std, device=device, dtype=torch.float64, generator=generator)
    n = ect_ratio(iteration, total_iterations=total_iterations, num_stages=num_stages, q=q)
    return t.to(dtype), (t * (1 - n)).to(dtype)


def sample_trigflow_time(shape, *, sigma_d: float = 0.5, mean: float = -1.0, std: float = 1.4, device=None,
                         dtype=torch.float32, generator=None):
    """TrigFlow time of sCM (arXiv:2410.11081 Sec. 4): t = arctan(exp(n) / sigma_d), n ~ N(mean, std^2),
    i.e. the EDM log-normal proposal on sigma = exp(n) mapped to t in (0, pi/2). On the RF path the same
    points have t_rf = sigmoid(n): logit-normal(mean, std)."""
    if sigma_d <= 0:
        raise ValueError(f"`sigma_d` must be > 0, got {sigma_d}.")
    sigma = sample_log_normal(shape, mean=mean, std=std, device=device, dtype=torch.float64, generator=generator)
    return torch.atan(sigma / sigma_d).to(dtype)
