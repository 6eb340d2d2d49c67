"""CM (ECT): discrete-time consistency distillation or training with ECT's curriculum
(Song et al. arXiv:2303.01469; iCT arXiv:2310.14189; ECT arXiv:2406.14548).

1. The student f(x_t, t) is the teacher's UNet read as an x0 predictor (models.Denoiser, target="x0"),
   so f(x, 0) = x holds by construction.
2. Each step draws real digits x0, noise eps and a pair r < t: sigma ~ LogNormal on the EDM noise
   ratio, r's ratio = sigma (1 - n) (`--ect_mapping sigmoid`: ECT's max(0, sigma - sigma n (1 + 8
   sigmoid(-sigma))), measured worse here), with n halved every stage (`timesteps.sample_t_r_ect`), both mapped
   to the student's process; where r = 0 the target is the data (distillation: the teacher's ODE end point). The loss is
   pseudo-Huber d(f(x_t, t), sg f(x_r, r)) / (sigma_t - sigma_r) with x_r on the same noise (`--source
   data`: consistency training) or one teacher DDIM step from x_t (`--source teacher`: consistency
   distillation, CFG optional).
   `--adv_weight w` adds LADD's adversarial loss on the teacher's features of the student's own few-step samples
   (SANA-Sprint's hybrid; heads trained beside it on real data: `training.adversarial`).
   `--tcd_gamma 0.7` (SD / SDXL teachers): the model card adds a 4-step call with stock TCDScheduler at eta 0.7 --
   TCD's gamma sampler (arXiv:2402.19159): x0 is carried by a DDIM step to 0.3 x the next timestep and only the rest
   re-noised. On the text-to-image digits teacher (with `--t_mean 1.0`: the LCM sampler's timesteps 999 / 759 / 499 /
   259 get 60 % of the draws above 499, ECT's -1.1 gives 22 %) LCM's 4 steps (gamma 1) lose diversity (FD 0.56-0.58
   against the floor's 0.46), gamma 0.7 gives 0.46-0.48 on three training seeds (docs/results.md). The weights do not
   depend on it.
3. The student is saved as a DigitsPipeline with the CM multistep sampler (x0, then fresh noise)
   FlowMatchFewStepScheduler(shift); 1 and 2 steps from the same folder.

    accelerate launch examples/train_cm/train_cm.py --output_dir outputs/cm
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from accelerate.logging import get_logger

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_match_sde_scheduler, t_list_from_scheduler
from diffusers_fastgen.timesteps import sample_t_r_ect, times_from_noise_ratios
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
from diffusers_fastgen.training.consistency_steps import SOURCES, cm_step
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
from diffusers_fastgen.training.teachers import TEXT_TO_IMAGE, read_pipeline_class

logger = get_logger("train_cm", log_level="INFO")


@dataclass
class CMArgs:
    """Consistency distillation (or ECT consistency training) of a 1-2 step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/cm", max_train_steps=1500,
                                                         train_batch_size=64, checkpointing_steps=500,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta2=0.99,
                                                                           max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=10.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image teacher + real images instead
    teacher: str = DIGITS_TEACHER_PATH  # digits teacher folder: the student's init (and the ODE, source=teacher)
    source: Literal["teacher", "data"] = "teacher"  # teacher = consistency distillation, data = consistency training (ECT)
    guidance_scale: float = 1.0  # teacher CFG in the DDIM step (source=teacher)
    num_stages: int = 4  # ECT curriculum: the gap ratio n halves at every stage (n = 1/2, 1/4, ...)
    ect_mapping: Literal["linear", "sigmoid"] = "linear"  # r = t (1 - n), or ECT's t - t n (1 + 8 sigmoid(-t)) clamped at 0
    t_mean: float = -1.1  # ECT proposal: log sigma ~ N(t_mean, t_std^2) (EDM noise ratio)
    t_std: float = 2.0
    huber_c: float | None = None  # pseudo-Huber c (None: iCT's 0.00054 sqrt(D))
    shift: float = 1.0  # sampler: FlowMatchFewStepScheduler(shift); the 2-step midpoint is shift / (1 + shift)
    adv: AdversarialArgs = field(default_factory=AdversarialArgs)  # --adv_weight > 0: + LADD on the teacher's features
    tcd_gamma: float | None = None  # SD / SDXL teachers: the card adds a `tcd_steps` call with stock TCDScheduler, eta=gamma
    tcd_steps: int = 4  # steps of that TCD call (1 step is the same for every gamma)
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        self.text.require(images=True)  # CD and ECT both start from noised real images
        if self.source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {self.source!r}.")
        if self.num_stages < 1 or self.t_std <= 0 or self.shift <= 0:
            raise ValueError(f"need num_stages >= 1, t_std > 0, shift > 0; got {self.num_stages}, {self.t_std}, {self.shift}.")
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        if self.huber_c is not None and self.huber_c < 0:
            raise ValueError(f"`huber_c` must be >= 0 or None, got {self.huber_c}.")
        if self.tcd_gamma is not None:
            if not 0.0 <= self.tcd_gamma <= 1.0:  # NaN fails too
                raise ValueError(f"`tcd_gamma` must be in [0, 1], got {self.tcd_gamma}.")
            if self.tcd_steps < 2:
                raise ValueError(f"`tcd_steps` must be >= 2 (one step is the same for every gamma), got {self.tcd_steps}.")
            path = self.text.pretrained_model_name_or_path
            name = None if path is None else read_pipeline_class(path, revision=self.text.revision,
                                                                   cache_dir=self.text.cache_dir)
            if TEXT_TO_IMAGE.get(name) not in ("sd", "sdxl"):
                raise ValueError("`tcd_gamma` needs an SD1.5 / SDXL teacher (`pretrained_model_name_or_path`): "
                                 f"TCDScheduler samples VP students; got {name or 'the digits teacher'}.")


def sample_pair(b: int, step: int, args: CMArgs, process, device):
    """ECT's (t, r) on the EDM noise ratio, mapped to `process` time (r < t for every sample, also where a VP
    schedule cannot represent the ratio: `timesteps.times_from_noise_ratios`)."""
    sigma, sigma_r = sample_t_r_ect((b,), iteration=step, total_iterations=args.run.max_train_steps,
                                    num_stages=args.num_stages, mean=args.t_mean, std=args.t_std, mapping=args.ect_mapping,
                                    device=device,
                                    dtype=torch.float64)
    return times_from_noise_ratios(process, sigma, sigma_r / sigma)


def main(argv=None):
    args = parse_args(CMArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_cm", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Teacher (frozen) and student (a copy, fp32), one optimizer.
    t2i = data = None  # a stock text-to-image teacher (--pretrained_model_name_or_path) with real images, else digits
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
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule)}
    add_adversarial_heads(modules, params, optimizers, args.adv, Denoiser(modules["teacher"], process, prediction_type),
                          probe_cond, sample_shape, args.optimizer, schedule)  # --adv_weight > 0 only
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    optimizer, lr_scheduler = optimizers["student"]
    frozen_teacher = Denoiser(modules["teacher"], process, prediction_type)  # the ODE (CD) and the heads' features
    teacher = frozen_teacher if args.source == "teacher" else None
    student = Denoiser(modules["student"], process, prediction_type)
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if t2i is not None:  # x0, then fresh noise: LCMScheduler (VP) / stochastic flow-matching Euler (RF)
        scheduler = t2i.student_scheduler(stochastic=True)
        adv_t_list = t2i.student_t_list(scheduler, args.adv.adv_num_steps)
        batches, step = resumed_batches(accelerator, run, ema, logger, data)
    else:
        scheduler = flow_match_sde_scheduler(shift=args.shift)
        adv_t_list = t_list_from_scheduler(scheduler, args.adv.adv_num_steps)
        batches, step = digits_batches(accelerator, run, ema, logger)
    adversarial = AdversarialTerm(args.adv, frozen_teacher, modules, params, optimizers, adv_t_list,
                                  args.optimizer.max_grad_norm)

    # 2. The loop: one consistency step per iteration.
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
        loss, _ = cm_step(student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond,
                          guidance_scale=t2i.cfg_scale if t2i is not None else args.guidance_scale, huber_c=args.huber_c)
        logs = {"loss": loss.detach()}
        loss = adversarial.add_to(loss, logs, student, cond, x0)  # --adv_weight > 0 only
        applied = update(accelerator, loss, params["student"], optimizer, lr_scheduler, args.optimizer.max_grad_norm,
                         guard=guard, accumulator=accumulator, step=step + 1)
        adversarial.update_heads(accelerator, guard=guard, accumulator=accumulator, step=step + 1)
        if not applied:
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(student.model)
        step += 1
        log_and_checkpoint(accelerator, run, step, logs, ema, progress, validate=validate)

    # 3. Save the student with its sampler, reload it, benchmark 1 and 2 steps.
    name = "CD student" if args.source == "teacher" else "ECT student"
    if t2i is not None:
        sampling = None  # the card's calls: 1 and 2 steps with the saved LCMScheduler (+ TCD's gamma sampler)
        if args.tcd_gamma is not None:
            sampling = [t2i.sampling_kwargs(1), t2i.sampling_kwargs(2), t2i.tcd_sampling_kwargs(args.tcd_steps, args.tcd_gamma)]
        finish_text_to_image_run(accelerator, modules, params, optimizers, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=1, method="CD" if args.source == "teacher" else "ECT", prompts=data.prompts,
                                 logger=logger, push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id,
                                 sampling=sampling)
        progress.summary("train_cm", logger)
        return
    finish_digits_run(accelerator, modules, params, optimizers, ema, scheduler, output_dir=run.output_dir,
                      teacher_path=args.teacher, num_steps=1, step=step, eval_num_samples=args.eval_num_samples,
                      name=name, logger=logger, step_counts=[1, 2])

    progress.summary("train_cm", logger)

if __name__ == "__main__":
    run_main(main)
