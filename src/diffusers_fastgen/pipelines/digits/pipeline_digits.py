"""DigitsPipeline: class-conditional sampling of pixel-space digits models with any student scheduler."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ...models.digits import NULL_CLASS
from ...models.interval import interval_embedding


class DigitsPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Components: `unet` (UNet2DConditionModel with class embeddings; class NULL_CLASS = unconditional)
    and `scheduler` (FlowMapEulerDiscreteScheduler, FlowMatchFewStepScheduler, FlowMatchEuler..., or
    any scheduler whose `timesteps` are the model's inputs). LoRA: `load_lora_weights` as in SD.

    Flow-map / MeanFlow students (a unet with `time_cond_proj_dim`, models.interval) predict the
    average velocity u(z_t, r, t) over the step: they receive the embedding of the interval
    timestep - r_timestep as `timestep_cond`, r being the next point of the schedule, and the
    FlowMapEulerDiscreteScheduler steps from timestep to that r_timestep."""

    model_cpu_offload_seq = "unet"
    _optional_components = []
    text_encoder = None  # no text encoder: StableDiffusionLoraLoaderMixin then loads LoRA into the unet only

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _step_kwargs(self, generator):
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    def _r_timestep(self, i: int) -> torch.Tensor:
        """The schedule's next point in model timesteps (0 after the last step)."""
        sigmas = getattr(self.scheduler, "sigmas", None)
        if sigmas is not None:
            return sigmas[i + 1] * self.scheduler.config.num_train_timesteps
        timesteps = self.scheduler.timesteps
        return timesteps[i + 1] if i + 1 < len(timesteps) else torch.zeros_like(timesteps[0])

    def _interval_cond(self, timestep: torch.Tensor, r_timestep: torch.Tensor) -> torch.Tensor:
        config = self.unet.config
        r = r_timestep.to(device=timestep.device, dtype=timestep.dtype).expand_as(timestep)
        return interval_embedding(timestep.float(), r.float(), config.time_cond_proj_dim).to(self.unet.dtype)

    def check_inputs(self, class_labels, num_inference_steps, guidance_scale, generator, latents, output_type,
                     set_timesteps_kwargs) -> torch.Tensor:
        """Validate the call's arguments before any work (as diffusers pipelines do); returns the labels (B,)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        custom_schedule = any(set_timesteps_kwargs.get(k) is not None for k in ("sigmas", "timesteps"))
        if not custom_schedule and (isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int)
                                    or num_inference_steps < 1):
            raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}.")
        raw = torch.as_tensor(class_labels).reshape(-1)
        if raw.is_floating_point() and not bool((raw == raw.round()).all()):
            raise ValueError(f"`class_labels` must be integers, got {class_labels!r}.")
        if raw.is_floating_point() and not bool(torch.isfinite(raw).all()):
            raise ValueError(f"`class_labels` must be finite integers, got {class_labels!r}.")
        labels = raw.to(dtype=torch.long, device=self.device)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NULL_CLASS:
            raise ValueError(f"`class_labels` must be non-empty ints in [0, {NULL_CLASS - 1}], got {class_labels!r}.")
        if isinstance(generator, list) and len(generator) != labels.numel():
            raise ValueError(f"`generator` is a list of {len(generator)} generators; it must have one per image "
                             f"({labels.numel()}).")
        config = self.unet.config
        shape = (labels.numel(), config.in_channels, config.sample_size, config.sample_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        return labels

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 1, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, **set_timesteps_kwargs):
        """Sample one image per entry of `class_labels` (ints 0..9).

        output_type: 'pil', 'np' ((B, 8, 8, 1) in [0, 1]), 'pt' ((B, 1, 8, 8) in [0, 1]) or
        'latent' ((B, 1, 8, 8) raw model space, [-1, 1] for the digits).
        """
        labels = self.check_inputs(class_labels, num_inference_steps, guidance_scale, generator, latents, output_type,
                                   set_timesteps_kwargs)
        cfg = guidance_scale != 1.0
        config = self.unet.config
        shape = (labels.numel(), config.in_channels, config.sample_size, config.sample_size)
        dtype = self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device, **set_timesteps_kwargs)
        step_kwargs = self._step_kwargs(generator)
        model_labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if cfg else labels
        flow_map = config.time_cond_proj_dim is not None
        if flow_map and "r_timestep" not in inspect.signature(self.scheduler.step).parameters:
            raise ValueError("this unet is a flow-map student (time_cond_proj_dim is set): it needs a scheduler whose "
                             f"step takes `r_timestep` (FlowMapEulerDiscreteScheduler), got {type(self.scheduler).__name__}.")
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = t.expand(model_input.shape[0]).to(self.device)
            kwargs = {}
            if flow_map:
                kwargs = {"timestep_cond": self._interval_cond(timestep, self._r_timestep(i))}  # step's default r
            out = self.unet(model_input, timestep, encoder_hidden_states=None, class_labels=model_labels, **kwargs).sample
            if cfg:
                cond, uncond = out.chunk(2)
                out = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(out, t, latents, return_dict=False, **step_kwargs)[0]
        self.maybe_free_model_hooks()
        if output_type == "latent":
            images = latents
        else:
            images = (latents.float() / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def numpy_to_pil(images: np.ndarray):

        images = (images * 255).round().astype("uint8")
        return [Image.fromarray(im[..., 0], mode="L") if im.shape[-1] == 1 else Image.fromarray(im) for im in images]
