"""CausalWanPipeline: streaming block-by-block video generation with a causal Wan student and a KV cache.

For each block of `num_frames_per_block` latent frames:
  1. start from Gaussian noise and run the few-step schedule `denoising_timesteps` with the scheduler
     (x0 = x_t - sigma v, re-noised with fresh noise to the next sigma; the last step returns x0),
     each forward attending to the cached earlier frames (the cache is read, not written);
  2. write the finished block into the KV cache with one forward at timestep `context_noise`
     (0: the clean block; > 0: the block re-noised to that level, as CausVid / Self-Forcing do);
  3. hand the finished block to the caller (`callback_on_block_end`, or `stream()` yields it).

I2V: `image` fixes latent frame 0 (its timestep is 0 in every forward: diffusion forcing's per-frame
timesteps), and the rest of the first block is generated around it.

Every sampling setting lives in the pipeline config (model_index.json), so `from_pretrained` samples
exactly as the student was trained. The components are stock: WanTransformer3DModel (made block-causal
at run time by `models.causal_wan.CausalWan`, weights untouched), FlowMatchEulerDiscreteScheduler with
`stochastic_sampling=True` (`schedulers.causal_scheduler`; our FlowMatchFewStepScheduler, which earlier
folders hold, samples identically), and the optional UMT5 tokenizer/text encoder and AutoencoderKLWan
(without a VAE the latents are the frames).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ...models.causal_wan import CausalWan, block_bounds
from ...schedulers import check_causal_scheduler


class CausalWanPipeline(DiffusionPipeline):
    """Components: `transformer` (WanTransformer3DModel), `scheduler` (FlowMatchEulerDiscreteScheduler with shift 1:
    stochastic_sampling=True for the students' x0-then-fresh-noise steps, False for Euler; or FlowMatchFewStepScheduler;
    `schedulers.check_causal_scheduler`), and
    optional `tokenizer` + `text_encoder` (UMT5) and `vae` (AutoencoderKLWan).

    Config (saved in model_index.json):
        num_frames_per_block: latent frames per causal block.
        denoising_timesteps: the per-block few-step schedule in model timesteps, e.g. [1000, 750, 500, 250].
        denoising_sigmas: the noise level of each of those steps, when it is not timestep / 1000 (CausVid's
            3-step student is fed timesteps [1000, 757, 522] at noise levels [1, 0.7568, 0.5217], read off a
            discrete shifted table); None: timestep / num_train_timesteps.
        context_noise: timestep at which finished blocks are written into the cache (0 = clean).
        local_attn_size: attention window in latent frames (-1 = every earlier frame).
        sink_size: frames at the start that stay visible with a local window.
        block_sizes: a non-uniform block layout, e.g. [1, 4] (an independent first frame, then blocks of 4):
            the sizes of the first blocks, the last one repeating (it must equal num_frames_per_block);
            None: every block has num_frames_per_block frames.
        sinks_in_window: whether `local_attn_size` counts the sinks (True: Self-Forcing's / LongLive's
            convention, local_attn_size - sink_size recent frames) or not (False: local_attn_size recent
            frames plus the sinks).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "vae"]

    def __init__(self, transformer, scheduler, tokenizer=None, text_encoder=None, vae=None,
                 num_frames_per_block: int = 3, denoising_timesteps: list[float] | None = None,
                 context_noise: int = 0, local_attn_size: int = -1, sink_size: int = 0,
                 denoising_sigmas: list[float] | None = None, sinks_in_window: bool = False,
                 block_sizes: list[int] | None = None):
        super().__init__()
        denoising_timesteps = [1000, 750, 500, 250] if denoising_timesteps is None else list(denoising_timesteps)
        denoising_sigmas = None if denoising_sigmas is None else [float(s) for s in denoising_sigmas]
        block_sizes = None if block_sizes is None else list(block_sizes)
        self.check_recipe(num_frames_per_block=num_frames_per_block, denoising_timesteps=denoising_timesteps,
                          context_noise=context_noise, local_attn_size=local_attn_size, sink_size=sink_size,
                          denoising_sigmas=denoising_sigmas, sinks_in_window=sinks_in_window, block_sizes=block_sizes)
        check_causal_scheduler(scheduler)
        self.register_modules(transformer=transformer, scheduler=scheduler, tokenizer=tokenizer,
                              text_encoder=text_encoder, vae=vae)
        self.register_to_config(num_frames_per_block=num_frames_per_block, denoising_timesteps=denoising_timesteps,
                                context_noise=context_noise, local_attn_size=local_attn_size, sink_size=sink_size,
                                denoising_sigmas=denoising_sigmas, sinks_in_window=sinks_in_window,
                                block_sizes=block_sizes)

    @staticmethod
    def check_recipe(*, num_frames_per_block, denoising_timesteps, context_noise, local_attn_size, sink_size,
                     denoising_sigmas=None, sinks_in_window: bool = False, block_sizes=None) -> None:
        """ValueError naming the field unless the sampling recipe is one this pipeline can run."""
        steps = list(denoising_timesteps)
        if not steps or any(not isinstance(t, (int, float)) or not 0 < t <= 1000 for t in steps) or any(
                a <= b for a, b in zip(steps, steps[1:])):
            raise ValueError(f"`denoising_timesteps` must be a non-empty decreasing list in (0, 1000], got {steps}.")
        if denoising_sigmas is not None:
            sigmas = list(denoising_sigmas)
            if len(sigmas) != len(steps) or any(not isinstance(s, (int, float)) or not 0 < s <= 1 for s in sigmas) or any(
                    a <= b for a, b in zip(sigmas, sigmas[1:])):
                raise ValueError(f"`denoising_sigmas` must be None or a decreasing list in (0, 1] with one noise level "
                                 f"per timestep ({len(steps)}), got {sigmas}.")
        if not isinstance(context_noise, (int, float)) or not 0 <= context_noise < 1000:
            raise ValueError(f"`context_noise` must be in [0, 1000), got {context_noise!r}.")
        CausalWan.check_layout(num_frames_per_block, local_attn_size, sink_size, sinks_in_window)
        if block_sizes is not None:
            CausalWan.check_layout(list(block_sizes), local_attn_size, sink_size, sinks_in_window)
            if list(block_sizes)[-1] != num_frames_per_block:
                raise ValueError(f"`block_sizes` {list(block_sizes)} must end with num_frames_per_block "
                                 f"({num_frames_per_block}), the size that repeats.")

    def causal_transformer(self) -> CausalWan:
        """The transformer made block-causal for this pipeline's recipe (its attention processors swapped
        until `.remove()` or the end of a `with` block; weights untouched). `stream`/`__call__` use one for
        the duration of a generation, so the registered transformer keeps its own processors otherwise."""
        cfg = self.config
        return CausalWan(self.transformer, self.layout, local_attn_size=cfg.local_attn_size,
                         sink_size=cfg.sink_size, sinks_in_window=bool(getattr(cfg, "sinks_in_window", False)))

    @property
    def layout(self) -> tuple[int, ...]:
        """The block sizes (the last repeating): `block_sizes`, or (num_frames_per_block,)."""
        sizes = getattr(self.config, "block_sizes", None)
        return tuple(sizes) if sizes else (self.config.num_frames_per_block,)

    # --- conditioning -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[str], max_sequence_length: int = 512, device=None) -> torch.Tensor:
        """(B, max_sequence_length, text_dim) UMT5 states, zeroed after each prompt's end (as WanPipeline)."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("this pipeline has no tokenizer/text_encoder: pass `prompt_embeds`.")
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        tokens = self.tokenizer(prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = device or self._execution_device
        states = self.text_encoder(tokens.input_ids.to(device), tokens.attention_mask.to(device)).last_hidden_state
        return states * tokens.attention_mask.to(device)[..., None].to(states.dtype)

    def _latent_norm(self, like: torch.Tensor):
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(like)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(like)
        return mean, std

    def _check_inputs(self, prompt, prompt_embeds, num_frames, height, width, guidance_scale, negative_prompt_embeds):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`.")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` (latent frames) must be a positive integer, got {num_frames!r}.")
        block_bounds(self.layout, num_frames)  # ValueError unless it ends on a block boundary
        _, p_h, p_w = self.transformer.config.patch_size
        if height % p_h or width % p_w:
            raise ValueError(f"latent `height`/`width` must be multiples of the patch size {(p_h, p_w)}, got "
                             f"{height}x{width}.")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be a finite number >= 0 (> 1 enables CFG), got {guidance_scale!r}.")
        if guidance_scale > 1 and negative_prompt_embeds is None and self.text_encoder is None:
            raise ValueError("`guidance_scale` > 1 needs `negative_prompt_embeds` (or a text encoder).")

    # --- generation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def stream(self, prompt=None, *, prompt_embeds: torch.Tensor | None = None, negative_prompt: str | list[str] = "",
               negative_prompt_embeds: torch.Tensor | None = None, image: torch.Tensor | None = None,
               num_frames: int | None = None, height: int = 8, width: int = 8, guidance_scale: float = 1.0,
               generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
               prefix_latents: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield each finished block of latents (B, C, N, h, w) as soon as it is written into the cache.

        num_frames / height / width are in latent units. latents: the initial noise (B, C, F, h, w).
        image: I2V first frame, as latents (B, C, 1, h, w), or pixels (B, 3, H, W) in [-1, 1] with a VAE.
        prefix_latents: clean latent frames (B, C, K, h, w) that start the video (video extension; `encode_video`
        makes them from pixels): written into the cache block by block as finished blocks are, and yielded
        unchanged; generation goes on from frame K, which must end a block. num_frames counts them."""
        num_frames = num_frames if num_frames is not None else (latents.shape[2] if latents is not None else
                                                                self.layout[0])
        self._check_inputs(prompt, prompt_embeds, num_frames, height, width, guidance_scale, negative_prompt_embeds)
        device = self._execution_device
        text = prompt_embeds.to(device) if prompt_embeds is not None else self.encode_prompt(prompt, device=device)
        b = text.shape[0]
        if isinstance(generator, list) and len(generator) != b:
            raise ValueError(f"`generator` is a list of {len(generator)} generators; it must have one per video ({b}).")
        if latents is not None and (latents.ndim != 5 or latents.shape[0] != b):
            raise ValueError(f"`latents` must be (B={b}, C, F, h, w), got {tuple(latents.shape)}.")
        c = self.transformer.config.in_channels
        if prefix_latents is not None:
            k = prefix_latents.shape[2] if prefix_latents.ndim == 5 else -1
            if prefix_latents.ndim != 5 or tuple(prefix_latents.shape) != (b, c, k, height, width) or \
                    k not in [e for _, e in block_bounds(self.layout, num_frames)] or k == num_frames:
                raise ValueError(f"`prefix_latents` must be (B={b}, C={c}, K, h={height}, w={width}) with K < num_frames "
                                 f"({num_frames}) ending a block of the layout {list(self.layout)}, got "
                                 f"{tuple(prefix_latents.shape)}.")
            if image is not None:
                raise ValueError("pass one of `image` and `prefix_latents`.")
        use_cfg = guidance_scale > 1.0
        if use_cfg:
            uncond = (negative_prompt_embeds if negative_prompt_embeds is not None else
                      self.encode_prompt([negative_prompt] * b if isinstance(negative_prompt, str) else negative_prompt,
                                         max_sequence_length=text.shape[1], device=device))
            text = torch.cat([uncond.to(text), text])  # (2B, L, D): one cache for both branches
        dtype = self.transformer.dtype
        text = text.to(dtype)
        if latents is None:
            latents = randn_tensor((b, c, num_frames, height, width), generator=generator, device=device,
                                   dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        first = None
        if image is not None:
            if image.ndim == 4:  # pixels -> latent frame 0
                if self.vae is None:
                    raise ValueError("`image` as pixels (B, 3, H, W) needs a VAE; pass latents (B, C, 1, h, w).")
                image = self.encode_video(image[:, :, None])
            first = image.to(device=device, dtype=torch.float32)
        with self.causal_transformer() as causal:  # also restored when the consumer stops early (close())
            yield from self._blocks(causal, latents, first, text, b, num_frames, height, width, guidance_scale,
                                    use_cfg, dtype, generator, device, prefix_latents)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, f, h, w) (the VAE's posterior mode), e.g. the
        `prefix_latents` of a video to extend."""
        if self.vae is None:
            raise ValueError("`encode_video` needs a VAE.")
        encoded = self.vae.encode(video.to(self._execution_device, self.vae.dtype)).latent_dist.mode()
        mean, std = self._latent_norm(encoded)
        return ((encoded - mean) / std).float()

    def _blocks(self, causal, latents, first, text, b, num_frames, height, width, guidance_scale, use_cfg, dtype,
                generator, device, prefix=None):
        cfg = self.config
        cache = causal.new_cache(text.shape[0], num_frames, height, width, device=device, dtype=dtype)
        sigmas = [t / self.scheduler.config.num_train_timesteps for t in cfg.denoising_timesteps]
        model_timesteps = None  # the model sees the scheduler's timesteps (sigma * num_train_timesteps)
        if getattr(cfg, "denoising_sigmas", None) is not None:  # separate noise levels: the model sees the recipe's
            sigmas = list(cfg.denoising_sigmas)
            model_timesteps = torch.tensor(cfg.denoising_timesteps, dtype=torch.float32, device=device)
        for start, end in block_bounds(self.layout, num_frames):
            n = end - start
            if prefix is not None and end <= prefix.shape[2]:  # a given clean block: straight into the cache
                x = prefix[:, :, start:end].to(device=device, dtype=torch.float32)
                self._write_context(causal, x, text, cache, use_cfg, dtype, generator, device)
                yield x
                continue
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
            x = latents[:, :, start:end]  # (B, C, N, h, w)
            fixed = first is not None and start == 0
            last = len(self.scheduler.timesteps) - 1
            for i, timestep in enumerate(self.scheduler.timesteps):
                if fixed:
                    x = torch.cat([first, x[:, :, 1:]], 2)
                model_t = timestep if model_timesteps is None else model_timesteps[i]
                frame_t = model_t.expand(b)  # one level for the block: Wan's shared (cheaper) modulation
                if fixed:  # I2V: frame 0 stays at timestep 0 -> per-frame timesteps
                    frame_t = model_t.expand(b, n).clone()
                    frame_t[:, 0] = 0
                v = self._velocity(causal, x, frame_t, text, cache, guidance_scale, use_cfg, dtype)
                if i < last:
                    x = self.scheduler.step(v, timestep, x, generator=generator).prev_sample
                else:  # the final x0 (every accepted scheduler's last step), taken here because the stock
                    # scheduler would draw, and multiply by 0, one more noise: the draws stay the same for both
                    x = x.float() - self.scheduler.sigmas[i].to(x.device) * v
            if fixed:
                x = torch.cat([first, x[:, :, 1:]], 2)
            self._write_context(causal, x, text, cache, use_cfg, dtype, generator, device)
            yield x

    def _write_context(self, causal, x, text, cache, use_cfg, dtype, generator, device) -> None:
        """Write a finished block into the cache at `context_noise`."""
        noise_level = self.config.context_noise
        ctx = x
        if noise_level > 0:
            s = noise_level / self.scheduler.config.num_train_timesteps
            ctx = (1 - s) * x + s * randn_tensor(x.shape, generator=generator, device=device, dtype=x.dtype)
        ctx = torch.cat([ctx, ctx]) if use_cfg else ctx
        ctx_t = torch.full((text.shape[0],), float(noise_level), device=device)
        causal(ctx.to(dtype), ctx_t, text, kv_cache=cache, update_cache=True)

    @staticmethod
    def _velocity(causal, x, frame_t, text, cache, guidance_scale, use_cfg, dtype):
        if use_cfg:
            v_u, v_c = causal(torch.cat([x, x]).to(dtype), torch.cat([frame_t, frame_t]), text,
                                   kv_cache=cache).float().chunk(2)
            return v_u + guidance_scale * (v_c - v_u)
        return causal(x.to(dtype), frame_t, text, kv_cache=cache).float()

    @torch.no_grad()
    def __call__(self, prompt=None, *, prompt_embeds: torch.Tensor | None = None, negative_prompt: str | list[str] = "",
                 negative_prompt_embeds: torch.Tensor | None = None, image: torch.Tensor | None = None,
                 num_frames: int | None = None, height: int = 8, width: int = 8, guidance_scale: float = 1.0,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "np", return_dict: bool = True, prefix_latents: torch.Tensor | None = None,
                 callback_on_block_end: Callable[[int, torch.Tensor], None] | None = None):
        """Generate the whole video; `callback_on_block_end(block_index, block_latents)` runs as each block
        is finished. output_type: 'latent' ((B, C, F, h, w)), 'pt' / 'np' (frames in [0, 1]: decoded by
        the VAE, or the latents themselves mapped from [-1, 1] without one)."""
        if output_type not in ("latent", "pt", "np"):
            raise ValueError(f"`output_type` must be one of 'latent', 'pt', 'np', got {output_type!r}.")
        blocks = []
        for i, block in enumerate(self.stream(prompt, prompt_embeds=prompt_embeds, negative_prompt=negative_prompt,
                                              negative_prompt_embeds=negative_prompt_embeds, image=image,
                                              num_frames=num_frames, height=height, width=width,
                                              guidance_scale=guidance_scale, generator=generator, latents=latents,
                                              prefix_latents=prefix_latents)):
            if callback_on_block_end is not None:
                callback_on_block_end(i, block)
            blocks.append(block)
        video = torch.cat(blocks, 2)  # (B, C, F, h, w)
        if output_type != "latent":
            if self.vae is not None:
                mean, std = self._latent_norm(video)
                video = self.vae.decode((video * std + mean).to(self.vae.dtype)).sample.float()
            video = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, F, C, H, W)
            if output_type == "np":
                video = video.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, C)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return WanPipelineOutput(frames=video)
