"""Samplers of continuous time t and of (t, r) pairs. t = 0 is data.

Every sampler takes (shape, device, dtype, generator) and returns a tensor of `shape`.
"""

from __future__ import annotations

import math

import numpy as np
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


def sample_log_student_t(shape, *, mean: float = -1.1, std: float = 2.0, df: float = 2.0,
                         ratio_range: tuple[float, float] = (0.0, float("inf")), device=None, dtype=torch.float32,
                         generator=None):
    """sigma = exp(mean + std * T), T ~ Student-t(df), truncated to sigma in ratio_range = (low, high): a
    heavier-tailed log-normal (df = inf is EDM's log-normal, truncated). Truncated consistency models (Lee et al.
    arXiv:2410.14895) draw their stage-2 times this way above the dividing time t'; NVIDIA FastGen's truncated
    log-t uses df = 2. Inverse-CDF draw in float64 on the CPU (scipy's t CDF / PPF; the uniforms come from
    `generator` on its own device), moved to `device` once."""
    from scipy import stats

    low, high = ratio_range
    if not (std > 0 and df > 0):  # NaN fails too
        raise ValueError(f"`std` and `df` must be > 0, got {std}, {df}.")
    if not 0 <= low < high:
        raise ValueError(f"`ratio_range` must be (low, high) with 0 <= low < high, got {ratio_range}.")
    with np.errstate(divide="ignore"):
        z = (np.log([low, high]) - mean) / std
    cdf_low, cdf_high = stats.t.cdf(z, df)
    u = cdf_low + (cdf_high - cdf_low) * _uniform(shape, generator.device if generator is not None else None, generator)
    sigma = torch.from_numpy(np.exp(stats.t.ppf(u.cpu().numpy(), df) * std + mean)).clamp(low, high)
    return sigma.to(device=device, dtype=dtype)


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


ECT_MAPPINGS = ("sigmoid", "linear")


def sample_t_r_ect(shape, *, iteration: int, total_iterations: int, num_stages: int = 8, q: float = 2.0,
                   mean: float = -1.1, std: float = 2.0, mapping: str = "linear", k: float = 8.0, b: float = 1.0,
                   device=None, dtype=torch.float32, generator=None):
    """(t, r) of ECT: t = sigma ~ LogNormal(mean, std) (EDM time) and, with n = n(iteration) (`ect_ratio`),

    mapping="linear" (the default): r = t (1 - n);
    mapping="sigmoid" (ECT's and FastGen's): r = max(0, t - t n (1 + k sigmoid(-b t))) -- small t get a wider gap
      (up to (1 + k/2) n t at t -> 0), and early in training r = 0 for the smallest t, where the consistency
      target is the data itself. On the digits CD benchmark it scored 1-/2-step FD 0.60 / 0.53-0.54 against the
      linear mapping's 0.58 / 0.49 (two seeds each, docs/results.md), so linear stays the default."""
    if mapping not in ECT_MAPPINGS:
        raise ValueError(f"`mapping` must be one of {ECT_MAPPINGS}, got {mapping!r}.")
    t = sample_log_normal(shape, mean=mean, std=std, device=device, dtype=torch.float64, generator=generator)
    n = ect_ratio(iteration, total_iterations=total_iterations, num_stages=num_stages, q=q)
    if mapping == "linear":
        r = t * (1 - n)
    else:
        r = (t - t * n * (1 + k * torch.sigmoid(-b * t))).clamp_min(0.0)
    return t.to(dtype), r.to(dtype)


def noise_ratio_range(process) -> tuple[float, float]:
    """(low, high): the noise ratios sigma / alpha at the ends t = 0 and t = t_max of `process` (0 and inf for
    RF and TrigFlow; SD1.5's VP schedule: 0.029 and 14.6)."""
    ends = torch.tensor([0.0, float(getattr(process, "t_max", 1.0))], dtype=torch.float64)
    with torch.no_grad():
        alpha, sig = process.alpha(ends).to(torch.float64), process.sigma(ends).to(torch.float64)
    low = float(sig[0] / alpha[0]) if alpha[0] > 0 else 0.0
    high = float(sig[1] / alpha[1]) if alpha[1] > 0 else float("inf")
    return low, high


def trigflow_time_range(process, sigma_d: float) -> tuple[float, float]:
    """(low, high): the TrigFlow times atan(ratio / sigma_d) of `process`'s ends (0 and pi/2 for RF)."""
    low, high = noise_ratio_range(process)
    return math.atan(low / sigma_d), math.atan(high / sigma_d)  # atan(inf) = pi/2


def times_from_noise_ratios(process, sigma: torch.Tensor, r_factor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) of `process` for the EDM noise ratio sigma (t) and sigma * r_factor (r), r_factor in [0, 1)
    (a float or a (B,) tensor), with r < t for every sample.

    A process may represent only part of the ratio axis: a VP schedule spans sigma(0)/alpha(0) ..
    sigma(1)/alpha(1) (SD1.5's: 0.029 .. 14.6), and ratios outside map to t = 0 or t = 1, where t and r would
    coincide (a 0 / 0 consistency loss). So sigma is first clamped into that span (just above its lower end),
    and r's ratio is taken from the clamped sigma; below the span r is the process's t = 0. Inside the span
    the times are `process.t_from_noise_ratio` unchanged."""
    low, high = noise_ratio_range(process)
    sigma = sigma.to(torch.float64).clamp(min=low * 1.01 if low > 0 else 0.0, max=high)
    t = process.t_from_noise_ratio(sigma).float()
    r = process.t_from_noise_ratio(sigma * r_factor).float()
    return t, torch.minimum(r, t * (1 - 1e-6))  # float32 rounding of two close ratios: keep r < t


def sample_trigflow_time(shape, *, sigma_d: float = 0.5, mean: float = -1.0, std: float = 1.4, device=None,
                         dtype=torch.float32, generator=None, ratio_range: tuple[float, float] | None = None):
    """TrigFlow time of sCM (arXiv:2410.11081 Sec. 4): t = arctan(exp(n) / sigma_d), n ~ N(mean, std^2),
    i.e. the EDM log-normal proposal on sigma = exp(n) mapped to t in (0, pi/2). On the RF path the same
    points have t_rf = sigmoid(n): logit-normal(mean, std).

    ratio_range (low, high): the noise ratios sigma the model's own process spans (`noise_ratio_range`; a VP
    schedule such as SD1.5's spans only 0.029 .. 14.6). n is then drawn from the normal truncated to
    [log low, log high], so no sample lies where the model was never trained; with (0, inf) or None the
    draw is the plain log-normal one."""
    if sigma_d <= 0:
        raise ValueError(f"`sigma_d` must be > 0, got {sigma_d}.")
    low, high = ratio_range if ratio_range is not None else (0.0, float("inf"))
    if not 0 <= low < high:
        raise ValueError(f"`ratio_range` must be (low, high) with 0 <= low < high, got {ratio_range}.")
    if low == 0 and high == float("inf"):
        sigma = sample_log_normal(shape, mean=mean, std=std, device=device, dtype=torch.float64, generator=generator)
    else:  # the truncated log-normal: a log-Student-t with infinitely many degrees of freedom
        sigma = sample_log_student_t(shape, mean=mean, std=std, df=float("inf"), ratio_range=(low, high), device=device,
                                     dtype=torch.float64, generator=generator)
    return torch.atan(sigma / sigma_d).to(dtype)
