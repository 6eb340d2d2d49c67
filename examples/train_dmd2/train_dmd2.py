"""DMD2: distribution matching distillation of a teacher into a 1- or few-step student.

Three players (Yin et al., DMD2, arXiv:2405.14867):
  teacher     frozen; its (CFG) x0 prediction is the "real" score.
  fake_score  a denoiser trained on the student's samples: the student distribution's score.
  student     trained with dmd_generator_loss, every `student_update_freq` iterations
              (two time-scale update rule); the fake score is trained every iteration.
The student's inputs are its schedule's points: pure noise at t_list[0], and for multi-step
students the state reached by running itself (backward simulation) or noised real data.

    accelerate launch examples/train_dmd2/train_dmd2.py --output_dir outputs/dmd2
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.evaluation.digits_benchmark import write_benchmark
from diffusers_fastgen.guidance import guided_prediction
from diffusers_fastgen.losses import denoising_loss
from diffusers_fastgen.losses.distribution_matching import dmd_generator_loss
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.parametrization import add_noise, process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_match_sde_scheduler, t_list_from_scheduler
from diffusers_fastgen.timesteps import sample_uniform
from diffusers_fastgen.training import (
    EMAArgs,
    OptimizerArgs,
    RunArgs,
    load_checkpoint,
    log_image_grid,
    make_optimizer,
    parse_args,
    resolve_checkpoint,
    save_checkpoint,
    save_config,
    save_image_grid,
    setup_accelerator,
)
from diffusers_fastgen.training.data import InfiniteBatches, load_digits_arrays

logger = logging.getLogger("train_dmd2")


@dataclass
class DMD2Args:
    """DMD2 distillation of a teacher pipeline into a few-step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/dmd2", max_train_steps=1000,
                                                         train_batch_size=128, checkpointing_steps=500,
                                                         validation_steps=250))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=2e-5, adam_beta1=0.0,
                                                                           adam_beta2=0.999, max_grad_norm=10.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=10.0))
    teacher: str = DIGITS_TEACHER_PATH  # teacher pipeline folder (default: the shipped digits teacher)
    num_student_steps: int = 1  # the student's step count (t_list length - 1)
    shift: float = 1.0  # student schedule: sigmas = shift(linspace(1, 0, N + 1)), fresh-noise re-noising
    guidance_scale: float = 1.0  # teacher CFG in the real score
    fake_score_learning_rate: float = 2e-5  # AdamW learning rate of the fake score
    student_update_freq: int = 5  # student step every N iterations (fake score every iteration)
    dmd_t_min: float = 0.02  # the DMD loss noises student samples at t ~ U[dmd_t_min, dmd_t_max]
    dmd_t_max: float = 0.98
    backward_simulation: bool = True  # multi-step: inputs from the student's own rollout (else noised data)
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        if self.num_student_steps < 1:
            raise ValueError(f"`num_student_steps` must be >= 1, got {self.num_student_steps}.")
        if self.student_update_freq < 1:
            raise ValueError(f"`student_update_freq` must be >= 1, got {self.student_update_freq}.")
        if not 0.0 <= self.dmd_t_min < self.dmd_t_max <= 1.0:
            raise ValueError(f"need 0 <= dmd_t_min < dmd_t_max <= 1, got {self.dmd_t_min}, {self.dmd_t_max}.")
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        if self.fake_score_learning_rate <= 0:
            raise ValueError(f"`fake_score_learning_rate` must be > 0, got {self.fake_score_learning_rate}.")


def student_inputs(student: Denoiser, noise, labels, t_list, real_x0, *, backward_simulation: bool):
    """(x_t, t) at a uniformly chosen point of the student's schedule, no gradient.

    Point 0 is the noise itself. Point i > 0 is reached by the student's own i-step rollout
    (backward simulation, DMD2 Sec. 4.5) or by noising real data (`real_x0`)."""
    b, k = noise.shape[0], len(t_list) - 1
    if k == 1:
        return noise, t_list[0].expand(b).to(noise.device)
    i = int(torch.randint(0, k, ()))
    t = t_list[i].expand(b).to(noise.device)
    if i == 0:
        return noise, t
    eps = torch.randn_like(noise)
    if not backward_simulation:
        return add_noise(student.process, real_x0, eps, t), t
    x = noise
    with torch.no_grad():
        for j in range(i):
            x0 = student(x, t_list[j].expand(b).to(noise.device), digits_cond(labels))
            x = add_noise(student.process, x0, eps if j == i - 1 else torch.randn_like(noise),
                          t_list[j + 1].expand(b).to(noise.device))
    return x, t


def student_step(student, teacher, fake_score, x_t, t, labels, *, guidance_scale, t_min, t_max):
    """DMD loss of the student's x0 at (x_t, t): teacher (real) vs fake score at a fresh noise level."""
    x0 = student(x_t, t, digits_cond(labels))
    s = sample_uniform((x0.shape[0],), t_min=t_min, t_max=t_max, device=x0.device)
    noisy = add_noise(student.process, x0.detach(), torch.randn_like(x0), s)
    with torch.no_grad():
        cond, uncond = digits_cond(labels), digits_cond(torch.full_like(labels, NULL_CLASS))
        x0_teacher = guided_prediction(teacher, noisy, s, cond, uncond, guidance_scale)
        x0_fake = fake_score(noisy, s, cond)
    return dmd_generator_loss(x0, x0_teacher, x0_fake).mean()


def fake_score_step(student, fake_score, x_t, t, labels):
    """Denoising loss of the fake score on fresh student samples (the student is not differentiated)."""
    with torch.no_grad():
        x0 = student(x_t, t, digits_cond(labels))
    eps = torch.randn_like(x0)
    s = sample_uniform((x0.shape[0],), t_min=0.0, t_max=1.0, device=x0.device)
    prediction = fake_score(add_noise(fake_score.process, x0, eps, s), s, digits_cond(labels),
                            target=fake_score.prediction_type)
    return denoising_loss(prediction, x0, eps, s, process=fake_score.process,
                          prediction_type=fake_score.prediction_type).mean()


def save_student(accelerator, unet, ema, scheduler, args: DMD2Args, step: int) -> DigitsPipeline:
    model = accelerator.unwrap_model(unet)
    ema.copy_to(model)
    pipe = DigitsPipeline(unet=model, scheduler=scheduler)
    pipe.save_pretrained(args.run.output_dir)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    images = pipe(torch.arange(10).repeat(10), num_inference_steps=args.num_student_steps, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    save_image_grid(images, os.path.join(args.run.output_dir, "samples.png"), nrow=10, upscale=4)
    log_image_grid(accelerator, images, step, tag="student", nrow=10)
    return pipe


def main(argv=None):
    args = parse_args(DMD2Args, argv)
    run = args.run
    accelerator = setup_accelerator(run, "train_dmd2", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Players: frozen teacher, student and fake score initialised from it.
    teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
    process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
    teacher_unet = teacher_pipe.unet.requires_grad_(False).eval()
    student_unet, fake_unet = copy.deepcopy(teacher_unet).requires_grad_(True), copy.deepcopy(teacher_unet).requires_grad_(True)
    if run.gradient_checkpointing:
        student_unet.enable_gradient_checkpointing()
        fake_unet.enable_gradient_checkpointing()
    student_unet.train()
    fake_unet.train()
    scheduler = flow_match_sde_scheduler(shift=args.shift)
    t_list = t_list_from_scheduler(scheduler, args.num_student_steps)

    # 2. One optimizer per trainable player.
    student_opt, student_lr = make_optimizer(student_unet.parameters(), args.optimizer)
    fake_args = copy.copy(args.optimizer)
    fake_args.learning_rate = args.fake_score_learning_rate
    fake_opt, fake_lr = make_optimizer(fake_unet.parameters(), fake_args)
    student_unet, fake_unet, student_opt, fake_opt, student_lr, fake_lr = accelerator.prepare(
        student_unet, fake_unet, student_opt, fake_opt, student_lr, fake_lr)
    teacher_unet.to(accelerator.device)
    ema = EMA(student_unet, schedule=args.ema.ema_schedule, decay=args.ema.ema_decay,
              halflife_kimg=args.ema.ema_halflife_kimg, batch_size=run.train_batch_size * accelerator.num_processes,
              gamma=args.ema.ema_gamma, start_iter=args.ema.ema_start_iter)
    teacher = Denoiser(teacher_unet, process, prediction_type)
    student = Denoiser(student_unet, process, prediction_type)
    fake_score = Denoiser(fake_unet, process, prediction_type)

    images, labels = (torch.from_numpy(a) for a in load_digits_arrays("train"))
    batches = InfiniteBatches(images, labels, batch_size=run.train_batch_size, seed=run.seed,
                              rank=accelerator.process_index, world_size=accelerator.num_processes)

    step = 0  # counts student updates
    checkpoint = resolve_checkpoint(run.output_dir, run.resume_from_checkpoint)
    if checkpoint is not None:
        step = load_checkpoint(accelerator, checkpoint, emas={"student": ema})["step"]
        logger.info("resumed from %s at step %d", checkpoint, step)
    iteration = step * args.student_update_freq
    batches.state_at(iteration)

    # 3. Alternating updates: fake score every iteration, student every `student_update_freq`.
    progress = tqdm(range(run.max_train_steps), initial=step, disable=not accelerator.is_local_main_process)
    logs = {}
    while step < run.max_train_steps:
        real_x0, y = (t.to(accelerator.device) for t in next(batches))
        noise = torch.randn_like(real_x0)
        x_t, t = student_inputs(student, noise, y, t_list, real_x0, backward_simulation=args.backward_simulation)
        iteration += 1
        if iteration % args.student_update_freq == 0:
            loss = student_step(student, teacher, fake_score, x_t, t, y, guidance_scale=args.guidance_scale,
                                t_min=args.dmd_t_min, t_max=args.dmd_t_max)
            accelerator.backward(loss)
            if args.optimizer.max_grad_norm > 0:
                accelerator.clip_grad_norm_(student_unet.parameters(), args.optimizer.max_grad_norm)
            student_opt.step()
            student_lr.step()
            student_opt.zero_grad(set_to_none=True)
            ema.update(student_unet)
            step += 1
            progress.update(1)
            logs["dmd_loss"] = loss.detach()
        else:
            loss = fake_score_step(student, fake_score, x_t, t, y)
            accelerator.backward(loss)
            if args.optimizer.max_grad_norm > 0:
                accelerator.clip_grad_norm_(fake_unet.parameters(), args.optimizer.max_grad_norm)
            fake_opt.step()
            fake_lr.step()
            fake_opt.zero_grad(set_to_none=True)
            logs["fake_score_loss"] = loss.detach()
            continue
        if step % run.logging_steps == 0:
            scalars = {k: v.item() for k, v in logs.items()}
            progress.set_postfix(**scalars)
            accelerator.log(scalars, step=step)
        if run.checkpointing_steps and step % run.checkpointing_steps == 0:
            save_checkpoint(accelerator, run.output_dir, step, emas={"student": ema},
                            total_limit=run.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = save_student(accelerator, student_unet, ema, scheduler, args, step)
        logger.info("saved the student pipeline to %s", run.output_dir)
        if args.eval_num_samples:
            print(write_benchmark(pipe, run.output_dir, name="DMD2 student", num_samples=args.eval_num_samples,
                                  step_counts=[args.num_student_steps]))
    accelerator.end_training()


if __name__ == "__main__":
    main()
