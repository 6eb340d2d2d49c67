"""MeanFlow: a one- or few-step average-velocity student u(z_t, r, t) (Geng et al. arXiv:2505.13447).

1. The student is the teacher's UNet with a second time input r (models.interval: stock
   UNet2DConditionModel with `time_cond_proj_dim`, zero-initialised, so u(z, r, t) starts as the
   teacher's velocity for every r).
2. Each step draws real digits x0, noise eps and (t, r), and regresses u_theta(z_t, r, t) on
   v - (t - r) du/dt (one JVP; losses.meanflow). v = eps - x0 (`--source data`: MeanFlow from data) or the
   teacher's CFG velocity at z_t (`--source teacher`: distillation, CFG folded into the target).
   `--adv_weight w` adds LADD's adversarial loss on the teacher's features of the student's 1-step jumps from
   noise (as in SANA-Sprint's consistency + LADD hybrid; `training.adversarial`).
3. The student is saved as a DigitsPipeline with FlowMapEulerDiscreteScheduler, whose step
   z_r = z_t - (t - r) u is MeanFlow's sampler; 1 and 2 steps from the same folder.

    accelerate launch examples/train_meanflow/train_meanflow.py --output_dir outputs/meanflow

On a stock SD1.5 / SDXL pipeline (`--pretrained_model_name_or_path` with real images and captions,
`--train_data_dir` or `--dataset_name`) the same loss runs on the rectified-flow view of the VP teacher
(models.flow_view: same (x0, eps), RF time t = s / (a + s), at most 0.936 for SD1.5's schedule), with the
teacher's CFG velocity (`--guidance_scale`) as v. The interval reaches the student UNet as the guidance-scale
embedding the stock pipeline computes itself (models.interval.guidance_interval_embedding), and the saved
scheduler is DDIMScheduler with trailing spacing, whose step is MeanFlow's jump in those coordinates; so the
folder samples in N steps with the stock call

    StableDiffusionPipeline.from_pretrained(out)(prompt, num_inference_steps=N, guidance_scale=1 + 0.01 / N)

(`interval_guidance_scale(N)`; written in the model card). For example:

    accelerate launch examples/train_meanflow/train_meanflow.py --pretrained_model_name_or_path <sd folder> \
        --train_data_dir images/ --guidance_scale 2 --learning_rate 1.6e-3 --output_dir outputs/meanflow_sd

(the default learning rate, 2e-4, is the pixel digits'; on the text-to-image digits teacher 1.6e-3 did best of
1e-4 .. 3.2e-3: docs/results.md).
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
from diffusers_fastgen.jvp import JVP_METHODS
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.models.flow_view import FlowView
from diffusers_fastgen.models.interval import add_interval_input, interval_guidance_scale
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_map_scheduler, t_list_from_scheduler
from diffusers_fastgen.timesteps import sample_t_r_meanflow
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
from diffusers_fastgen.training.consistency_steps import SOURCES, meanflow_step
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

logger = get_logger("train_meanflow", log_level="INFO")


@dataclass
class MeanFlowArgs:
    """MeanFlow distillation of a teacher (or MeanFlow training from data) into a 1-2 step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/meanflow", max_train_steps=1400,
                                                         train_batch_size=64, checkpointing_steps=500,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=2e-4, adam_beta2=0.99,
                                                                           max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=10.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock SD1.5 / SDXL teacher + real images instead
    teacher: str = DIGITS_TEACHER_PATH  # teacher pipeline folder: the student's init (and the velocity, source=teacher)
    source: Literal["teacher", "data"] = "teacher"  # where v comes from: teacher (distillation) / data (eps - x0)
    guidance_scale: float = 1.0  # teacher CFG folded into the target (source=teacher)
    interval_dim: int = 64  # width of the interval embedding fed to the new cond_proj
    ratio_r_neq_t: float = 0.75  # fraction of samples with r != t (the rest is plain flow matching)
    t_mean: float = 0.0  # logit-normal (t, r) proposal: mean
    t_std: float = 2.0  # logit-normal (t, r) proposal: std (2: U-shaped, so (t, r) near (1, 0) is common)
    endpoint_fraction: float = 0.0  # fraction of r != t samples put on the sampler's own jumps (1->0, 1->0.5, 0.5->0)
    adaptive_p: float = 1.0  # adaptive loss weight 1 / (loss + c)^p (0 = plain squared error)
    warmup_steps: int = 300  # tangent warm-up: the (t - r) du/dt term ramps 0 -> 1 over these steps
    jvp_method: Literal["finite_difference", "exact"] = "finite_difference"  # 3 forwards, fp32 (cheapest); or forward-mode AD
    fd_eps: float = 0.2  # finite-difference step along (z, t) (larger = a secant over the teacher's fine-scale roughness in t)
    adv: AdversarialArgs = field(default_factory=AdversarialArgs)  # --adv_weight > 0: + LADD on the 1-step jumps
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        self.text.require(images=True)  # z_t on the teacher's marginal: noised real images
        if self.text.pretrained_model_name_or_path is not None:
            name = read_pipeline_class(self.text.pretrained_model_name_or_path, revision=self.text.revision,
                                       cache_dir=self.text.cache_dir)
            if TEXT_TO_IMAGE.get(name) not in ("sd", "sdxl"):
                raise ValueError(f"`pretrained_model_name_or_path` is a {name}: MeanFlow students here are UNet students "
                                 "of StableDiffusionPipeline / StableDiffusionXLPipeline (the interval enters through the "
                                 "UNet's time_cond_proj_dim, which the stock pipeline fills from its guidance_scale).")
            if self.interval_dim < 4:
                raise ValueError(f"`interval_dim` must be >= 4 for the stock guidance embedding, got {self.interval_dim}.")
        if self.source not in SOURCES:
            raise ValueError(f"`source` must be one of {SOURCES}, got {self.source!r}.")
        if self.adv.adv_num_steps != 1:
            raise ValueError(f"`adv_num_steps` must be 1 here (the term reads the student's 1-step jump from noise), "
                             f"got {self.adv.adv_num_steps}.")
        if self.jvp_method not in JVP_METHODS:
            raise ValueError(f"`jvp_method` must be one of {JVP_METHODS}, got {self.jvp_method!r}.")
        if self.run.mixed_precision != "no":
            raise ValueError(f"`mixed_precision` must be 'no' for this JVP-based method, got {self.run.mixed_precision!r}: "
                             "the exact JVP (forward AD) failed under accelerate's CPU autocast (a conv received an uncast "
                             f"fp32 dual input) with torch 2.13, and the finite-difference JVP (fd_eps={self.fd_eps}) "
                             "has only been validated in fp32.")
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0 or not 0.0 <= self.endpoint_fraction <= 1.0:
            raise ValueError("`ratio_r_neq_t` and `endpoint_fraction` must be in [0, 1], got "
                             f"{self.ratio_r_neq_t}, {self.endpoint_fraction}.")
        if self.t_std <= 0 or self.adaptive_p < 0:
            raise ValueError(f"need t_std > 0 and adaptive_p >= 0, got {self.t_std}, {self.adaptive_p}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}.")
        if self.fd_eps <= 0:
            raise ValueError(f"`fd_eps` must be > 0, got {self.fd_eps}.")
        if self.interval_dim < 2 or self.interval_dim % 2:
            raise ValueError(f"`interval_dim` must be an even number >= 2, got {self.interval_dim}.")


def sample_t_r(b: int, args: MeanFlowArgs, device, *, t_max: float = 1.0,
               jumps=((1.0, 0.0), (1.0, 0.5), (0.5, 0.0))) -> tuple[torch.Tensor, torch.Tensor]:
    """MeanFlow's logit-normal (t, r) pairs on [0, t_max]; a fraction of the r != t ones replaced by the jumps
    the 1- and 2-step samplers make (`jumps`, (t, r) in RF time), so the exported schedule is trained on."""
    t, r = sample_t_r_meanflow((b,), ratio_r_neq_t=args.ratio_r_neq_t, mean=args.t_mean, std=args.t_std, device=device)
    t, r = t * t_max, r * t_max
    jumps = torch.tensor(jumps, device=device, dtype=t.dtype)
    pick = jumps[torch.randint(0, len(jumps), (b,), device=device)]  # (B, 2)
    use = (torch.rand(b, device=device) < args.endpoint_fraction * args.ratio_r_neq_t)
    return torch.where(use, pick[:, 0], t), torch.where(use, pick[:, 1], r)


def one_jump_from_noise(student):
    """(noise, t, cond) -> the student's 1-step sample as its saved sampler computes it from that noise:
    x0 = z - t u(z, 0, t). On the RF view of a VP teacher the stock sampler's x_T = noise is the RF point
    z = noise / (a + s) at the last timestep; on an RF teacher z is the noise itself."""
    scale = 1.0
    if isinstance(student, FlowView):
        source = student.denoiser.process
        end = torch.tensor(source.t_max)
        scale = float(1 / (source.alpha(end) + source.sigma(end)))
    return lambda z, t, cond: student(scale * z, t, cond, target="x0", r=torch.zeros_like(t))


def main(argv=None):
    args = parse_args(MeanFlowArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_meanflow", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Teacher (frozen) and student (teacher + interval input r), one optimizer.
    t2i = data = None  # a stock SD1.5 / SDXL teacher (--pretrained_model_name_or_path) with real images, else digits
    if args.text.pretrained_model_name_or_path is not None:
        data = TextToImageData(args.text, accelerator, run, guidance_scale=args.guidance_scale)
        t2i = data.teacher
        process, prediction_type = t2i.process, t2i.prediction_type
        teacher_unet = t2i.model
        student_unet = add_interval_input(copy.deepcopy(t2i.model).float(), dim=args.interval_dim).requires_grad_(True)
        probe_cond, sample_shape = t2i.cond(data.negative, None, "cpu"), t2i.latent_shape
    else:
        teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
        process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
        teacher_unet = teacher_pipe.unet
        student_unet = add_interval_input(teacher_pipe.unet, dim=args.interval_dim).requires_grad_(True)
        probe_cond, sample_shape = digits_cond(torch.zeros(1, dtype=torch.long)), (1, 8, 8)
    modules = {"teacher": teacher_unet.requires_grad_(False), "student": student_unet}
    params = {"student": list(student_unet.parameters())}
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule)}
    add_adversarial_heads(modules, params, optimizers, args.adv, Denoiser(modules["teacher"], process, prediction_type),
                          probe_cond, sample_shape, args.optimizer, schedule)  # --adv_weight > 0 only
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    optimizer, lr_scheduler = optimizers["student"]
    # The stock SD call feeds the interval as its guidance embedding; our DigitsPipeline feeds Fourier features.
    interval = "guidance" if t2i is not None else "fourier"
    frozen_teacher = Denoiser(modules["teacher"], process, prediction_type)  # v (distillation), the heads' features
    teacher = frozen_teacher if args.source == "teacher" else None
    student = Denoiser(modules["student"], process, prediction_type, interval=interval)
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if t2i is not None:  # MeanFlow on the RF view of the VP teacher; DDIM (trailing) is its jump z_r = z_t - (t - r) u
        student, teacher = FlowView(student), (FlowView(teacher) if teacher is not None else None)
        scheduler = t2i.student_scheduler(stochastic=False)
        # The sampler's times in RF time; its last step lands on alpha = 1 (set_alpha_to_one), i.e. t = 0.
        times = [[float(student.rf_time(t)) if t > 0 else 0.0 for t in t_list_from_scheduler(scheduler, n).double()]
                 for n in (1, 2)]
        jumps = [(ts[i], ts[i + 1]) for ts in times for i in range(len(ts) - 1)]  # (1, 0), (1, mid), (mid, 0)
        sampling = [{**t2i.sampling_kwargs(n), "guidance_scale": interval_guidance_scale(n)} for n in (1, 2)]
        batches, step = resumed_batches(accelerator, run, ema, logger, data)
    else:
        scheduler, jumps, sampling = flow_map_scheduler(), ((1.0, 0.0), (1.0, 0.5), (0.5, 0.0)), None
        batches, step = digits_batches(accelerator, run, ema, logger)
    t_max = student.process.t_max
    adversarial = AdversarialTerm(args.adv, frozen_teacher, modules, params, optimizers, torch.tensor([t_max, 0.0]),
                                  args.optimizer.max_grad_norm, jump=one_jump_from_noise(student))

    # 2. The loop: one MeanFlow step per iteration.
    def validate(s):  # a 1-step sample grid of the EMA student every `validation_steps`
        if t2i is not None:  # the teacher's pipeline class with the interval as its guidance_scale
            return validate_text_to_image_student(accelerator, modules, ema, t2i, scheduler, data.validation_embeddings(),
                                                  num_steps=1, step=s, output_dir=run.output_dir, sampling=sampling[0])
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
        t, r = sample_t_r(x0.shape[0], args, x0.device, t_max=t_max, jumps=jumps)
        loss, logs = meanflow_step(student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond,
                                   guidance_scale=t2i.cfg_scale if t2i is not None else args.guidance_scale,
                                   jvp_method=args.jvp_method, fd_eps=args.fd_eps, adaptive_p=args.adaptive_p,
                                   warmup=min(1.0, step / args.warmup_steps) if args.warmup_steps else 1.0)
        logs = {"loss": loss.detach(), **logs}
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
    name = "MeanFlow student" + (" (from data)" if args.source == "data" else "")
    if t2i is not None:
        finish_text_to_image_run(accelerator, modules, params, optimizers, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=1, method="MeanFlow", prompts=data.prompts, logger=logger,
                                 push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id, sampling=sampling)
        progress.summary("train_meanflow", logger)
        return
    finish_digits_run(accelerator, modules, params, optimizers, ema, scheduler, output_dir=run.output_dir,
                      teacher_path=args.teacher, num_steps=1, step=step, eval_num_samples=args.eval_num_samples,
                      name=name, logger=logger, step_counts=[1, 2])

    progress.summary("train_meanflow", logger)

if __name__ == "__main__":
    run_main(main)
