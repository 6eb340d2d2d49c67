"""TCM stage 2: truncated consistency training / distillation (Lee et al. arXiv:2410.14895).

Stage 1 is a full-range consistency model (e.g. `examples/train_cm`). Stage 2 starts from it and
trains only t >= t' (`--t_boundary`): below t' the consistency function is the frozen stage-1 model,
which is the target of every pair whose r falls under t' (the boundary loss, weight `boundary_weight`);
above, the network's own stop-gradient output is (the consistency loss). A fraction
`boundary_fraction` of the pairs is drawn with t = t' exactly, the rest with t > t'.

1. stage1 = frozen copy of the stage-1 student; student = trainable copy; teacher (distillation only).
2. Each step: real digits x0, noise eps, (t, r) from ECT's curriculum restricted to t >= t';
   losses.consistency.tcm_loss.
3. The student is saved with the CM multistep sampler (FlowMatchFewStepScheduler(shift)): its 1 step
   starts at t = 1 and its 2-step midpoint shift / (1 + shift) must stay >= t', where the student is
   trained.

    accelerate launch examples/train_tcm/train_tcm.py --stage1 outputs/cm --output_dir outputs/tcm
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_match_sde_scheduler
from diffusers_fastgen.timesteps import (
    ect_ratio,
    noise_ratio_range,
    sample_log_normal,
    sample_log_student_t,
    times_from_noise_ratios,
)
from diffusers_fastgen.training import (
    Accumulator,
    EMAArgs,
    NonFiniteGuard,
    OptimizerArgs,
    RunArgs,
    TextToImageArgs,
    check_pipeline_folder,
    make_optimizer,
    parse_args,
    run_main,
    save_config,
    setup_accelerator,
    update,
)
from diffusers_fastgen.training.consistency_steps import SOURCES, tcm_step
from diffusers_fastgen.training.image_data import TextToImageData
from diffusers_fastgen.training.players import (
    digits_batches,
    finish_digits_run,
    finish_text_to_image_run,
    log_and_checkpoint,
    prepare_players,
    resumed_batches,
    student_ema,
    validate_digits_student,
    validate_text_to_image_student,
)
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.teachers import read_pipeline_class

logger = get_logger("train_tcm", log_level="INFO")


@dataclass
class TCMArgs:
    """TCM stage 2 on top of a stage-1 consistency model."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/tcm", max_train_steps=1000,
                                                         train_batch_size=128, checkpointing_steps=500,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=5e-5, adam_beta2=0.99,
                                                                           max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=10.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image teacher + real images instead
    stage1: str | None = None  # stage-1 consistency-model pipeline folder (e.g. the output of train_cm); required
    teacher: str = DIGITS_TEACHER_PATH  # teacher pipeline folder (source=teacher)
    source: Literal["teacher", "data"] = "teacher"  # teacher: distillation (the teacher's DDIM step); data: consistency training
    guidance_scale: float = 1.0  # teacher CFG (source=teacher)
    t_boundary: float = 0.4  # t' in the student's time (RF: 0 data, 1 noise)
    boundary_fraction: float = 0.25  # pairs drawn at t = t' exactly
    boundary_weight: float = 0.1  # weight of the boundary loss (pairs with r < t'); TCM's 0.1
    boundary_reduction: Literal["separate", "pooled"] = "separate"  # TCM's: mean(ordinary) + w mean(boundary)
    num_stages: int = 4  # ECT curriculum stages (the gap ratio halves every stage)
    start_stage: int = 2  # stage 2 continues stage 1's curriculum from this stage (gap ratio 1 / 2^(k+1))
    t_mean: float = -1.1  # proposal on the EDM noise ratio, log sigma ~ N(t_mean, t_std^2), restricted to t >= t'
    t_std: float = 2.0
    t_proposal: Literal["reflected_log_normal", "log_student_t"] = "log_student_t"  # t > t': TCM's log-t / folded
    t_df: float = 2.0  # degrees of freedom of the log-Student-t proposal (FastGen's 2)
    huber_c: float | None = None  # pseudo-Huber c (None: iCT's 0.00054 sqrt(D))
    shift: float = 1.0  # sampler shift; the 2-step midpoint shift / (1 + shift) must be >= t_boundary
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        if self.stage1 is None:
            raise ValueError("`stage1` is required: the folder of a stage-1 consistency model (e.g. from train_cm).")
        self.text.require(images=True)  # consistency pairs start from noised real images
        if self.text.pretrained_model_name_or_path is not None:  # stage 1: a train_cm student of the same teacher
            check_pipeline_folder(self.stage1, read_pipeline_class(self.text.pretrained_model_name_or_path), "stage1")
        else:
            check_pipeline_folder(self.stage1, "DigitsPipeline", "stage1")
        if self.source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {self.source!r}.")
        if not 0.0 < self.t_boundary < 1.0:
            raise ValueError(f"`t_boundary` must be in (0, 1), got {self.t_boundary}.")
        if not 0.0 <= self.boundary_fraction <= 1.0 or self.boundary_weight < 0:
            raise ValueError(f"need boundary_fraction in [0, 1] and boundary_weight >= 0, got "
                             f"{self.boundary_fraction}, {self.boundary_weight}.")
        digits = self.text.pretrained_model_name_or_path is None  # the digits sampler's shift (stock samplers: at load)
        if digits and (self.shift <= 0 or self.shift / (1 + self.shift) < self.t_boundary):
            raise ValueError(f"`shift` must give a 2-step midpoint shift/(1+shift) >= t_boundary={self.t_boundary}, "
                             f"got shift={self.shift}.")
        if self.t_proposal not in ("reflected_log_normal", "log_student_t") or not self.t_df > 0:  # NaN fails too
            raise ValueError(f"`t_proposal` must be 'reflected_log_normal' or 'log_student_t' and `t_df` > 0, got "
                             f"{self.t_proposal!r}, {self.t_df}.")
        if self.num_stages < 1 or not 0 <= self.start_stage < self.num_stages or self.t_std <= 0:
            raise ValueError(f"need num_stages >= 1, 0 <= start_stage < num_stages, t_std > 0; got "
                             f"{self.num_stages}, {self.start_stage}, {self.t_std}.")


def sample_pair(b: int, step: int, args: TCMArgs, process, device):
    """(t, r): t = t' for a `boundary_fraction` of the batch, else t > t' from `t_proposal`: the log-normal
    folded onto t > t' (log sigma reflected about log sigma(t')) or the log-Student-t truncated there; r's
    noise ratio is t's times (1 - n), n = ECT's gap ratio of the current stage (stage 2 continues stage 1's
    curriculum from `start_stage`)."""
    tb = torch.tensor(args.t_boundary, dtype=torch.float64)
    ratio_b = float(process.sigma(tb) / process.alpha(tb))  # t' as an EDM noise ratio (RF: t / (1 - t))
    if args.t_proposal == "log_student_t":
        sigma = sample_log_student_t((b,), mean=args.t_mean, std=args.t_std, df=args.t_df, device=device,
                                     ratio_range=(ratio_b, noise_ratio_range(process)[1]), dtype=torch.float64)
    else:
        sigma = sample_log_normal((b,), mean=args.t_mean, std=args.t_std, device=device, dtype=torch.float64)
        sigma = torch.where(sigma > ratio_b, sigma, ratio_b * ratio_b / sigma)  # reflect log sigma about log ratio_b
    sigma = torch.where(torch.rand(b, device=device) < args.boundary_fraction, torch.full_like(sigma, ratio_b), sigma)
    stage = args.start_stage + step * (args.num_stages - args.start_stage) // args.run.max_train_steps
    n = ect_ratio(stage, total_iterations=args.num_stages, num_stages=args.num_stages)  # 1 / 2^(stage + 1)
    return times_from_noise_ratios(process, sigma, 1 - n)  # r < t also where a VP schedule clamps the ratio


def main(argv=None):
    args = parse_args(TCMArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_tcm", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Frozen stage-1 CM (and teacher), student = trainable copy of stage 1, one optimizer.
    t2i = data = None  # a stock text-to-image teacher with real images (--pretrained_model_name_or_path), else digits
    if args.text.pretrained_model_name_or_path is not None:
        data = TextToImageData(args.text, accelerator, run, guidance_scale=args.guidance_scale)
        t2i = data.teacher
        stage1_model = getattr(DiffusionPipeline.from_pretrained(args.stage1), t2i.component)
        process, prediction_type = t2i.process, t2i.prediction_type
        frozen_teacher = t2i.model if args.source == "teacher" else None
        teacher_process = (t2i.process, t2i.prediction_type)
        student_model = copy.deepcopy(stage1_model).float()
    else:
        stage1_pipe = DigitsPipeline.from_pretrained(args.stage1)
        process, prediction_type = process_from_scheduler(stage1_pipe.scheduler)
        teacher_pipe = DigitsPipeline.from_pretrained(args.teacher) if args.source == "teacher" else None
        stage1_model = stage1_pipe.unet
        frozen_teacher = teacher_pipe.unet if teacher_pipe else None
        teacher_process = process_from_scheduler(teacher_pipe.scheduler) if teacher_pipe else None
        student_model = DigitsPipeline.from_pretrained(args.stage1).unet
    modules = {"student": student_model.requires_grad_(True)}
    params = {"student": list(modules["student"].parameters())}
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule)}
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    optimizer, lr_scheduler = optimizers["student"]
    frozen = {"stage1": stage1_model, **({"teacher": frozen_teacher} if frozen_teacher is not None else {})}
    for module in frozen.values():
        module.requires_grad_(False).eval().to(accelerator.device)
    stage1 = Denoiser(frozen["stage1"], process, prediction_type)
    teacher = Denoiser(frozen["teacher"], *teacher_process) if frozen_teacher is not None else None
    student = Denoiser(modules["student"], process, prediction_type)
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if t2i is not None:  # x0, then fresh noise (as stage 1): LCMScheduler (VP) / stochastic flow-matching Euler (RF)
        scheduler = t2i.student_scheduler(stochastic=True)
        midpoint = float(t2i.student_t_list(scheduler, 2)[1])
        if midpoint < args.t_boundary:
            raise ValueError(f"`t_boundary` {args.t_boundary} is above the stock 2-step sampler's midpoint {midpoint:.4f}.")
        batches, step = resumed_batches(accelerator, run, ema, logger, data)
    else:
        scheduler = flow_match_sde_scheduler(shift=args.shift)
        batches, step = digits_batches(accelerator, run, ema, logger)

    # 2. The loop: one truncated consistency step per iteration.
    def validate(s):  # a 1-step sample grid of the EMA student every `validation_steps`
        if t2i is not None:  # the teacher's pipeline class, precomputed embeddings of a few prompts
            return validate_text_to_image_student(accelerator, modules, ema, t2i, scheduler, data.validation_embeddings(),
                                                  num_steps=1, step=s, output_dir=run.output_dir)
        validate_digits_student(accelerator, modules, ema, scheduler, num_steps=1, step=s, output_dir=run.output_dir)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    while step < run.max_train_steps:
        if t2i is not None:  # real latents with their captions' embeddings
            x0, cond, uncond = data.next(accelerator.device)
        else:
            x0, y = (v.to(accelerator.device) for v in next(batches))
            cond, uncond = digits_cond(y), digits_cond(torch.full_like(y, NULL_CLASS))
        eps = torch.randn_like(x0)
        t, r = sample_pair(x0.shape[0], step, args, process, x0.device)
        loss, logs = tcm_step(student, stage1, x0, eps, t, r, cond, t_boundary=args.t_boundary,
                              boundary_weight=args.boundary_weight, teacher=teacher, uncond=uncond,
                              guidance_scale=t2i.cfg_scale if t2i is not None else args.guidance_scale,
                              huber_c=args.huber_c, reduction=args.boundary_reduction)
        if not update(accelerator, loss, params["student"], optimizer, lr_scheduler, args.optimizer.max_grad_norm,
                      guard=guard, accumulator=accumulator, step=step + 1):
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(student.model)
        step += 1
        log_and_checkpoint(accelerator, run, step, {"loss": loss.detach(), **logs}, ema, progress, validate=validate)

    # 3. Save the student with its sampler, reload it, benchmark 1 and 2 steps.
    if t2i is not None:
        finish_text_to_image_run(accelerator, modules, params, optimizers, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=1, method="TCM", prompts=data.prompts, logger=logger,
                                 push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id)
        progress.summary("train_tcm", logger)
        return
    finish_digits_run(accelerator, modules, params, optimizers, ema, scheduler, output_dir=run.output_dir,
                      teacher_path=args.stage1, num_steps=1, step=step, eval_num_samples=args.eval_num_samples,
                      name="TCM student", logger=logger, step_counts=[1, 2])

    progress.summary("train_tcm", logger)

if __name__ == "__main__":
    run_main(main)
