"""CausalSFT: diffusion-forcing training of a block-causal Wan (Chen et al. arXiv:2407.01392; CausVid
arXiv:2412.07772 sec. 3). With one block spanning the video it is plain (bidirectional) SFT — which is
how the moving-digits teacher is trained:

    accelerate launch examples/train_causal_sft/train_causal_sft.py --num_frames_per_block 8 \
        --output_dir outputs/moving_digits_teacher --max_train_steps 13000

(the shipped teacher, evaluation/assets/moving_digits_teacher, had 10,000 steps without and 3,000 with
cond_dropout 0.1; sampled with classifier-free guidance 3 it scores 97.7 % per-frame accuracy,
docs/results.md). Its clips start moving along the requested velocity; `--any_phase` draws starts anywhere on
the bounce cycle, the teacher that students streaming past 8 frames need (every window of a long video is
then a clip it was trained on; docs/results.md, long streams).

1. Each step draws moving-digit videos x0 (B, 1, 8, 16, 16), noise eps, and one logit-normal time per
   block of `num_frames_per_block` frames (independent noise levels: diffusion forcing). With
   `cond_dropout` p, a fraction p of the samples see the null conditioning (zeros), so the model also
   learns the unconditional flow that classifier-free guidance needs.
2. The model (a stock WanTransformer3DModel run by models.causal_wan.CausalWan under the block-causal
   mask) regresses the flow eps - x0 at x_t = (1 - t) x0 + t eps, t per frame (losses.denoising_loss).
3. The EMA model is saved as a CausalWanPipeline with an Euler sampler of `sample_steps` steps per
   block, reloaded and benchmarked on moving digits (benchmark.md).

On a stock WanPipeline (`--pretrained_model_name_or_path` with `--train_data_dir`, a folder of captioned
videos: GIF / MP4 / frame folders listed in metadata.jsonl) the model is that pipeline's transformer, the
videos and captions are encoded once by its VAE and UMT5 (training.video_data), `cond_dropout` swaps
captions for `--negative_prompt`, and the output is a CausalWanPipeline of stock Wan components whose Euler
sampler runs `sample_steps` steps per block on the teacher's shifted grid:

    accelerate launch examples/train_causal_sft/train_causal_sft.py --pretrained_model_name_or_path \
        Wan-AI/Wan2.1-T2V-1.3B-Diffusers --train_data_dir videos/ --num_frames 81 --height 480 --width 832 \
        --num_frames_per_block 3 --weight_dtype bf16 --gradient_checkpointing --output_dir outputs/causal_sft_wan
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.evaluation.moving_digits import NUM_FRAMES, drop_cond, moving_digits_transformer
from diffusers_fastgen.losses import denoising_loss
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.causal_wan import CausalWan
from diffusers_fastgen.parametrization import RectifiedFlow, add_noise
from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.training import (
    Accumulator,
    EMAArgs,
    LoRAArgs,
    NonFiniteGuard,
    OptimizerArgs,
    RunArgs,
    TextToVideoArgs,
    check_pipeline_folder,
    make_optimizer,
    parse_args,
    run_main,
    save_config,
    setup_accelerator,
    update,
)
from diffusers_fastgen.training.lora import DEFAULT_TARGETS, adapter_parameters, add_lora_adapters
from diffusers_fastgen.training.players import log_and_checkpoint, resume_step
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.teachers import drop_prompts
from diffusers_fastgen.training.video import (
    VideoBatches,
    WanVideoData,
    finish_video_run,
    finish_wan_run,
    sample_block_times,
    validate_video_student,
)

logger = get_logger("train_causal_sft", log_level="INFO")


@dataclass
class CausalSFTArgs:
    """Diffusion-forcing (block-causal) or bidirectional SFT of a tiny Wan on moving digits."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/causal_sft", max_train_steps=3000,
                                                         train_batch_size=32, checkpointing_steps=1000,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=5e-4, lr_warmup_steps=200,
                                                                           max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=20.0))
    init_from: str | None = None  # CausalWanPipeline folder whose transformer initialises the model; None = new
    num_frames_per_block: int = 2  # causal block size in frames (8 = the whole video: bidirectional)
    num_layers: int = 4  # new model: transformer blocks
    num_attention_heads: int = 4  # new model: heads
    attention_head_dim: int = 24  # new model: head width
    ffn_dim: int = 256  # new model: feed-forward width
    logit_mean: float = 0.0  # per-block t ~ sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0
    cond_dropout: float = 0.1  # probability of training a sample on the null conditioning (for CFG; 0 = none)
    any_phase: bool = False  # moving digits start anywhere on the bounce cycle (a teacher for long streams; sample_motion)
    sample_steps: int = 50  # Euler steps per block of the saved sampler
    eval_num_videos: int = 500  # moving-digits benchmark videos at the end (0 skips; none with a WanPipeline)
    video: TextToVideoArgs = field(default_factory=TextToVideoArgs)  # a stock WanPipeline and captioned videos instead
    lora: LoRAArgs = field(default_factory=LoRAArgs)  # LoRA mode: adapters on the frozen teacher

    def __post_init__(self):
        check_pipeline_folder(self.init_from, "CausalWanPipeline", "init_from")
        if self.lora.lora_rank and self.init_from is None and self.video.pretrained_model_name_or_path is None:
            raise ValueError("`lora_rank` adapts a trained model: give `init_from` (or a WanPipeline).")
        if self.video.pretrained_model_name_or_path is not None:
            if self.video.train_data_dir is None:
                raise ValueError("`pretrained_model_name_or_path` needs `train_data_dir` here: CausalSFT trains on "
                                 "captioned videos.")
            if self.init_from is not None:
                raise ValueError("`init_from` is for the moving-digits model; a WanPipeline starts from its own transformer.")
            if self.any_phase:
                raise ValueError("`any_phase` is a moving-digits option; a WanPipeline trains on its captioned videos.")
            if self.num_frames_per_block < 1:
                raise ValueError(f"`num_frames_per_block` must be >= 1, got {self.num_frames_per_block}.")
            self.video.check_block(self.num_frames_per_block)
        elif self.num_frames_per_block < 1 or NUM_FRAMES % self.num_frames_per_block:
            raise ValueError(f"`num_frames_per_block` must divide the {NUM_FRAMES} frames, got {self.num_frames_per_block}.")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"`cond_dropout` must be in [0, 1), got {self.cond_dropout}.")
        if self.logit_std <= 0:
            raise ValueError(f"`logit_std` must be > 0, got {self.logit_std}.")
        if self.sample_steps < 1 or self.eval_num_videos < 0:
            raise ValueError(f"need sample_steps >= 1 and eval_num_videos >= 0, got {self.sample_steps}, "
                             f"{self.eval_num_videos}.")
        if self.run.mixed_precision != "no" and self.run.mixed_precision not in ("bf16", "fp16"):
            raise ValueError(f"`mixed_precision` must be no / bf16 / fp16, got {self.run.mixed_precision!r}.")


def causal_sft_step(causal: Denoiser, x0: torch.Tensor, cond: dict, *, num_frames_per_block: int, logit_mean: float,
                    logit_std: float) -> torch.Tensor:
    """Diffusion-forcing denoising loss (mean over the batch): one noise level per block."""
    eps = torch.randn_like(x0)
    t = sample_block_times(x0.shape[0], x0.shape[2], num_frames_per_block, mean=logit_mean, std=logit_std,
                           device=x0.device)  # (B, F)
    x_t = add_noise(causal.process, x0, eps, t)
    prediction = causal(x_t, t, cond, target="flow")
    return denoising_loss(prediction, x0, eps, t, process=causal.process, prediction_type="flow").mean()


def main(argv=None):
    args = parse_args(CausalSFTArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_causal_sft", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Model, optimizer, data (a WanPipeline's transformer and its encoded videos, or the moving-digits model).
    data = WanVideoData(args.video, accelerator, run) if args.video.pretrained_model_name_or_path else None
    if data is not None:  # trained in fp32 whatever the frozen parts' dtype (LoRA: the adapter only)
        model = data.teacher.model if args.lora.lora_rank else data.teacher.model.float()
    elif args.init_from:
        model = CausalWanPipeline.from_pretrained(args.init_from).transformer
    else:
        torch.manual_seed(run.seed)
        model = moving_digits_transformer(args.num_layers, args.num_attention_heads, args.attention_head_dim,
                                          args.ffn_dim)
    adapter = "student" if args.lora.lora_rank else None
    if adapter:  # fp32 adapter weights on the frozen model
        add_lora_adapters(model, [adapter], rank=args.lora.lora_rank, alpha=args.lora.lora_alpha,
                          target_modules=args.lora.lora_target_modules or DEFAULT_TARGETS)
        for p in adapter_parameters(model, adapter):
            p.data = p.data.float()
    if run.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizer, lr_scheduler = make_optimizer(trainable, args.optimizer, **schedule)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMA(model, schedule=args.ema.ema_schedule, decay=args.ema.ema_decay, halflife_kimg=args.ema.ema_halflife_kimg,
              batch_size=run.train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps,
              gamma=args.ema.ema_gamma, start_iter=args.ema.ema_start_iter,
              parameters=[n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
              if adapter else None)
    causal = Denoiser(CausalWan(model, args.num_frames_per_block), RectifiedFlow(), "flow")
    batches = data if data is not None else VideoBatches(run.train_batch_size, seed=run.seed,
                                                          rank=accelerator.process_index, any_phase=args.any_phase)
    # The saved Euler sampler: linear in t for moving digits, on the teacher's shifted grid for a WanPipeline.
    sample_timesteps = ((data.teacher.student_t_list(args.sample_steps, shift=args.video.shift) * 1000).tolist()
                        if data is not None else torch.linspace(1000, 0, args.sample_steps + 1)[:-1].tolist())

    step = resume_step(accelerator, run, ema, logger)
    batches.state_at(step * run.gradient_accumulation_steps)

    # 2. The loop.
    def validate(s):  # sample videos of the EMA model every `validation_steps`
        validate_video_student(accelerator, model, ema, num_frames_per_block=args.num_frames_per_block,
                               denoising_timesteps=sample_timesteps, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                               step=s, output_dir=run.output_dir, wan=data and data.teacher,
                               embeddings=data and data.validation_embeddings(), adapter=adapter)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    while step < run.max_train_steps:
        if data is not None:  # captioned Wan latents; dropped captions become the negative prompt
            x0, cond, uncond = data.next(accelerator.device)
            cond = drop_prompts(cond, uncond, args.cond_dropout)
        else:
            batch = next(batches)
            x0 = batch["video"].to(accelerator.device)
            text = batch["cond"].to(accelerator.device)
            cond = {"encoder_hidden_states": drop_cond(text, args.cond_dropout) if args.cond_dropout else text}
        with accelerator.autocast():
            loss = causal_sft_step(causal, x0, cond, num_frames_per_block=args.num_frames_per_block,
                                   logit_mean=args.logit_mean, logit_std=args.logit_std)
        if not update(accelerator, loss, trainable, optimizer, lr_scheduler, args.optimizer.max_grad_norm,
                      guard=guard, accumulator=accumulator, step=step + 1):
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(model)
        step += 1
        log_and_checkpoint(accelerator, run, step, {"loss": loss.detach(), "lr": lr_scheduler.get_last_lr()[0]}, ema, progress,
                           validate=validate)

    # 3. Save the EMA model with its Euler sampler; reload and benchmark (moving digits).
    if data is not None:
        finish_wan_run(accelerator, causal.model, model, ema, data.teacher, output_dir=run.output_dir,
                       num_frames_per_block=args.num_frames_per_block, denoising_timesteps=sample_timesteps,
                       context_noise=0, prompts=data.prompts, logger=logger,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), adapter=adapter)
        progress.summary("train_causal_sft", logger)
        return
    name = "bidirectional SFT (teacher)" if args.num_frames_per_block == NUM_FRAMES else "CausalSFT student"
    finish_video_run(accelerator, causal.model, model, ema, output_dir=run.output_dir,
                     num_frames_per_block=args.num_frames_per_block,
                     denoising_timesteps=sample_timesteps,
                     scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), eval_num_videos=args.eval_num_videos,
                     name=name, logger=logger, adapter=adapter, any_phase=args.any_phase)

    progress.summary("train_causal_sft", logger)

if __name__ == "__main__":
    run_main(main)
