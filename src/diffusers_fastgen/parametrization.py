"""Forward processes and prediction conversions — the only home of x0 / eps / v / flow algebra.

Every process here is a Gaussian path

    x_t = alpha(t) * x0 + sigma(t) * eps,      eps ~ N(0, I),    t = 0 is data,

with continuous time t. The four processes of the field:

    RectifiedFlow   alpha = 1 - t,  sigma = t,                       t in [0, 1]   (SD3, Flux, Wan)
    EDM (VE)        alpha = 1,      sigma = t,                       t in [0, inf) (Karras et al. 2022)
    VP              alpha = sqrt(abar(t)), sigma = sqrt(1 - abar(t)), t in [0, 1]   (DDPM / SD1.5 / SDXL)
    TrigFlow        alpha = cos t,  sigma = sigma_d * sin t,         t in [0, pi/2] (sCM, arXiv:2410.11081)

A prediction is one of
    "x0"   (diffusers "sample"),
    "eps"  (diffusers "epsilon"),
    "v"    (diffusers "v_prediction", v = alpha * eps - sigma * x0, Salimans & Ho arXiv:2202.00512),
    "flow" (the velocity dx_t/dt = alpha'(t) x0 + sigma'(t) eps; for RF that is eps - x0).
All four are linear in (x0, eps) given x_t, so conversions go through (x0, eps) and are exact.
Conversions are computed in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

PREDICTION_TYPES = ("x0", "eps", "v", "flow")
# diffusers' names for the same predictions.
DIFFUSERS_PREDICTION_TYPES = {"sample": "x0", "epsilon": "eps", "v_prediction": "v", "flow_prediction": "flow"}


def _check_prediction_type(name: str, value: str) -> None:
    if value not in PREDICTION_TYPES:
        raise ValueError(f"`{name}` must be one of {PREDICTION_TYPES}, got {value!r}.")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Conversions run in float32, or float64 when the input is float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _up(x: torch.Tensor) -> torch.Tensor:
    return x.to(_compute_dtype(x))


def _as_time(t, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar / (B,) time, or a per-frame (B, F) time of a video x (B, C, F, H, W)
    (diffusion forcing), to x's rank, in x's compute dtype."""
    t = torch.as_tensor(t, device=x.device).to(_compute_dtype(x))
    if t.ndim == 0:
        return t
    if t.ndim == 2 and x.ndim == 5 and t.shape[1] == x.shape[2]:
        return t[:, None, :, None, None]  # (B, 1, F, 1, 1)
    if t.ndim != 1:
        raise ValueError(f"`t` must be a scalar, (B,) or per-frame (B, F) for video; got shape {tuple(t.shape)} "
                         f"for x of shape {tuple(x.shape)}.")
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class RectifiedFlow:
    """x_t = (1 - t) x0 + t eps. Native model timestep = t * num_train_timesteps (diffusers flow matching)."""

    num_train_timesteps: int = 1000
    t_max: float = 1.0

    def alpha(self, t):
        return 1.0 - t

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return -torch.ones_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_noise_ratio(self, ratio):  # ratio = sigma / alpha
        return ratio / (1.0 + ratio)

    def timestep_from_t(self, t):
        return t * self.num_train_timesteps

    def t_from_timestep(self, timestep):
        return timestep / self.num_train_timesteps


@dataclass(frozen=True)
class EDM:
    """Variance-exploding x_t = x0 + sigma eps with t = sigma (Karras et al. arXiv:2206.00364).

    Native input is EDM's c_noise = ln(sigma) / 4. `sigma_data` is used by the preconditioning helpers.
    """

    sigma_data: float = 0.5
    t_max: float = 80.0

    def alpha(self, t):
        return torch.ones_like(t)

    def sigma(self, t):
        return t

    def d_alpha(self, t):
        return torch.zeros_like(t)

    def d_sigma(self, t):
        return torch.ones_like(t)

    def t_from_noise_ratio(self, ratio):
        return ratio

    def timestep_from_t(self, t):
        return 0.25 * torch.log(t)

    def t_from_timestep(self, timestep):
        return torch.exp(4.0 * timestep)


@dataclass(frozen=True)
class TrigFlow:
    """x_t = cos(t) x0 + sin(t) sigma_d eps, t in [0, pi/2] (Lu & Song, sCM, arXiv:2410.11081 eq. 1).

    Native input follows sCM's c_noise(t) = t (models trained in TrigFlow time take t directly).
    """

    sigma_data: float = 0.5
    t_max: float = math.pi / 2

    def alpha(self, t):
        return torch.cos(t)

    def sigma(self, t):
        return self.sigma_data * torch.sin(t)

    def d_alpha(self, t):
        return -torch.sin(t)

    def d_sigma(self, t):
        return self.sigma_data * torch.cos(t)

    def t_from_noise_ratio(self, ratio):
        return torch.atan(ratio / self.sigma_data)

    def timestep_from_t(self, t):
        return t

    def t_from_timestep(self, timestep):
        return timestep


@dataclass(frozen=True)
class VP:
    """Discrete-time DDPM schedule made continuous: t in [0, 1] <-> timestep tau = t * (N - 1).

    log(alphas_cumprod) is interpolated linearly between the N training timesteps, so alpha, sigma
    and their t-derivatives are exact closed forms of that interpolant (the derivative is piecewise
    constant in log space). At integer timesteps alpha(t)^2 equals the scheduler's alphas_cumprod.
    """

    alphas_cumprod: torch.Tensor = field(repr=False)
    t_max: float = 1.0

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _log_abar_and_slope(self, t):
        log_abar = torch.log(self.alphas_cumprod.to(device=t.device, dtype=torch.float64))
        n = log_abar.shape[0]
        tau = (t.to(torch.float64) * (n - 1)).clamp(0, n - 1)
        i0 = tau.floor().long().clamp(max=n - 2)
        frac = tau - i0
        slope = log_abar[i0 + 1] - log_abar[i0]  # d log_abar / d tau on this segment
        value = log_abar[i0] + frac * slope
        out = t.dtype if t.dtype == torch.float64 else torch.float32
        return value.to(out), (slope * (n - 1)).to(out)  # slope per unit t

    def alpha(self, t):
        log_abar, _ = self._log_abar_and_slope(t)
        return torch.exp(0.5 * log_abar)

    def sigma(self, t):
        log_abar, _ = self._log_abar_and_slope(t)
        return torch.sqrt(-torch.expm1(log_abar))

    def d_alpha(self, t):
        log_abar, slope = self._log_abar_and_slope(t)
        return 0.5 * slope * torch.exp(0.5 * log_abar)

    def d_sigma(self, t):
        log_abar, slope = self._log_abar_and_slope(t)
        abar = torch.exp(log_abar)
        return -0.5 * slope * abar / torch.sqrt(-torch.expm1(log_abar))

    def t_from_noise_ratio(self, ratio):
        # Invert ratio^2 = (1 - abar) / abar  <=>  log_abar = -log(1 + ratio^2), on the interpolant.
        log_abar = torch.log(self.alphas_cumprod.to(device=ratio.device, dtype=torch.float64))
        target = -torch.log1p(ratio.to(torch.float64) ** 2)
        n = log_abar.shape[0]
        # log_abar is decreasing: search on its negation.
        idx = torch.searchsorted(-log_abar, -target.reshape(-1).contiguous()).clamp(1, n - 1).reshape(target.shape)
        lo, hi = log_abar[idx - 1], log_abar[idx]
        tau = (idx - 1) + (target - lo) / (hi - lo)
        return (tau / (n - 1)).clamp(0, 1).to(ratio.dtype if ratio.dtype == torch.float64 else torch.float32)

    def timestep_from_t(self, t):
        return t * (self.num_train_timesteps - 1)

    def t_from_timestep(self, timestep):
        return timestep / (self.num_train_timesteps - 1)


Process = RectifiedFlow | EDM | TrigFlow | VP


def vp_from_betas(beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000,
                  beta_schedule: str = "scaled_linear") -> VP:
    """The VP process of a diffusers DDPM-family config (SD1.5/SDXL use the defaults here)."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"`beta_schedule` must be 'scaled_linear' or 'linear', got {beta_schedule!r}.")
    return VP(alphas_cumprod=torch.cumprod(1.0 - betas, dim=0).to(torch.float32))


def process_from_scheduler(scheduler) -> tuple[Process, str]:
    """(process, native prediction type) of a diffusers scheduler's training config."""
    config = scheduler.config
    if hasattr(scheduler, "alphas_cumprod"):
        process = VP(alphas_cumprod=scheduler.alphas_cumprod.detach().float().cpu())
        prediction = DIFFUSERS_PREDICTION_TYPES[config.get("prediction_type", "epsilon")]
        return process, prediction
    if "shift" in config or type(scheduler).__name__.startswith("FlowMatch"):
        return RectifiedFlow(num_train_timesteps=config.get("num_train_timesteps", 1000)), "flow"
    raise ValueError(f"Cannot infer a process from scheduler {type(scheduler).__name__}; pass `process` explicitly.")


# ---------------------------------------------------------------------------------------------------
# Conversions between predictions. Everything goes through (x0, eps).
# ---------------------------------------------------------------------------------------------------


def add_noise(process: Process, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x_t = alpha(t) x0 + sigma(t) eps."""
    t = _as_time(t, x0)
    return (process.alpha(t) * _up(x0) + process.sigma(t) * _up(eps)).to(x0.dtype)


def x0_eps_from_prediction(process: Process, prediction: torch.Tensor, x_t: torch.Tensor, t, prediction_type: str):
    """Solve (x0, eps) from x_t and one prediction; returns float32 (float64 for float64 input) tensors."""
    _check_prediction_type("prediction_type", prediction_type)
    t = _as_time(t, x_t)
    a, s = process.alpha(t), process.sigma(t)
    x, p = _up(x_t), _up(prediction)
    if prediction_type == "x0":
        return p, (x - a * p) / s
    if prediction_type == "eps":
        return (x - s * p) / a, p
    if prediction_type == "v":  # v = a eps - s x0
        norm = a * a + s * s
        return (a * x - s * p) / norm, (s * x + a * p) / norm
    # flow: [a s; a' s'] [x0; eps] = [x; u]
    da, ds = process.d_alpha(t), process.d_sigma(t)
    det = a * ds - s * da
    return (ds * x - s * p) / det, (a * p - da * x) / det


def prediction_from_x0_eps(process: Process, x0: torch.Tensor, eps: torch.Tensor, t, prediction_type: str):
    """The requested prediction from (x0, eps), in the compute dtype."""
    _check_prediction_type("prediction_type", prediction_type)
    t = _as_time(t, x0)
    x0, eps = _up(x0), _up(eps)
    if prediction_type == "x0":
        return x0
    if prediction_type == "eps":
        return eps
    if prediction_type == "v":
        return process.alpha(t) * eps - process.sigma(t) * x0
    return process.d_alpha(t) * x0 + process.d_sigma(t) * eps


def convert_prediction(process: Process, prediction: torch.Tensor, x_t: torch.Tensor, t, source: str, target: str):
    """Convert a model prediction from `source` to `target` parametrization (exact; fp32 inside)."""
    _check_prediction_type("source", source)
    _check_prediction_type("target", target)
    if source == target:
        return prediction
    x0, eps = x0_eps_from_prediction(process, prediction, x_t, t, source)
    return prediction_from_x0_eps(process, x0, eps, t, target).to(prediction.dtype)


def x0_from_flow(x_t, flow, t):
    """RF shortcut: x0 = x_t - t * u."""
    return x_t - _as_time(t, x_t).to(x_t.dtype) * flow


def eps_from_flow(x_t, flow, t):
    """RF shortcut: eps = x_t + (1 - t) * u."""
    return x_t + (1 - _as_time(t, x_t).to(x_t.dtype)) * flow


# ---------------------------------------------------------------------------------------------------
# Changing process: two Gaussian paths meet where their noise ratios sigma/alpha agree.
# ---------------------------------------------------------------------------------------------------


def change_process(x_t: torch.Tensor, t, source: Process, target: Process):
    """Map a point of `source` at time t to the same point on `target`'s path.

    Returns (x_target, t_target, scale) with x_target = scale * x_t: both are
    alpha x0 + sigma eps with equal sigma/alpha, so the map is a rescaling. E.g. TrigFlow -> RF:
    t_rf = sigma_d tan t / (1 + sigma_d tan t), scale = 1 / (cos t + sigma_d sin t).
    """
    t = torch.as_tensor(t, device=x_t.device).to(_compute_dtype(x_t))
    a, s = source.alpha(t), source.sigma(t)
    t_target = target.t_from_noise_ratio(s / a)
    # alpha_target / alpha_source = sigma_target / sigma_source; take the ratio of the larger pair, which
    # stays finite at both ends (alpha -> 0 at pure noise, e.g. TrigFlow t = pi/2; sigma -> 0 at data).
    # (Safe denominators: the unused branch must not produce inf/nan, which would poison gradients.)
    use_alpha = a.abs() >= s.abs()
    one = torch.ones_like(a)
    scale = torch.where(use_alpha, target.alpha(t_target) / torch.where(use_alpha, a, one),
                        target.sigma(t_target) / torch.where(use_alpha, one, s))
    x = (_up(x_t) * _as_time(scale, x_t)).to(x_t.dtype)
    return x, t_target, scale


def trigflow_x0(x_t, flow, t):
    """TrigFlow x0 from the velocity dx_t/dt: x0 = cos(t) x_t - sin(t) dx_t/dt (sCM eq. 6, where the
    velocity is sigma_d * F_theta; this is what diffusers' SCMScheduler receives as model_output)."""
    t = _as_time(t, x_t)
    return (torch.cos(t) * x_t.float() - torch.sin(t) * flow.float()).to(x_t.dtype)
