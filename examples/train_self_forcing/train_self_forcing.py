"""Self-Forcing: DMD distillation of a bidirectional video teacher into a causal few-step student that
is trained on its own KV-cached rollouts (Huang et al. arXiv:2506.08009).

    accelerate launch examples/train_self_forcing/train_self_forcing.py --output_dir outputs/self_forcing

1. Players: the teacher (bidirectional Wan, frozen), the fake score (a trainable bidirectional copy),
   and the student: a copy made block-causal by models.causal_wan.CausalWan (`--student_init`: start
   from a CausalKD / CausalSFT folder instead of the teacher's weights).
2. Each iteration the student rolls the whole video out block by block with its own KV cache and the
   pipeline's few-step sampler (training.causal.self_forcing_rollout): no exposure bias, since the
   context it attends to is its own output, as at inference. One random exit step per iteration
   (the same on every rank) carries the gradient (each block's forward at that step).
3. Fake score: denoising loss on detached rollouts (on the other
   iterations: student_update_freq - 1 per student update); student: DMD loss of the rollout
   (teacher vs fake score at a fresh noise level, training.distribution_matching_steps.dmd_sample_loss)
   every `student_update_freq` iterations.
4. The EMA student is saved as a CausalWanPipeline whose config is the rollout's recipe, reloaded and
   benchmarked on moving digits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch
from accelerate.logging import get_logger

from diffusers_fastgen.evaluation.moving_digits import CANVAS, MOVING_DIGITS_TEACHER_PATH, NUM_FRAMES
from diffusers_fastgen.models.causal_wan import CausalWan
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
from diffusers_fastgen.training.causal import rollout_window, self_forcing_rollout, shared_exit_index
from diffusers_fastgen.training.distribution_matching_steps import (
    dmd_sample_loss,
    fake_score_sample_loss,
)
from diffusers_fastgen.training.players import log_and_checkpoint, prepare_players, resume_step, student_ema
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.teachers import PromptBatches
from diffusers_fastgen.training.video import (
    VideoBatches,
    finish_video_run,
    finish_wan_run,
    load_video_teacher,
    null_cond,
    student_t_list,
    timesteps_from_t_list,
    validate_video_student,
    video_dmd_denoisers,
    video_dmd_players,
)

logger = get_logger("train_self_forcing", log_level="INFO")


@dataclass
class SelfForcingArgs:
    """Self-Forcing DMD distillation of a bidirectional Wan teacher into a causal few-step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/self_forcing", max_train_steps=300,
                                                         train_batch_size=32, checkpointing_steps=100,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta1=0.0,
                                                                           adam_beta2=0.99, max_grad_norm=10.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=2.0))
    video: TextToVideoArgs = field(default_factory=TextToVideoArgs)  # a stock WanPipeline teacher with prompts instead
    teacher: str = MOVING_DIGITS_TEACHER_PATH  # CausalWanPipeline folder of the bidirectional moving-digits teacher
    student_init: str | None = None  # CausalWanPipeline folder initialising the student (None = the teacher)
    num_frames_per_block: int = 2  # causal block size (frames)
    num_student_steps: int = 4  # few-step schedule per block: t_i = 1 - i / K
    context_noise: int = 0  # timestep at which finished blocks are written into the cache
    fake_score_learning_rate: float = 1e-4  # the fake score's AdamW learning rate
    student_update_freq: int = 5  # of every N iterations, 1 updates the student and N - 1 the fake score
    guidance_scale: float = 3.0  # CFG of the real score; 3 = best for the shipped teacher (docs/results.md)
    dmd_t_min: float = 0.02  # DMD re-noising level s ~ U[dmd_t_min, dmd_t_max]
    dmd_t_max: float = 0.98
    eval_num_videos: int = 500  # moving-digits benchmark videos at the end (0 skips; none with a WanPipeline)
    rollout_frames: int | None = None  # latent frames of the student's rollout (default: the teacher's length)
    local_attn_size: int = -1  # the student's attention window in frames (-1 = global), saved in its recipe
    sink_size: int = 0  # frames at the start kept visible with a window
    lora: LoRAArgs = field(default_factory=LoRAArgs)  # LoRA mode: adapters on the frozen teacher

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "CausalWanPipeline", "teacher")
        check_pipeline_folder(self.student_init, "CausalWanPipeline", "student_init")
        if self.video.pretrained_model_name_or_path is not None:
            self.video.check_block(self.num_frames_per_block)
        if not os.path.isdir(self.teacher):
            raise ValueError(f"`teacher` {self.teacher!r} is not a CausalWanPipeline folder; train one with "
                             "examples/train_causal_sft/train_causal_sft.py --num_frames_per_block 8 and pass --teacher.")
        if self.num_frames_per_block < 1 or self.num_student_steps < 1 or self.student_update_freq < 1:
            raise ValueError("`num_frames_per_block`, `num_student_steps` and `student_update_freq` must be >= 1, got "
                             f"{self.num_frames_per_block}, {self.num_student_steps}, {self.student_update_freq}.")
        if not 0 <= self.context_noise < 1000:
            raise ValueError(f"`context_noise` must be in [0, 1000), got {self.context_noise}.")
        if self.guidance_scale < 1:
            raise ValueError(f"`guidance_scale` must be >= 1, got {self.guidance_scale}.")
        if not 0 <= self.dmd_t_min < self.dmd_t_max <= 1:
            raise ValueError(f"need 0 <= dmd_t_min < dmd_t_max <= 1, got {self.dmd_t_min}, {self.dmd_t_max}.")
        CausalWan.check_layout(self.num_frames_per_block, self.local_attn_size, self.sink_size)
        if self.rollout_frames is not None and (self.rollout_frames < 1 or self.rollout_frames % self.num_frames_per_block):
            raise ValueError(f"`rollout_frames` must be a positive multiple of num_frames_per_block "
                             f"({self.num_frames_per_block}), got {self.rollout_frames}.")
        if self.lora.lora_rank and self.student_init is not None:
            raise ValueError("`student_init` is a full model; with `lora_rank` the student is an adapter on the teacher.")
        if self.run.gradient_checkpointing:
            raise ValueError("`gradient_checkpointing` is not supported here: the rollout's gradient forwards read "
                             "a KV cache that has moved on by the time checkpointing would recompute them.")


def main(argv=None):
    args = parse_args(SelfForcingArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_self_forcing", args, find_unused_parameters=args.lora.lora_rank > 0)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Players: teacher (frozen), fake score (bidirectional copy), causal student.
    # a stock WanPipeline teacher (--pretrained_model_name_or_path; wan set), else the moving-digits teacher
    wan, teacher_model, prompts, embeddings, negative = load_video_teacher(args.video, args.teacher,
                                                                           guidance_scale=args.guidance_scale)
    # Trained players in fp32 whatever the frozen teacher's dtype. LoRA: adapters on the teacher itself ("base").
    modules, params = video_dmd_players(teacher_model, student_init=args.student_init, lora=args.lora)
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    critic_schedule = {**schedule, "num_training_steps": run.max_train_steps * max(args.student_update_freq - 1, 1)}
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule),
                  "fake_score": make_optimizer(params["fake_score"],
                                               replace(args.optimizer, learning_rate=args.fake_score_learning_rate),
                                               **critic_schedule)}
    modules, optimizers = prepare_players(accelerator, modules, optimizers)
    (student_opt, student_lr), (fake_opt, fake_lr) = optimizers["student"], optimizers["fake_score"]
    nets = video_dmd_denoisers(modules, args.num_frames_per_block, local_attn_size=args.local_attn_size, sink_size=args.sink_size)
    trained, teacher, fake_score, student = nets["trained"], nets["teacher"], nets["fake_score"], nets["student"]
    lora = nets["adapter"] is not None
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if wan is not None:  # the per-block schedule on the teacher's shift; prompt indices drawn per micro-batch
        t_list = wan.student_t_list(args.num_student_steps, shift=args.video.shift).to(accelerator.device)
        batches = PromptBatches(len(prompts), run.train_batch_size, seed=run.seed, rank=accelerator.process_index)
        video_shape = wan.latent_shape  # (C, F, h, w)
    else:
        t_list = student_t_list(args.num_student_steps).to(accelerator.device)
        batches = VideoBatches(run.train_batch_size, seed=run.seed, rank=accelerator.process_index)
        video_shape = (1, NUM_FRAMES, CANVAS, CANVAS)
    # Long rollouts: the student generates rollout_frames frames (with its window); the teacher and the fake score
    # see a random window of the teacher's own length of it (Self-Forcing's DMD on a streamed video).
    teacher_frames = video_shape[1]
    rollout_frames = args.rollout_frames or teacher_frames
    if rollout_frames < teacher_frames:
        raise ValueError(f"`rollout_frames` ({rollout_frames}) must be >= the teacher's {teacher_frames} latent frames.")
    rollout_shape = (video_shape[0], rollout_frames, *video_shape[2:])
    window = {"local_attn_size": args.local_attn_size, "sink_size": args.sink_size}

    step = resume_step(accelerator, run, ema, logger)  # counts student updates
    iteration = step * args.student_update_freq * run.gradient_accumulation_steps  # counts micro-batches
    batches.state_at(iteration)

    # 2. Alternating updates on the student's own rollouts.
    def validate(s):  # sample videos of the EMA student every `validation_steps`
        validate_video_student(accelerator, trained, ema, num_frames_per_block=args.num_frames_per_block,
                               denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=args.context_noise,
                               step=s, output_dir=run.output_dir, wan=wan, embeddings=embeddings,
                               adapter="student" if lora else None)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    logs = {}
    while step < run.max_train_steps:
        if wan is not None:
            index = next(batches)
            cond = wan.cond(embeddings, index, accelerator.device)
            uncond = wan.cond(negative, torch.zeros_like(index), accelerator.device)
        else:
            batch = next(batches)
            cond = {"encoder_hidden_states": batch["cond"].to(accelerator.device)}
            uncond = null_cond(cond)
        noise = torch.randn(cond["encoder_hidden_states"].shape[0], *rollout_shape, device=accelerator.device)
        iteration += 1
        exit_index = shared_exit_index(run.seed, iteration, args.num_student_steps)  # the same on every rank
        # the window the teacher and the fake score see
        frames = rollout_window(run.seed, iteration, rollout_frames, teacher_frames, args.num_frames_per_block)
        if ((iteration - 1) // run.gradient_accumulation_steps + 1) % args.student_update_freq:  # fake-score update
            with torch.no_grad():
                x0 = self_forcing_rollout(student, noise, cond, t_list, exit_index=exit_index,
                                          context_noise=args.context_noise / 1000)
            loss = fake_score_sample_loss(fake_score, x0[:, :, frames], cond)
            update(accelerator, loss, params["fake_score"], fake_opt, fake_lr, args.optimizer.max_grad_norm,
                   guard=guard, accumulator=accumulator, player="fake_score", step=step)
            logs["fake_score_loss"] = loss.detach()
            continue
        x0 = self_forcing_rollout(student, noise, cond, t_list, exit_index=exit_index,
                                  context_noise=args.context_noise / 1000)
        loss = dmd_sample_loss(x0[:, :, frames], teacher, fake_score, cond, uncond, guidance_scale=args.guidance_scale,
                               t_min=args.dmd_t_min, t_max=args.dmd_t_max)
        if not update(accelerator, loss, params["student"], student_opt, student_lr, args.optimizer.max_grad_norm,
                      guard=guard, accumulator=accumulator, step=step + 1):
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(trained)
        step += 1
        logs["dmd_loss"] = loss.detach()
        log_and_checkpoint(accelerator, run, step, logs, ema, progress, validate=validate)

    # 3. Save the EMA student with the rollout's recipe; reload and benchmark.
    if wan is not None:
        finish_wan_run(accelerator, student.model, trained, ema, wan, output_dir=run.output_dir,
                       num_frames_per_block=args.num_frames_per_block,
                       denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=args.context_noise,
                       prompts=prompts, logger=logger, adapter="student" if lora else None, **window)
        progress.summary("train_self_forcing", logger)
        return
    finish_video_run(accelerator, student.model, trained, ema, output_dir=run.output_dir,
                     num_frames_per_block=args.num_frames_per_block,
                     denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=args.context_noise,
                     eval_num_videos=args.eval_num_videos, name="Self-Forcing student" + (" (LoRA)" if lora else ""),
                     logger=logger, adapter="student" if lora else None, **window)
    progress.summary("train_self_forcing", logger)

if __name__ == "__main__":
    run_main(main)
