"""Student sampling recipes: a scheduler whose config *is* the schedule the student is trained for.

The training scripts take the student's t_list from `t_list_from_scheduler(scheduler, N)` and save
that same scheduler in the pipeline folder, so `DiffusionPipeline.from_pretrained(path)` samples
exactly what was trained. Each recipe is matched step for step against `diffusers_fastgen.sampling`
in tests/schedulers.

| recipe                    | scheduler (stock unless noted)          | process  | sampler                         |
|---------------------------|-----------------------------------------|----------|---------------------------------|
| flow_map_scheduler        | FlowMapEulerDiscreteScheduler           | RF       | deterministic x0 re-noise = Euler; MeanFlow jumps |
| flow_match_sde_scheduler  | FlowMatchFewStepScheduler (ours)        | RF       | x0 + fresh noise (FastGen SDE)  |
| lcm_scheduler             | LCMScheduler                            | VP       | multistep consistency           |
| scm_scheduler             | SCMScheduler                            | TrigFlow | sCM multistep (needs set_timesteps kwargs) |
| scm_rf_scheduler          | FlowMatchFewStepScheduler (ours)        | RF       | sCM multistep of a TrigFlow-trained RF model |
| causal_scheduler          | FlowMatchEulerDiscreteScheduler         | RF       | x0 + fresh noise at the pipeline's explicit sigmas (CausalWanPipeline) |

An sCM student trained through the TrigFlow view of an RF model (models.trigflow) stays an RF model;
sCM's multistep sampler (x0, then fresh noise at t_mid) is, on the RF path, the x0-and-renoise sampler
at t_rf = sigma_d tan(t_mid) / (1 + sigma_d tan(t_mid)) — exactly FlowMatchFewStepScheduler with
shift = sigma_d tan(t_mid), since its 2-step midpoint is shift / (1 + shift).

CausalWanPipeline holds its per-block schedule in its own config and hands the scheduler explicit sigmas,
so the stock FlowMatchEulerDiscreteScheduler with `stochastic_sampling=True` and shift 1 runs the causal
recipes exactly: x0 = x - sigma v, then (1 - sigma') x0 + sigma' eps with fresh eps (`check_causal_scheduler`
says which configurations qualify).
"""

from __future__ import annotations

import math

import torch
from diffusers import (
    DDIMScheduler,
    FlowMapEulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    SCMScheduler,
)

from .scheduling_flow_match_few_step import FlowMatchFewStepScheduler

# LCM's boundary condition c_skip = 0.25 / ((scaling * timestep)^2 + 0.25) must vanish for a student
# that predicts x0 directly: with this scaling c_skip < 3e-13 at every timestep >= 1.
_LCM_TIMESTEP_SCALING = 1.0e6


def flow_map_scheduler(shift: float = 1.0, num_train_timesteps: int = 1000) -> FlowMapEulerDiscreteScheduler:
    """Deterministic RF few-step schedule: sigmas = shift(linspace(1, 0, N + 1))."""
    if shift <= 0:
        raise ValueError(f"`shift` must be > 0, got {shift}.")
    return FlowMapEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def flow_match_sde_scheduler(shift: float = 1.0, num_train_timesteps: int = 1000) -> FlowMatchFewStepScheduler:
    """Stochastic RF few-step schedule: same sigmas as `flow_map_scheduler`, fresh noise per step."""
    return FlowMatchFewStepScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def scm_rf_scheduler(sigma_d: float, intermediate_t: float = 1.1, num_train_timesteps: int = 1000) -> FlowMatchFewStepScheduler:
    """sCM's 1-step (t = pi/2) and 2-step (pi/2, intermediate_t) samplers for an RF model (see table)."""
    if sigma_d <= 0:
        raise ValueError(f"`sigma_d` must be > 0, got {sigma_d}.")
    if not 0 < intermediate_t < math.pi / 2:
        raise ValueError(f"`intermediate_t` must be in (0, pi/2) (TrigFlow radians), got {intermediate_t}.")
    return FlowMatchFewStepScheduler(num_train_timesteps=num_train_timesteps,
                                     shift=float(sigma_d * math.tan(intermediate_t)))


def causal_scheduler(num_train_timesteps: int = 1000) -> FlowMatchEulerDiscreteScheduler:
    """The stock scheduler of CausalWanPipeline folders: stochastic flow-matching steps at the sigmas the
    pipeline passes (x0 then fresh noise), no shift of its own."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0,
                                           stochastic_sampling=True)


# FlowMatchEulerDiscreteScheduler config values that would change the sigmas a caller passes (or the update).
_SIGMA_CHANGING = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                   "use_beta_sigmas", "invert_sigmas")


def check_causal_scheduler(scheduler) -> None:
    """ValueError naming `scheduler` unless it steps at exactly the sigmas it is given: FlowMatchFewStepScheduler,
    or FlowMatchEulerDiscreteScheduler with shift 1 and none of the options that move the sigmas
    (stochastic_sampling=True: x0 then fresh noise, the distilled students' recipe; False: Euler, an ODE
    sampler for a many-step causal teacher)."""
    if isinstance(scheduler, FlowMatchFewStepScheduler):
        return
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        cfg = scheduler.config
        bad = {k: cfg.get(k) for k in _SIGMA_CHANGING if cfg.get(k)}
        if float(cfg.get("shift", 1.0)) != 1.0:
            bad["shift"] = cfg.get("shift")
        if not bad:
            return
        raise ValueError(f"`scheduler`: FlowMatchEulerDiscreteScheduler must step at the recipe's own sigmas (shift=1.0, "
                         f"no dynamic shifting, shift_terminal, karras/exponential/beta or inverted sigmas); this "
                         f"one has {bad}.")
    raise ValueError(f"`scheduler` must be FlowMatchEulerDiscreteScheduler (shift=1.0; stochastic_sampling=True for "
                     f"x0 then fresh noise) or FlowMatchFewStepScheduler, got {type(scheduler).__name__}.")


def lcm_scheduler(teacher_scheduler=None, *, original_inference_steps: int = 50, prediction_type: str | None = None,
                  **vp_config) -> LCMScheduler:
    """VP multistep consistency sampling with LCMScheduler, x0 boundary condition made exact.

    Copies the teacher's beta schedule (`teacher_scheduler` config, or beta_start/beta_end/... kwargs).
    """
    config = dict(teacher_scheduler.config) if teacher_scheduler is not None else {}
    config.update(vp_config)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type")
    kwargs = {k: config[k] for k in keys if k in config}
    if prediction_type is not None:
        kwargs["prediction_type"] = prediction_type
    return LCMScheduler(**kwargs, original_inference_steps=original_inference_steps,
                        timestep_scaling=_LCM_TIMESTEP_SCALING, set_alpha_to_one=True, steps_offset=1)


def scm_scheduler(sigma_data: float = 0.5) -> SCMScheduler:
    """TrigFlow sCM sampling. SCMScheduler keeps its schedule in set_timesteps' arguments
    (max_timesteps, intermediate_timesteps), which `scm_set_timesteps_kwargs` provides."""
    return SCMScheduler(sigma_data=sigma_data)


def scm_set_timesteps_kwargs(num_inference_steps: int, *, max_timesteps: float = 1.57080,
                             intermediate_timesteps: float = 1.3) -> dict:
    """Arguments for SCMScheduler.set_timesteps matching sCM's 1- and 2-step schedules."""
    if num_inference_steps == 2:
        return dict(max_timesteps=max_timesteps, intermediate_timesteps=intermediate_timesteps)
    return dict(max_timesteps=max_timesteps, intermediate_timesteps=None)


def shift_times(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow-matching time shift t = s u / (1 + (s - 1) u), in u's dtype (Self-Forcing warps in float32)."""
    return shift * u / (1 + (shift - 1) * u)


def t_list_from_scheduler(scheduler, num_inference_steps: int, **set_timesteps_kwargs) -> torch.Tensor:
    """The continuous-time t_list (ending at 0) that `scheduler` samples at for N steps.

    RF schedulers: t = sigma. LCMScheduler: VP time t = timestep / (num_train_timesteps - 1).
    SCMScheduler: TrigFlow time, as set.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
    if isinstance(scheduler, SCMScheduler):
        kwargs = set_timesteps_kwargs or scm_set_timesteps_kwargs(num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, **kwargs)
        return scheduler.timesteps.float().clone()
    scheduler.set_timesteps(num_inference_steps, **set_timesteps_kwargs)
    if isinstance(scheduler, (LCMScheduler, DDIMScheduler)):  # VP: t = timestep / (T - 1)
        t = scheduler.timesteps.double() / (scheduler.config.num_train_timesteps - 1)
        return torch.cat([t, t.new_zeros(1)]).float()
    if hasattr(scheduler, "sigmas"):
        return scheduler.sigmas.float().clone()
    raise TypeError(f"no t_list recipe for scheduler {type(scheduler).__name__}; "
                    "use FlowMapEulerDiscreteScheduler, FlowMatchFewStepScheduler, LCMScheduler or SCMScheduler.")
