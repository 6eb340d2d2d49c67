"""Stateless helpers the causal-video scripts share: moving-digits batches, per-block times, teacher
ODE pairs, saving and benchmarking a CausalWanPipeline student."""

from __future__ import annotations

import copy
import os

import torch
from diffusers import WanPipeline, WanTransformer3DModel

from ..evaluation.moving_digits import (
    CANVAS,
    NUM_FRAMES,
    MovingDigits,
    MovingDigitsReference,
    benchmark_video_pipeline,
    markdown_rows,
    moving_digits_cond,
    moving_digits_null_cond,
    sample_motion,
)
from ..guidance import guided_prediction
from ..models import Denoiser
from ..models.causal_wan import CausalWan
from ..models.unwrap import unwrap_model
from ..parametrization import RectifiedFlow
from ..pipelines import CausalWanPipeline
from ..schedulers import causal_scheduler
from ..timesteps import sample_logit_normal
from .accelerate_setup import check_replicas_in_sync
from .causal import step_generator
from .distribution_matching_steps import build_players
from .lora import BASE, merged_copy
from .nonfinite import check_finite
from .teachers import PromptBatches, lora_config, lora_state
from .validation import log_image_grid, save_image_grid
from .video_data import video_shards
from .video_teachers import WanTeacher


class VideoBatches:
    """Moving-digits batches; batch `i` on rank `r` is a pure function of (seed, r, i), so a resumed run
    sees the batches it would have seen."""

    def __init__(self, batch_size: int, *, seed: int = 0, rank: int = 0, split: str = "train", any_phase: bool = False):
        self.data = MovingDigits(split, any_phase=any_phase)
        self.batch_size, self.seed, self.rank, self.index = batch_size, seed, rank, 0

    def state_at(self, index: int) -> None:
        self.index = index

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = step_generator(self.seed, self.index, self.rank)
        self.index += 1
        return self.data.sample(self.batch_size, g)


def null_cond(cond: dict) -> dict:
    """The unconditional counterpart of a moving-digits conditioning dict (zeros, same batch and device)."""
    text = cond["encoder_hidden_states"]
    return {"encoder_hidden_states": moving_digits_null_cond(text.shape[0]).to(text)}


def sample_block_times(b: int, num_frames: int, num_frames_per_block: int, *, mean: float = 0.0, std: float = 1.0,
                       device=None) -> torch.Tensor:
    """Diffusion forcing's per-frame times (B, F): one logit-normal t per block, shared by its frames."""
    if num_frames % num_frames_per_block:
        raise ValueError(f"`num_frames` ({num_frames}) must be a multiple of num_frames_per_block "
                         f"({num_frames_per_block}).")
    t = sample_logit_normal((b, num_frames // num_frames_per_block), mean=mean, std=std, device=device)
    return t.repeat_interleave(num_frames_per_block, dim=1)


def timesteps_from_t_list(t_list) -> list[float]:
    """[1.0, 0.75, 0.5, 0.25] -> [1000.0, 750.0, 500.0, 250.0] model timesteps (the pipeline's config)."""
    return [float(t) * 1000.0 for t in t_list]


@torch.no_grad()
def teacher_ode(velocity, noise: torch.Tensor, cond: dict, t_grid: torch.Tensor, *, uncond: dict | None = None,
                guidance_scale: float = 1.0) -> list[torch.Tensor]:
    """Euler ODE of the flow x' = v(x, t) from t_grid[0] (noise) down to t_grid[-1]; the states at every
    grid point. velocity: a Denoiser-like callable (x, t, cond, target='flow'); guidance_scale > 1 follows
    the classifier-free-guided flow against `uncond`."""
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("`guidance_scale` != 1 needs `uncond`.")
    x, states = noise, [noise]
    for t, t_next in zip(t_grid[:-1], t_grid[1:]):
        x = x + (t_next - t) * guided_prediction(velocity, x, t, cond, uncond, guidance_scale, target="flow")
        states.append(x)
    return states


def save_video_student(model, output_dir: str, *, num_frames_per_block: int, denoising_timesteps, context_noise: int = 0,
                       local_attn_size: int = -1, sink_size: int = 0, scheduler=None) -> CausalWanPipeline:
    """Save `model` (a WanTransformer3DModel) as a CausalWanPipeline folder with its sampling recipe
    (NonFiniteError, before writing, if a weight is NaN or inf)."""
    check_finite(model, "the video student")
    pipe = CausalWanPipeline(transformer=model, scheduler=scheduler or causal_scheduler(),
                             num_frames_per_block=num_frames_per_block, denoising_timesteps=list(denoising_timesteps),
                             context_noise=context_noise, local_attn_size=local_attn_size, sink_size=sink_size)
    pipe.save_pretrained(output_dir)
    return pipe


def benchmark_video_folder(output_dir: str, *, name: str, num_videos: int, logger=None, any_phase: bool = False) -> str:
    """Reload the saved folder, benchmark it on moving digits, write `benchmark.md` beside it (`any_phase`: see
    `benchmark_video_pipeline`)."""
    pipe = CausalWanPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    row = {"model": name, "steps": len(pipe.config.denoising_timesteps),
           **benchmark_video_pipeline(pipe, MovingDigitsReference(), num_videos=num_videos, any_phase=any_phase)}
    table = markdown_rows([row])
    with open(os.path.join(output_dir, "benchmark.md"), "w") as f:
        f.write(table + "\n")
    if logger is not None:
        logger.info("moving-digits benchmark (%d videos):\n%s", num_videos, table)
    print(table)
    return table


@torch.no_grad()
def validate_video_student(accelerator, model, ema, *, num_frames_per_block: int, denoising_timesteps, step: int,
                           output_dir: str, context_noise: int = 0, scheduler=None, wan: WanTeacher | None = None,
                           embeddings: dict | None = None, adapter: str | None = None) -> None:
    """Videos of the EMA student with its recipe, one row of frames each: samples/step_<step>.png and the
    trackers. Moving digits: four videos (classes 0-3). A WanPipeline teacher (`wan`): the first two rows of
    `embeddings`, decoded by the teacher's VAE. Sampled from a fresh WanTransformer3DModel holding the EMA
    weights, so the training model (its causal processors, its weights) is not touched; the global RNG is
    forked, so training draws the same numbers with or without validation. `adapter`: LoRA mode, the student is
    that adapter of `model` (merged into a plain copy)."""

    trained = accelerator.unwrap_model(model)
    if adapter is not None:
        fresh = merged_copy(trained, adapter, ema).to(trained.device)
    else:
        fresh = WanTransformer3DModel.from_config(trained.config).to(trained.device)
        fresh.load_state_dict(trained.state_dict())
        ema.copy_to(fresh)
    pipe = CausalWanPipeline(transformer=fresh.float().eval(), scheduler=scheduler or causal_scheduler(),
                             vae=None if wan is None else wan.pipe.vae, num_frames_per_block=num_frames_per_block,
                             denoising_timesteps=list(denoising_timesteps), context_noise=context_noise)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        if wan is None:
            _, v = sample_motion(4, g)
            noise = torch.randn(4, 1, NUM_FRAMES, CANVAS, CANVAS, generator=g)
            videos = pipe(prompt_embeds=moving_digits_cond(torch.arange(4), v), latents=noise, height=CANVAS,
                          width=CANVAS, output_type="latent", generator=g).frames  # (4, 1, F, H, W) in [-1, 1]
            frames, nrow = videos.transpose(1, 2).flatten(0, 1), NUM_FRAMES  # (4 * F, 1, H, W), one video per row
        else:
            _, f, h, w = wan.latent_shape
            text = embeddings["encoder_hidden_states"][:2].to(trained.device)
            videos = pipe(prompt_embeds=text, num_frames=f, height=h, width=w, output_type="pt",
                          generator=g).frames  # (B, frames, 3, H, W) in [0, 1]
            frames, nrow = videos.flatten(0, 1) * 2 - 1, videos.shape[1]
    save_image_grid(frames, os.path.join(output_dir, "samples", f"step_{step:06d}.png"), nrow=nrow, upscale=4)
    log_image_grid(accelerator, frames, step, tag="student", nrow=nrow)


class WanVideoData:
    """The real-video path of a causal-video script on a stock WanPipeline (`TextToVideoArgs` with
    `train_data_dir`): the teacher, its captioned videos encoded once (`video_data.video_shards`: latents and
    UMT5 embeddings) and the negative prompt's embedding; UMT5 is released afterwards. Per micro-batch
    (x0 (B, C, f, h, w), cond, uncond), rows drawn by index as a pure function of (seed, rank, iteration)."""

    def __init__(self, video, accelerator, run, *, guidance_scale: float = 1.0):
        self.teacher = WanTeacher(video.pretrained_model_name_or_path, num_frames=video.num_frames, height=video.height,
                                  width=video.width, revision=video.revision, variant=video.variant,
                                  cache_dir=video.cache_dir, weight_dtype=video.weight_dtype,
                                  guidance_scale=guidance_scale, max_sequence_length=video.max_sequence_length)
        self.shards = video_shards(self.teacher, accelerator, train_data_dir=video.train_data_dir,
                                   caption_column=video.caption_column, seed=run.seed,
                                   out_dir=video.latents_cache or os.path.join(run.output_dir, "latents"))
        self.negative = {k: v.detach().cpu() for k, v in self.teacher._encode([video.negative_prompt]).items()}
        self.prompts = self.shards.first_captions or [""]
        self.teacher.release_text_encoders()
        self.batches = PromptBatches(len(self.shards), run.train_batch_size, seed=run.seed, rank=accelerator.process_index)

    def state_at(self, iteration: int) -> None:
        self.batches.state_at(iteration)

    def validation_embeddings(self, n: int = 2) -> dict:
        rows = self.shards.rows(torch.arange(min(n, len(self.shards))))
        rows.pop("latents")
        return rows

    def next(self, device):
        index = next(self.batches)
        rows = self.shards.rows(index)
        x0 = rows.pop("latents").to(device)
        uncond = self.teacher.cond(self.negative, torch.zeros(len(index), dtype=torch.long), device)
        return x0, self.teacher.cond(rows, None, device), uncond


def video_dmd_players(teacher_model, *, student_init: str | None, lora) -> tuple[dict, dict]:
    """(modules, {player: parameters}) of a video DMD script (CausVid, Self-Forcing): full mode, the frozen
    teacher with fp32 copies as student (from `student_init` if given) and fake score; LoRA mode (`lora`, a
    LoRAArgs), both as adapters on the teacher itself ("base")."""
    if lora.lora_rank:
        return build_players(teacher_model, lora_rank=lora.lora_rank, lora_alpha=lora.lora_alpha,
                             lora_target_modules=lora.lora_target_modules)
    student_model = load_video_transformer(student_init) if student_init else copy.deepcopy(teacher_model)
    modules = {"teacher": teacher_model, "student": student_model.float().requires_grad_(True),
               "fake_score": copy.deepcopy(teacher_model).float().requires_grad_(True)}
    return modules, {n: list(modules[n].parameters()) for n in ("student", "fake_score")}


def video_dmd_denoisers(modules: dict, num_frames_per_block: int, **causal_kwargs) -> dict:
    """{"trained": the module holding the student's weights, "teacher", "fake_score", "student": Denoisers, "adapter":
    the student's adapter or None} over the prepared modules of `video_dmd_players`. In LoRA mode one module serves
    all three: the causal student only inside its CausalWan calls."""
    rf = RectifiedFlow()
    if "base" in modules:
        base = modules["base"]
        return {"trained": base, "adapter": "student", "teacher": Denoiser(base, rf, "flow", adapter=BASE),
                "fake_score": Denoiser(base, rf, "flow", adapter="fake_score"),
                "student": Denoiser(CausalWan(base, num_frames_per_block, **causal_kwargs), rf, "flow", adapter="student")}
    return {"trained": modules["student"], "adapter": None, "teacher": Denoiser(modules["teacher"], rf, "flow"),
            "fake_score": Denoiser(modules["fake_score"], rf, "flow"),
            "student": Denoiser(CausalWan(modules["student"], num_frames_per_block, **causal_kwargs), rf, "flow")}


def load_video_teacher(video, digits_teacher: str, *, guidance_scale: float = 1.0):
    """A video script's frozen teacher: (WanTeacher or None, teacher model, prompts, embeddings, negative) — the
    stock WanPipeline of `video.pretrained_model_name_or_path` when given (`WanTeacher.from_args`), else the
    moving-digits transformer in `digits_teacher` (prompts and embeddings None)."""
    if video.pretrained_model_name_or_path is None:
        return None, load_video_transformer(digits_teacher).requires_grad_(False), None, None, None
    wan, prompts, embeddings, negative = WanTeacher.from_args(video, guidance_scale=guidance_scale)
    return wan, wan.model.requires_grad_(False), prompts, embeddings, negative


def load_video_transformer(path: str):
    """The stock WanTransformer3DModel of a CausalWanPipeline folder (no causal processors installed)."""

    return WanTransformer3DModel.from_pretrained(path, subfolder="transformer")


def student_t_list(num_student_steps: int) -> torch.Tensor:
    """The per-block few-step schedule t_i = 1 - i / K, i < K (K = 4: [1, 0.75, 0.5, 0.25], Self-Forcing's)."""
    if num_student_steps < 1:
        raise ValueError(f"`num_student_steps` must be >= 1, got {num_student_steps}.")
    return 1.0 - torch.arange(num_student_steps, dtype=torch.float32) / num_student_steps


def final_student(causal, model, ema, adapter: str | None, output_dir: str):
    """The EMA student as a plain WanTransformer3DModel, after Wan's processors are restored. LoRA mode
    (`adapter`): the adapter merged into a copy of the base, and its weights also written to `output_dir` as
    `pytorch_lora_weights.safetensors` (WanPipeline's `save_lora_weights` format, for `load_lora_weights`)."""
    causal.remove()
    base = unwrap_model(model)
    ema.copy_to(base)  # LoRA mode: the EMA adapter weights, for the LoRA file and the merge
    if adapter is None:
        return base
    os.makedirs(output_dir, exist_ok=True)
    WanPipeline.save_lora_weights(output_dir, transformer_lora_layers=lora_state(base, adapter),
                                  transformer_lora_adapter_metadata=lora_config(base, adapter))
    return merged_copy(base, adapter)


def finish_video_run(accelerator, causal, model, ema, *, output_dir: str, num_frames_per_block: int,
                     denoising_timesteps, eval_num_videos: int, name: str, logger, context_noise: int = 0,
                     scheduler=None, adapter: str | None = None, local_attn_size: int = -1, sink_size: int = 0,
                     any_phase: bool = False) -> None:
    """End of a causal-video run: restore Wan's processors on the trained model, copy the EMA weights
    into it, save it as a CausalWanPipeline with its sampling recipe, reload and benchmark it (rank 0),
    and tear the process group down on all ranks together."""
    accelerator.wait_for_everyone()
    check_replicas_in_sync(accelerator, list(model.parameters()))  # DDP: every rank must hold the same weights
    if accelerator.is_main_process:
        final = final_student(causal, model, ema, adapter, output_dir)
        save_video_student(final, output_dir, num_frames_per_block=num_frames_per_block,
                           denoising_timesteps=denoising_timesteps, context_noise=context_noise, scheduler=scheduler,
                           local_attn_size=local_attn_size, sink_size=sink_size)
        logger.info("saved %s to %s", name, output_dir)
        if eval_num_videos:
            benchmark_video_folder(output_dir, name=name, num_videos=eval_num_videos, logger=logger, any_phase=any_phase)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def finish_wan_run(accelerator, causal, model, ema, teacher, *, output_dir: str, num_frames_per_block: int,
                   denoising_timesteps, context_noise: int, prompts, logger, scheduler=None,
                   adapter: str | None = None, local_attn_size: int = -1, sink_size: int = 0) -> None:
    """End of a causal-video run on a WanPipeline teacher: replicas agree, the EMA student is saved as a
    CausalWanPipeline of stock Wan components with its recipe (rank 0), and the process group goes down on all
    ranks together."""
    accelerator.wait_for_everyone()
    check_replicas_in_sync(accelerator, list(model.parameters()))
    if accelerator.is_main_process:
        final = final_student(causal, model, ema, adapter, output_dir)
        teacher.save_student(output_dir, final, num_frames_per_block=num_frames_per_block,
                             denoising_timesteps=denoising_timesteps, context_noise=context_noise, prompts=list(prompts),
                             scheduler=scheduler, local_attn_size=local_attn_size, sink_size=sink_size)
        logger.info("saved the causal student to %s", output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
