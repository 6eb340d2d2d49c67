"""sCM: continuous-time consistency distillation (sCD) or training (sCT) (Lu & Song arXiv:2410.11081).

1. The student starts as the teacher's UNet and is trained through its TrigFlow view
   (models.trigflow: x_t = cos(t) x0 + sin(t) sigma_d eps, F from the model's own prediction after a
   change of variables), so it stays an ordinary model of the teacher's process (RF here).
2. Each step draws real digits x0, noise eps and TrigFlow time t (log-normal proposal on
   sigma_d tan t, truncated to the noise ratios the teacher's process spans: all of them for RF, 0.029 ..
   14.6 for SD1.5's VP schedule), and takes sCM's loss: one JVP of F along the PF-ODE tangent, tangent warm-up and
   normalisation, adaptive weighting by a learned log-variance head (models.logvar). The ODE velocity
   comes from the teacher with CFG (`--source teacher`: sCD) or from the data pair (`--source data`: sCT).
   The JVP is a central difference over t +- fd_eps cos t sin t along the tangent (`--fd_eps 0.1`): a secant
   over the teacher's fine-scale roughness in t, as MeanFlow's stencil (on digits the 1-step excess FD fell
   from 4.4x to 1.9x the teacher's, sCT's from 8.9x to 1.0x; `--fd_eps 3e-5` is the derivative, `--jvp_method
   exact` the exact one).
   `--adv_weight w` adds LADD's adversarial loss on the teacher's features of the student's own few-step
   samples (SANA-Sprint's sCM + LADD hybrid, w = 0.5 there; `training.adversarial`). sCM's normalised,
   adaptively weighted gradient is 20-50x smaller than CD's, so the same w weighs an order of magnitude more
   here: on digits w = 0.01 does what 0.1 does for CD, 0.1 did not help and 0.5
   collapsed (`benchmarks/adversarial_balance.py` measures the ratio at a checkpoint).
3. The student is saved as a DigitsPipeline with sCM's 1-step (t = pi/2) and 2-step (pi/2,
   `intermediate_t`) sampler, expressed on the RF path (schedulers.scm_rf_scheduler).

    accelerate launch examples/train_scm/train_scm.py --output_dir outputs/scd
    # the digits recipe whose 1- and 2-step students beat the teacher's 50-step excess FD (docs/results.md)
    accelerate launch examples/train_scm/train_scm.py --adv_weight 0.01 --output_dir outputs/scd_adv

A VP teacher (SD1.5-style, eps prediction) through its TrigFlow view wants a smaller step: pass
`--learning_rate 3e-5` (at 1e-4 the text-to-image digits student diverged once the tangent warm-up ended).
So do runs much longer than the default 800 steps: on the digits teacher, 2,400 steps at 1e-4 drifted
(1-step FD 0.79 -> 2.16) where 3e-5 stayed stable (docs/results.md).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.logging import get_logger

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.jvp import JVP_METHODS
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.models.logvar import LogVarHead
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import scm_rf_scheduler, t_list_from_scheduler
from diffusers_fastgen.timesteps import noise_ratio_range, sample_trigflow_time, trigflow_time_range
from diffusers_fastgen.training import (
    Accumulator,
    AdversarialArgs,
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
from diffusers_fastgen.training.adversarial import AdversarialTerm, add_adversarial_heads
from diffusers_fastgen.training.consistency_steps import SOURCES, scm_step
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

logger = get_logger("train_scm", log_level="INFO")


@dataclass
class SCMArgs:
    """sCD (from a teacher) or sCT (from data) of a 1-2 step continuous-time consistency student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/scd", max_train_steps=800,
                                                         train_batch_size=128, checkpointing_steps=400,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta2=0.99,
                                                                           max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=10.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image teacher + real images instead
    teacher: str = DIGITS_TEACHER_PATH  # teacher pipeline folder: the student's init (and the ODE, source=teacher)
    source: Literal["teacher", "data"] = "teacher"  # teacher = sCD, data = sCT
    guidance_scale: float = 1.0  # teacher CFG on F (sCD)
    sigma_d: float = 0.75  # TrigFlow data std (the digits in [-1, 1] have std 0.75)
    t_mean: float = -1.0  # proposal: log(sigma_d tan t) ~ N(t_mean, t_std^2)
    t_std: float = 1.4
    warmup_steps: int = 300  # tangent warm-up: the x_t + dF/dt term ramps 0 -> 1 over these steps
    tangent_c: float = 0.1  # tangent normalisation g / (||g|| + c) (0 = off; ||g|| per --tangent_norm)
    tangent_norm: Literal["rms", "l2"] = "rms"  # ||g|| as the RMS over elements (the reference's) or the L2 norm
    prior_weighting: bool = True  # weight the loss by 1 / (sigma_d tan t) (the reference's prior weight)
    logvar_learning_rate: float = 1e-2  # AdamW lr of the log-variance head (adaptive weighting)
    adaptive_weighting: bool = True  # learned log-variance weighting (off: plain mean squared error)
    intermediate_t: float = 1.1  # 2-step sampler's second time (TrigFlow radians)
    jvp_method: Literal["finite_difference", "exact"] = "finite_difference"  # 3 forwards, fp32 (cheapest); or forward-mode AD
    fd_eps: float = 0.1  # finite-difference step along the scaled tangent: a secant in t (3e-5: the derivative)
    adv: AdversarialArgs = field(default_factory=AdversarialArgs)  # --adv_weight > 0: + LADD (SANA-Sprint's sCM + LADD)
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        self.text.require(images=True)  # sCD and sCT both start from noised real images
        if self.source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {self.source!r}.")
        if self.jvp_method not in JVP_METHODS:
            raise ValueError(f"`jvp_method` must be one of {JVP_METHODS}, got {self.jvp_method!r}.")
        if self.run.mixed_precision != "no":
            raise ValueError(f"`mixed_precision` must be 'no' for this JVP-based method, got {self.run.mixed_precision!r}: "
                             "the finite-difference JVP's step (3e-5) is below fp16/bf16 resolution, and the exact "
                             "JVP (forward AD) failed under accelerate's CPU autocast (a conv received an uncast "
                             "fp32 dual input) with torch 2.13.")
        if self.sigma_d <= 0 or self.t_std <= 0:
            raise ValueError(f"`sigma_d` and `t_std` must be > 0, got {self.sigma_d}, {self.t_std}.")
        if self.warmup_steps < 0 or self.tangent_c < 0:
            raise ValueError(f"`warmup_steps` and `tangent_c` must be >= 0, got {self.warmup_steps}, {self.tangent_c}.")
        if self.guidance_scale < 0 or self.logvar_learning_rate <= 0:
            raise ValueError("need guidance_scale >= 0 and logvar_learning_rate > 0, got "
                             f"{self.guidance_scale}, {self.logvar_learning_rate}.")
        if not 0 < self.fd_eps < 1:  # NaN fails too
            raise ValueError(f"`fd_eps` must be in (0, 1), got {self.fd_eps}.")
        if not 0 < self.intermediate_t < 1.5707963:
            raise ValueError(f"`intermediate_t` must be in (0, pi/2), got {self.intermediate_t}.")


def main(argv=None):
    args = parse_args(SCMArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_scm", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Teacher (frozen), student (a copy) and the log-variance head, one optimizer for student + head.
    t2i = data = None  # a stock text-to-image teacher with real images (--pretrained_model_name_or_path), else digits
    if args.text.pretrained_model_name_or_path is not None:
        data = TextToImageData(args.text, accelerator, run, guidance_scale=args.guidance_scale)
        t2i = data.teacher
        process, prediction_type = t2i.process, t2i.prediction_type
        modules = {"teacher": t2i.model.requires_grad_(False),
                   "student": copy.deepcopy(t2i.model).float().requires_grad_(True)}
        probe_cond, sample_shape = t2i.cond(data.negative, None, "cpu"), t2i.latent_shape
    else:
        teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
        process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
        modules = {"teacher": teacher_pipe.unet.requires_grad_(False),
                   "student": DigitsPipeline.from_pretrained(args.teacher).unet.requires_grad_(True)}
        probe_cond, sample_shape = digits_cond(torch.zeros(1, dtype=torch.long)), (1, 8, 8)
    params = {"student": list(modules["student"].parameters())}
    if args.adaptive_weighting:
        modules["logvar"] = LogVarHead()
        params["logvar"] = list(modules["logvar"].parameters())
    groups = [{"params": params["student"]}] + (
        [{"params": params["logvar"], "lr": args.logvar_learning_rate}] if args.adaptive_weighting else [])
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizers = {"student": make_optimizer(groups, args.optimizer, **schedule)}
    add_adversarial_heads(modules, params, optimizers, args.adv, Denoiser(modules["teacher"], process, prediction_type),
                          probe_cond, sample_shape, args.optimizer, schedule)  # --adv_weight > 0 only
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    optimizer, lr_scheduler = optimizers["student"]
    frozen_teacher = Denoiser(modules["teacher"], process, prediction_type)  # the ODE (sCD) and the heads' features
    teacher = frozen_teacher if args.source == "teacher" else None
    student = Denoiser(modules["student"], process, prediction_type)
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    all_params = params["student"] + params.get("logvar", [])
    if t2i is not None:
        # sCM's samplers on the teacher's path: 1 step from pure noise; 2 steps through the point whose noise
        # ratio is sigma_d tan(intermediate_t), given to the stock call as timesteps (VP) or sigmas (RF).
        scheduler = t2i.student_scheduler(shift=None if t2i.kind in ("sd", "sdxl") else 1.0, stochastic=True)
        ratio = torch.tensor(args.sigma_d * math.tan(args.intermediate_t), dtype=torch.float64)
        t2i.set_custom_schedule([1.0, float(t2i.process.t_from_noise_ratio(ratio))])
        adv_t_list = t2i.student_t_list(scheduler, args.adv.adv_num_steps)
        batches, step = resumed_batches(accelerator, run, ema, logger, data)
    else:
        scheduler = scm_rf_scheduler(args.sigma_d, args.intermediate_t)
        adv_t_list = t_list_from_scheduler(scheduler, args.adv.adv_num_steps)
        batches, step = digits_batches(accelerator, run, ema, logger)
    adversarial = AdversarialTerm(args.adv, frozen_teacher, modules, params, optimizers, adv_t_list,
                                  args.optimizer.max_grad_norm)

    # 2. The loop: one sCM step per iteration.
    def validate(s):  # a 1-step sample grid of the EMA student every `validation_steps`
        if t2i is not None:  # the teacher's pipeline class, precomputed embeddings of a few prompts
            return validate_text_to_image_student(accelerator, modules, ema, t2i, scheduler, data.validation_embeddings(),
                                                  num_steps=1, step=s, output_dir=run.output_dir)
        validate_digits_student(accelerator, modules, ema, scheduler, num_steps=1, step=s, output_dir=run.output_dir)

    ratio_range = noise_ratio_range(process)  # a VP teacher spans only part of TrigFlow's (0, pi/2)
    t_range = trigflow_time_range(process, args.sigma_d)  # ... where the JVP's stencil must stay
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
        t = sample_trigflow_time((x0.shape[0],), sigma_d=args.sigma_d, mean=args.t_mean, std=args.t_std,
                                 device=x0.device, ratio_range=ratio_range)
        warmup = min(1.0, step / args.warmup_steps) if args.warmup_steps else 1.0
        cfg_scale = t2i.cfg_scale if t2i is not None else args.guidance_scale  # guidance-distilled Flux: no CFG
        loss, logs = scm_step(student, x0, eps, t, cond, sigma_d=args.sigma_d, teacher=teacher, uncond=uncond,
                              guidance_scale=cfg_scale, warmup=warmup, tangent_c=args.tangent_c,
                              logvar_head=modules.get("logvar"), jvp_method=args.jvp_method,
                              tangent_norm=args.tangent_norm, prior_weight=args.prior_weighting, fd_eps=args.fd_eps,
                              t_range=t_range)
        logs = {"loss": loss.detach(), **logs}
        loss = adversarial.add_to(loss, logs, student, cond, x0)  # --adv_weight > 0 only
        applied = update(accelerator, loss, all_params, optimizer, lr_scheduler, args.optimizer.max_grad_norm,
                         guard=guard, accumulator=accumulator, step=step + 1)
        adversarial.update_heads(accelerator, guard=guard, accumulator=accumulator, step=step + 1)
        if not applied:
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(student.model)
        step += 1
        log_and_checkpoint(accelerator, run, step, logs, ema, progress, validate=validate)

    # 3. Save the student with its sampler, reload it, benchmark 1 and 2 steps.
    name = "sCD student" if args.source == "teacher" else "sCT student"
    if t2i is not None:
        finish_text_to_image_run(accelerator, modules, params, optimizers, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=1, method=name.split()[0], prompts=data.prompts, logger=logger,
                                 push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id)
        progress.summary("train_scm", logger)
        return
    finish_digits_run(accelerator, modules, params, optimizers, ema, scheduler, output_dir=run.output_dir,
                      teacher_path=args.teacher, num_steps=1, step=step, eval_num_samples=args.eval_num_samples,
                      name=name, logger=logger, step_counts=[1, 2])

    progress.summary("train_scm", logger)

if __name__ == "__main__":
    run_main(main)
