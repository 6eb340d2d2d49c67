"""DMD2: distribution matching distillation of a teacher into a 1- or few-step student.

Three players (Yin et al., DMD2, arXiv:2405.14867):
  teacher     frozen; its (CFG) x0 prediction is the "real" score.
  fake_score  a denoiser trained on the student's samples: the student distribution's score.
  student     trained with dmd_generator_loss, every `student_update_freq` iterations
              (two time-scale update rule); the fake score on the other iterations: N - 1 critic
              updates per student update (4 : 1 with the default N = 5; DMD2's paper uses 5 : 1, i.e. N = 6).
The student's inputs are its schedule's points: pure noise at t_list[0], and for multi-step
students the state reached by running itself (backward simulation) or noised real data.
Two optional adversarial terms on real images: DMD2's GAN branch (`--gan_generator_weight`: one head on the fake
score's features, trained with it) or LADD's heads on the frozen teacher's features at several blocks
(`--adv_weight`: `training.adversarial`, trained beside the student on its own iterations).

    accelerate launch examples/train_dmd2/train_dmd2.py --output_dir outputs/dmd2

On a stock text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3, Flux; the process, prediction
type and guidance handling come from the teacher) with a prompt file:

    accelerate launch examples/train_dmd2/train_dmd2.py --pretrained_model_name_or_path <pipeline> \
        --prompts prompts.txt --output_dir outputs/dmd2_sdxl --lora_rank 64 --guidance_scale 8 --weight_dtype bf16

writes the teacher's pipeline class holding the student (or `pytorch_lora_weights.safetensors` for
`load_lora_weights`) with its sampling recipe as a stock scheduler and a model card.

`--student_times 0.4` tells a 1-step student it is at time 0.4 (VP: timestep 400) while it still gets pure noise, as
DMD2's 1-step SDXL model is told timestep 399: an eps-prediction UNet at timestep 999 multiplies its error by
sqrt(1 - alpha_bar) / sqrt(alpha_bar) ~ 15 on the way to x0 (SD's schedule), at 700 by ~ 3.3, at 400 by ~ 1.2. The model
card's call passes the same `timesteps` to the stock pipeline. On the text-to-image digits teacher `--student_times 0.7007`
(timestep 700) with `--gan_generator_weight 0.5` took the 1-step excess FD from ~0.2 to ~0.02 (the real-data floor within
noise); told 400 the student lost recall (docs/results.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch
from accelerate.logging import get_logger

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_match_sde_scheduler, t_list_from_scheduler
from diffusers_fastgen.training import (
    Accumulator,
    AdversarialArgs,
    EMAArgs,
    LoRAArgs,
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
from diffusers_fastgen.training.data import InfiniteBatches, load_digits_arrays
from diffusers_fastgen.training.distribution_matching_steps import (
    build_players,
    fake_score_step,
    finish_digits_run,
    freeze_modules,
    make_heads,
    player_denoisers,
    prepare_players,
    student_ema,
    student_inputs,
    student_step,
)
from diffusers_fastgen.training.image_data import TextToImageData
from diffusers_fastgen.training.players import (
    finish_text_to_image_run,
    log_and_checkpoint,
    resume_step,
    validate_digits_student,
    validate_text_to_image_student,
)
from diffusers_fastgen.training.progress import TrainingProgress

logger = get_logger("train_dmd2", log_level="INFO")


@dataclass
class DMD2Args:
    """DMD2 distillation of a teacher pipeline into a few-step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/dmd2", max_train_steps=250,
                                                         train_batch_size=128, checkpointing_steps=125,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta1=0.0,
                                                                           adam_beta2=0.999, max_grad_norm=10.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=2.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image teacher instead
    teacher: str = DIGITS_TEACHER_PATH  # digits teacher folder (default: the shipped one)
    num_student_steps: int = 1  # the student's step count (t_list length - 1)
    shift: float | None = None  # student schedule shift (default: 1 on digits, the teacher's on flow-matching pipelines)
    student_times: list[float] | None = None  # stock teachers: times in (0, 1], one per step, decreasing; step 1 gets pure noise
    guidance_scale: float = 1.0  # teacher CFG in the real score
    fake_score_learning_rate: float = 1e-4  # AdamW learning rate of the fake score
    student_update_freq: int = 5  # of every N iterations, 1 updates the student and N - 1 the fake score (4 : 1 at 5)
    dmd_t_min: float = 0.02  # the DMD loss noises student samples at t ~ U[dmd_t_min, dmd_t_max]
    dmd_t_max: float = 0.98
    backward_simulation: bool = True  # multi-step: inputs from the student's own rollout (else noised data)
    lora: LoRAArgs = field(default_factory=LoRAArgs)  # LoRA mode: adapters on the frozen teacher
    gan_generator_weight: float = 0.0  # > 0 turns on DMD2's GAN branch: weight of the student's GAN loss
    gan_discriminator_weight: float = 1e-2  # weight of the discriminator loss added to the fake-score loss
    gan_feature_module: str = "mid_block"  # fake-score block whose output the discriminator head reads
    r1_weight: float = 0.0  # approximate R1 on real data (0 = off)
    r1_sigma: float = 0.01  # perturbation of real inputs for approximate R1
    adv: AdversarialArgs = field(default_factory=AdversarialArgs)  # --adv_weight > 0: + LADD on the teacher's features
    student_frozen_modules: list[str] = field(default_factory=list)  # full mode: student blocks kept at the teacher's
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        self.text.require(prompts_or_images=True)  # captions of real images, or a prompt file
        if self.text.pretrained_model_name_or_path is not None and not self.text.has_images:
            if self.gan_generator_weight > 0 or self.r1_weight > 0 or self.adv.adv_weight > 0:
                raise ValueError("`gan_generator_weight` / `r1_weight` / `adv_weight` need real images: pass "
                                 "`train_data_dir` or `dataset_name` (their captions condition the student).")
            if not self.backward_simulation and self.num_student_steps > 1:
                raise ValueError("`backward_simulation` false noises real images: pass `train_data_dir` or "
                                 "`dataset_name`, or keep it true.")
        if self.num_student_steps < 1:
            raise ValueError(f"`num_student_steps` must be >= 1, got {self.num_student_steps}.")
        if self.student_times is not None:
            times = self.student_times
            if self.text.pretrained_model_name_or_path is None:
                raise ValueError("`student_times` needs a stock text-to-image teacher (`pretrained_model_name_or_path`).")
            if (len(times) != self.num_student_steps or not all(0 < t <= 1 for t in times)  # NaN fails the range
                    or any(a <= b for a, b in zip(times, times[1:]))):
                raise ValueError(f"`student_times` must be {self.num_student_steps} decreasing times in (0, 1] (one per "
                                 f"student step), got {times}.")
            if self.adv.adv_weight > 0 and self.adv.adv_num_steps != self.num_student_steps:
                raise ValueError(f"with `student_times` the adversarial term samples the student's own schedule: "
                                 f"`adv_num_steps` must be {self.num_student_steps}, got {self.adv.adv_num_steps}.")
        if self.student_frozen_modules and self.lora.lora_rank > 0:
            raise ValueError("`student_frozen_modules` is for full fine-tuning; a LoRA student trains only its "
                             "`lora_target_modules`.")
        if self.student_update_freq < 1:
            raise ValueError(f"`student_update_freq` must be >= 1, got {self.student_update_freq}.")
        if not 0.0 <= self.dmd_t_min < self.dmd_t_max <= 1.0:
            raise ValueError(f"need 0 <= dmd_t_min < dmd_t_max <= 1, got {self.dmd_t_min}, {self.dmd_t_max}.")
        if self.guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be >= 0, got {self.guidance_scale}.")
        if self.gan_generator_weight < 0 or self.gan_discriminator_weight < 0 or self.r1_weight < 0:
            raise ValueError("`gan_generator_weight`, `gan_discriminator_weight` and `r1_weight` must be >= 0.")
        if self.fake_score_learning_rate <= 0:
            raise ValueError(f"`fake_score_learning_rate` must be > 0, got {self.fake_score_learning_rate}.")


def main(argv=None):
    args = parse_args(DMD2Args, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_dmd2", args, find_unused_parameters=args.lora.lora_rank > 0)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Players (teacher, student, fake score [+ discriminator head]), one optimizer per trained player.
    t2i = data = None  # a stock text-to-image teacher (--pretrained_model_name_or_path), else the digits teacher
    if args.text.pretrained_model_name_or_path is not None:
        data = TextToImageData(args.text, accelerator, run, guidance_scale=args.guidance_scale)
        t2i = data.teacher
        teacher_model, process, prediction_type = t2i.model, t2i.process, t2i.prediction_type
    else:
        teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
        process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
        teacher_model = teacher_pipe.unet
    modules, params = build_players(teacher_model, lora_rank=args.lora.lora_rank, lora_alpha=args.lora.lora_alpha,
                                    lora_target_modules=args.lora.lora_target_modules)
    if args.student_frozen_modules:  # e.g. attn2.to_k attn2.to_v: the student reads the prompt as the teacher does
        params["student"] = freeze_modules(modules["student"], args.student_frozen_modules, arg="student_frozen_modules")
    nets = player_denoisers(modules, process, prediction_type)
    if t2i is not None:  # one dry forward sizes the discriminator heads
        probe_cond, shape = t2i.cond(data.negative, None, "cpu"), t2i.latent_shape
    else:
        probe_cond, shape = digits_cond(torch.zeros(1, dtype=torch.long)), (1, 8, 8)
    if args.gan_generator_weight > 0:  # discriminator head on the fake score's features, trained with it
        modules["head"] = make_heads(nets["fake_score"], [args.gan_feature_module], probe_cond, shape).heads[0]
        params["fake_score"] = params["fake_score"] + list(modules["head"].parameters())
    fake_args = replace(args.optimizer, learning_rate=args.fake_score_learning_rate)
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    critic_schedule = {**schedule, "num_training_steps": run.max_train_steps * max(args.student_update_freq - 1, 1)}
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule),
                  "fake_score": make_optimizer(params["fake_score"], fake_args, **critic_schedule)}
    add_adversarial_heads(modules, params, optimizers, args.adv, nets["teacher"], probe_cond, shape, args.optimizer,
                          schedule)  # --adv_weight > 0 only: LADD heads on the teacher, one step per student update
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    (student_opt, student_lr), (fake_opt, fake_lr) = optimizers["student"], optimizers["fake_score"]
    nets = player_denoisers(modules, process, prediction_type)  # over the prepared (DDP-wrapped) modules
    teacher, student, fake_score = nets["teacher"], nets["student"], nets["fake_score"]
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if t2i is not None:  # the stock scheduler the saved pipeline samples with, and its t_list
        if args.student_times is not None:  # passed to the stock call (timesteps / sigmas): in the model card
            t2i.set_custom_schedule(args.student_times, noise_input=True)
        scheduler = t2i.student_scheduler(shift=args.shift)
        t_list = t2i.student_t_list(scheduler, args.num_student_steps)
        adv_t_list = t2i.student_t_list(scheduler, args.adv.adv_num_steps)
        batches = data
    else:
        scheduler = flow_match_sde_scheduler(shift=1.0 if args.shift is None else args.shift)
        t_list = t_list_from_scheduler(scheduler, args.num_student_steps)
        adv_t_list = t_list_from_scheduler(scheduler, args.adv.adv_num_steps)
        images, labels = (torch.from_numpy(a) for a in load_digits_arrays("train"))
        batches = InfiniteBatches(images, labels, batch_size=run.train_batch_size, seed=run.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)

    adversarial = AdversarialTerm(args.adv, teacher, modules, params, optimizers, adv_t_list, args.optimizer.max_grad_norm)
    step = resume_step(accelerator, run, ema, logger)  # counts student updates
    iteration = step * args.student_update_freq * run.gradient_accumulation_steps  # counts micro-batches
    batches.state_at(iteration)

    # 2. Alternating updates: the student on every `student_update_freq`-th iteration, the fake score on the others.
    def validate(s):  # a sample grid of the EMA student every `validation_steps`
        if t2i is not None:  # the teacher's pipeline class, precomputed embeddings of a few prompts
            return validate_text_to_image_student(accelerator, modules, ema, t2i, scheduler, data.validation_embeddings(),
                                                  num_steps=args.num_student_steps, step=s, output_dir=run.output_dir)
        validate_digits_student(accelerator, modules, ema, scheduler, num_steps=args.num_student_steps, step=s,
                                output_dir=run.output_dir)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    logs = {}
    while step < run.max_train_steps:
        if t2i is not None:  # real x0 with their captions (or None with a prompt file)
            real_x0, cond, uncond = data.next(accelerator.device)
            noise = torch.randn(run.train_batch_size, *t2i.latent_shape, device=accelerator.device)
        else:
            real_x0, y = (t.to(accelerator.device) for t in next(batches))
            noise = torch.randn_like(real_x0)
            cond, uncond = digits_cond(y), digits_cond(torch.full_like(y, NULL_CLASS))
        x_t, t = student_inputs(student, noise, cond, t_list, real_x0, backward_simulation=args.backward_simulation)
        iteration += 1
        if ((iteration - 1) // run.gradient_accumulation_steps + 1) % args.student_update_freq:  # fake-score update
            loss = fake_score_step(student, fake_score, x_t, t, cond, real_x0=real_x0, head=modules.get("head"),
                                   disc_weight=args.gan_discriminator_weight, feature_module=args.gan_feature_module,
                                   r1_weight=args.r1_weight, r1_sigma=args.r1_sigma)
            update(accelerator, loss, params["fake_score"], fake_opt, fake_lr, args.optimizer.max_grad_norm,
                   guard=guard, accumulator=accumulator, player="fake_score", step=step)
            logs["fake_score_loss"] = loss.detach()
            continue
        cfg_scale = t2i.cfg_scale if t2i is not None else args.guidance_scale  # guidance-distilled Flux: no CFG
        loss = student_step(student, teacher, fake_score, x_t, t, cond, uncond, guidance_scale=cfg_scale,
                            t_min=args.dmd_t_min, t_max=args.dmd_t_max, head=modules.get("head"),
                            gan_weight=args.gan_generator_weight, feature_module=args.gan_feature_module,
                            critic_params=params["fake_score"])
        logs["dmd_loss"] = loss.detach()
        loss = adversarial.add_to(loss, logs, student, cond, real_x0)  # --adv_weight > 0 only
        applied = update(accelerator, loss, params["student"], student_opt, student_lr, args.optimizer.max_grad_norm,
                         guard=guard, accumulator=accumulator, step=step + 1)
        adversarial.update_heads(accelerator, guard=guard, accumulator=accumulator, step=step + 1)
        if not applied:
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(student.model)
        step += 1
        log_and_checkpoint(accelerator, run, step, logs, ema, progress, validate=validate)

    if t2i is not None:
        finish_text_to_image_run(accelerator, modules, params, optimizers, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=args.num_student_steps, method="DMD2", prompts=data.prompts, logger=logger,
                                 push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id)
    else:
        finish_digits_run(accelerator, modules, params, optimizers, ema, scheduler, output_dir=run.output_dir,
                          teacher_path=args.teacher, num_steps=args.num_student_steps, step=step,
                          eval_num_samples=args.eval_num_samples, name="DMD2 student", logger=logger)

    progress.summary("train_dmd2", logger)

if __name__ == "__main__":
    run_main(main)
