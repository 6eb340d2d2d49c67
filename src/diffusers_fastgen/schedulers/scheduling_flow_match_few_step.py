"""FlowMatchFewStepScheduler: stochastic few-step sampling of rectified-flow students.

The SDE twin of diffusers' FlowMapEulerDiscreteScheduler: the same schedule
    sigmas = shift(linspace(1, 0, N + 1)),   shift(s) = k s / (1 + (k - 1) s),
but each step predicts x0 = x_t - sigma * v and re-noises it with *fresh* Gaussian noise,
    x_next = (1 - sigma_next) x0 + sigma_next * eps,
as consistency-model multistep sampling and FastGen's DMD2 students do. No stock scheduler has both
this update and a few-step schedule held in its config (FlowMatchEulerDiscreteScheduler and
FlowMatchLCMScheduler with `stochastic_sampling` use linspace(1, sigma_min, N), whose last
step starts at sigma ~ 1e-3), hence this class.

Note: StableDiffusion3/Flux/Wan pipelines do not pass `generator` to `scheduler.step`, so there the
re-noising draws from the global torch RNG; seed it (`torch.manual_seed`) for reproducible samples.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


@dataclass
class FlowMatchFewStepSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class FlowMatchFewStepScheduler(SchedulerMixin, ConfigMixin):
    """Few-step x0-and-renoise sampler for flow-matching students.

    Args:
        num_train_timesteps: the model's timestep range; model input timestep = sigma * num_train_timesteps.
        shift: schedule shift k (FastGen's 2-step t_list [0.999, 0.833, 0] is close to shift = 5).
        use_flow_sigmas: read by FluxPipeline: when True it does not pass its own default sigmas, so the
            schedule above is used.
    """

    _compatibles = []
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_flow_sigmas: bool = True):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be an int >= 1, got {num_train_timesteps!r}.")
        if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise ValueError(f"`shift` must be a finite number > 0, got {shift!r}.")
        self.init_noise_sigma = 1.0
        self._step_index = None
        self._begin_index = None
        self.set_timesteps(1)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """diffusers' from_config, except that a key that looks like a misspelling of one of ours (`shfit`)
        is an error instead of a warning that keeps the default. Keys of other schedulers are ignored as
        usual, so `FlowMatchFewStepScheduler.from_config(pipe.scheduler.config)` still works."""
        keys = set(dict(config or {})) | set(kwargs)
        ours = set(inspect.signature(cls.__init__).parameters) - {"self"}
        for key in sorted(keys - ours):
            close = difflib.get_close_matches(key, ours, n=1, cutoff=0.8)
            if close and not key.startswith("_"):
                raise ValueError(f"unknown {cls.__name__} config key {key!r}; did you mean {close[0]!r}? "
                                 f"Allowed: {sorted(ours)}.")
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def apply_shift(self, sigmas: torch.Tensor) -> torch.Tensor:
        k = self.config.shift
        return sigmas if k == 1.0 else k * sigmas / (1 + (k - 1) * sigmas)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, timesteps=None,
                      mu: float | None = None):
        """Schedule of `num_inference_steps` steps, or explicit `sigmas` / `timesteps` (length N, the final
        0 is appended; the shift is not applied to explicit values). `mu` is accepted for pipeline
        compatibility and ignored: a distilled student samples at the times it was trained for."""
        if sigmas is None and timesteps is not None:
            sigmas = [float(t) / self.config.num_train_timesteps for t in timesteps]
        if sigmas is not None:
            if num_inference_steps is not None and len(sigmas) != num_inference_steps:
                raise ValueError(f"`sigmas` has {len(sigmas)} entries but num_inference_steps={num_inference_steps}.")
            working = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
        else:
            if num_inference_steps is None or num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
            working = self.apply_shift(torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64)[:-1])
        if not bool((working[1:] < working[:-1]).all()) or float(working.min()) <= 0 or float(working.max()) > 1:
            raise ValueError(f"sigmas must be strictly decreasing in (0, 1], got {working.tolist()}.")
        self.num_inference_steps = working.numel()
        self.sigmas = torch.cat([working, working.new_zeros(1)]).to(device=device, dtype=torch.float32)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep, schedule_timesteps=None):
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        t = torch.as_tensor(timestep, dtype=schedule_timesteps.dtype, device=schedule_timesteps.device)
        indices = (schedule_timesteps - t).abs().lt(1e-4).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(t)} is not on the schedule {schedule_timesteps.tolist()}.")
        return int(indices[0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self.begin_index is None else self._begin_index

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator: torch.Generator | None = None,
             return_dict: bool = True):
        """x0 = x - sigma v; x_next = (1 - sigma_next) x0 + sigma_next eps (eps fresh; none drawn at the end)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"step() called past the end of the {self.num_inference_steps}-step schedule; call "
                             "set_timesteps() before sampling again.")
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        x0 = sample.float() - sigma * model_output.float()
        if sigma_next > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1.0 - sigma_next) * x0 + sigma_next * noise.float()
        else:
            prev_sample = x0
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        x0 = x0.to(model_output.dtype)
        if not return_dict:
            return (prev_sample, x0)
        return FlowMatchFewStepSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process at `timestep` (model units): (1 - sigma) x0 + sigma eps (image-to-image)."""
        sigma = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32) / self.config.num_train_timesteps
        sigma = sigma.reshape(*sigma.shape, *([1] * (sample.ndim - sigma.ndim)))
        return ((1.0 - sigma) * sample.float() + sigma * noise.float()).to(sample.dtype)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        timesteps = torch.as_tensor(timesteps, device=original_samples.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(original_samples.shape[0])
        return self.scale_noise(original_samples, timesteps, noise)

    def __len__(self):
        return self.config.num_train_timesteps
