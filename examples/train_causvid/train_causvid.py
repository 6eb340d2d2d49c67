"""CausVid: DMD distillation of a bidirectional video teacher into a causal few-step student trained
on diffusion-forcing inputs (Yin et al. arXiv:2412.07772).

    accelerate launch examples/train_causvid/train_causvid.py --output_dir outputs/causvid

1. Players: the teacher (bidirectional Wan, frozen), the fake score (a trainable bidirectional copy),
   and the student: a copy made block-causal by models.causal_wan.CausalWan (`--student_init`: start
   from a CausalKD / CausalSFT folder, CausVid's ODE initialisation, instead of the teacher's weights).
2. Student inputs: real videos noised per block at a random point of the student's few-step schedule
   (training.causal.diffusion_forcing_inputs); the student predicts x0 of all blocks in one
   block-causal pass (its context is noised real data, not its own output: CausVid's exposure bias,
   which Self-Forcing removes).
3. Fake score: denoising loss on the student's x0 (on the other
   iterations: student_update_freq - 1 per student update); student: DMD loss (teacher vs fake
   score at a fresh noise level) every `student_update_freq` iterations — the DMD2 step functions of
   training.distribution_matching_steps, unchanged, with per-frame times.
4. The EMA student is saved as a CausalWanPipeline (its few-step schedule per block), reloaded and
   benchmarked on moving digits.

On a stock WanPipeline (`--pretrained_model_name_or_path` with `--train_data_dir`, captioned videos) the
teacher is that pipeline's transformer (frozen, in `--weight_dtype`), the real videos and captions are
encoded once by its VAE and UMT5, CFG runs against `--negative_prompt`, the student's schedule sits on the
teacher's shift, and the output is a CausalWanPipeline of stock Wan components:

    accelerate launch examples/train_causvid/train_causvid.py --pretrained_model_name_or_path \
        Wan-AI/Wan2.1-T2V-1.3B-Diffusers --train_data_dir videos/ --student_init outputs/causal_kd_wan \
        --num_frames_per_block 3 --guidance_scale 6 --weight_dtype bf16 --output_dir outputs/causvid_wan
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

from accelerate.logging import get_logger

from diffusers_fastgen.evaluation.moving_digits import MOVING_DIGITS_TEACHER_PATH
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
from diffusers_fastgen.training.causal import diffusion_forcing_inputs
from diffusers_fastgen.training.distribution_matching_steps import fake_score_step, student_step
from diffusers_fastgen.training.players import log_and_checkpoint, prepare_players, resume_step, student_ema
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.video import (
    VideoBatches,
    WanVideoData,
    finish_video_run,
    finish_wan_run,
    load_video_transformer,
    null_cond,
    student_t_list,
    timesteps_from_t_list,
    validate_video_student,
    video_dmd_denoisers,
    video_dmd_players,
)

logger = get_logger("train_causvid", log_level="INFO")


@dataclass
class CausVidArgs:
    """CausVid DMD distillation of a bidirectional Wan teacher into a causal few-step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/causvid", max_train_steps=300,
                                                         train_batch_size=32, checkpointing_steps=100,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta1=0.0,
                                                                           adam_beta2=0.99, max_grad_norm=10.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=2.0))
    teacher: str = MOVING_DIGITS_TEACHER_PATH  # CausalWanPipeline folder of the bidirectional teacher
    student_init: str | None = None  # CausalWanPipeline folder initialising the student (None = the teacher)
    num_frames_per_block: int = 2  # causal block size (frames)
    num_student_steps: int = 4  # few-step schedule per block: t_i = 1 - i / K
    clean_blocks: bool = True  # blocks also drawn clean (t = 0), as the inference cache holds them (CausVid's list has 0)
    context_noise: int = 0  # timestep at which finished blocks are written into the cache
    fake_score_learning_rate: float = 1e-4  # the fake score's AdamW learning rate
    student_update_freq: int = 5  # of every N iterations, 1 updates the student and N - 1 the fake score
    guidance_scale: float = 3.0  # CFG of the real score; 3 = best for the shipped teacher (docs/results.md)
    dmd_t_min: float = 0.02  # DMD re-noising level s ~ U[dmd_t_min, dmd_t_max]
    dmd_t_max: float = 0.98
    eval_num_videos: int = 500  # moving-digits benchmark videos at the end (0 skips; none with a WanPipeline)
    video: TextToVideoArgs = field(default_factory=TextToVideoArgs)  # a stock WanPipeline and captioned videos instead
    lora: LoRAArgs = field(default_factory=LoRAArgs)  # LoRA mode: adapters on the frozen teacher

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "CausalWanPipeline", "teacher")
        check_pipeline_folder(self.student_init, "CausalWanPipeline", "student_init")
        if self.lora.lora_rank and self.student_init is not None:
            raise ValueError("`student_init` is a full model; with `lora_rank` the student is an adapter on the teacher.")
        if self.lora.lora_rank and self.run.gradient_checkpointing:
            raise ValueError("`gradient_checkpointing` with `lora_rank`: the student and the bidirectional players share "
                             "one module, so a recomputation could run the other's attention.")
        if self.video.pretrained_model_name_or_path is not None:
            if self.video.train_data_dir is None:
                raise ValueError("`pretrained_model_name_or_path` needs `train_data_dir` here: CausVid's student inputs "
                                 "are noised real videos.")
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


def main(argv=None):
    args = parse_args(CausVidArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_causvid", args, find_unused_parameters=args.lora.lora_rank > 0)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Players: teacher (frozen), fake score (bidirectional copy), causal student. A WanPipeline teacher comes
    # with its encoded videos (data); trained players in fp32 whatever the frozen teacher's dtype.
    data = (WanVideoData(args.video, accelerator, run, guidance_scale=args.guidance_scale)
            if args.video.pretrained_model_name_or_path else None)
    teacher_model = (data.teacher.model if data is not None else load_video_transformer(args.teacher)).requires_grad_(False)
    modules, params = video_dmd_players(teacher_model, student_init=args.student_init, lora=args.lora)
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    critic_schedule = {**schedule, "num_training_steps": run.max_train_steps * max(args.student_update_freq - 1, 1)}
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule),
                  "fake_score": make_optimizer(params["fake_score"],
                                               replace(args.optimizer, learning_rate=args.fake_score_learning_rate),
                                               **critic_schedule)}
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    (student_opt, student_lr), (fake_opt, fake_lr) = optimizers["student"], optimizers["fake_score"]
    nets = video_dmd_denoisers(modules, args.num_frames_per_block)
    trained, teacher, fake_score, student = nets["trained"], nets["teacher"], nets["fake_score"], nets["student"]
    lora = nets["adapter"] is not None
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if data is not None:  # the per-block schedule on the teacher's shift
        t_list = data.teacher.student_t_list(args.num_student_steps, shift=args.video.shift).to(accelerator.device)
        batches = data
    else:
        t_list = student_t_list(args.num_student_steps).to(accelerator.device)
        batches = VideoBatches(run.train_batch_size, seed=run.seed, rank=accelerator.process_index)

    step = resume_step(accelerator, run, ema, logger)  # counts student updates
    iteration = step * args.student_update_freq * run.gradient_accumulation_steps  # counts micro-batches
    batches.state_at(iteration)

    # 2. Alternating updates on diffusion-forcing inputs.
    def validate(s):  # sample videos of the EMA student every `validation_steps`
        validate_video_student(accelerator, trained, ema, num_frames_per_block=args.num_frames_per_block,
                               denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=args.context_noise,
                               step=s, output_dir=run.output_dir, wan=data and data.teacher,
                               embeddings=data and data.validation_embeddings(), adapter="student" if lora else None)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    logs = {}
    while step < run.max_train_steps:
        if data is not None:
            x0, cond, uncond = data.next(accelerator.device)
        else:
            batch = next(batches)
            x0, cond = batch["video"].to(accelerator.device), {"encoder_hidden_states": batch["cond"].to(accelerator.device)}
            uncond = null_cond(cond)
        x_t, t = diffusion_forcing_inputs(x0, t_list, args.num_frames_per_block, include_clean=args.clean_blocks)
        iteration += 1
        if ((iteration - 1) // run.gradient_accumulation_steps + 1) % args.student_update_freq:  # fake-score update
            loss = fake_score_step(student, fake_score, x_t, t, cond)
            update(accelerator, loss, params["fake_score"], fake_opt, fake_lr, args.optimizer.max_grad_norm,
                   guard=guard, accumulator=accumulator, player="fake_score", step=step)
            logs["fake_score_loss"] = loss.detach()
            continue
        loss = student_step(student, teacher, fake_score, x_t, t, cond, uncond, guidance_scale=args.guidance_scale,
                            t_min=args.dmd_t_min, t_max=args.dmd_t_max)
        if not update(accelerator, loss, params["student"], student_opt, student_lr, args.optimizer.max_grad_norm,
                      guard=guard, accumulator=accumulator, step=step + 1):
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(trained)
        step += 1
        logs["dmd_loss"] = loss.detach()
        log_and_checkpoint(accelerator, run, step, logs, ema, progress, validate=validate)

    # 3. Save the EMA student with its few-step recipe; reload and benchmark (moving digits).
    if data is not None:
        finish_wan_run(accelerator, student.model, trained, ema, data.teacher, output_dir=run.output_dir,
                       num_frames_per_block=args.num_frames_per_block,
                       denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=args.context_noise,
                       prompts=data.prompts, logger=logger, adapter="student" if lora else None)
        progress.summary("train_causvid", logger)
        return
    finish_video_run(accelerator, student.model, trained, ema, output_dir=run.output_dir, adapter="student" if lora else None,
                     num_frames_per_block=args.num_frames_per_block,
                     denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=args.context_noise,
                     eval_num_videos=args.eval_num_videos, name="CausVid student", logger=logger)
    progress.summary("train_causvid", logger)

if __name__ == "__main__":
    run_main(main)
