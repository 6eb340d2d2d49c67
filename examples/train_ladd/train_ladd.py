"""LADD: latent adversarial diffusion distillation (Sauer et al., arXiv:2403.12015).

Pure adversarial distillation: no regression or score-matching term. Players:
  teacher   frozen; the discriminator's feature network. Student samples and real data are re-noised
            at s ~ logit-normal(ladd_t_mean, ladd_t_std) and the teacher's outputs at `feature_modules`
            feed one head each. The paper biases s to high noise (mean 1) for megapixel latents; on
            8x8 digits that noise hid every real/fake difference (the discriminator stayed at chance
            and the student got worse), so the default here is mean -1 (median s = 0.27).
  heads     small discriminator heads (conv for UNet features, token MLP for transformers), trained
            with the hinge loss on re-noised real vs student samples (the teacher is not trained).
  student   every `student_update_freq` iterations: the hinge generator loss, differentiated through
            the frozen teacher and heads back to its sample.
The student starts as a copy of the teacher (or as a LoRA adapter on it, `--lora_rank`).

    accelerate launch examples/train_ladd/train_ladd.py --output_dir outputs/ladd
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import torch
from accelerate.logging import get_logger

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.models.digits import digits_cond
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_match_sde_scheduler, t_list_from_scheduler
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
from diffusers_fastgen.training.data import InfiniteBatches, load_digits_arrays
from diffusers_fastgen.training.distribution_matching_steps import (
    build_players,
    finish_digits_run,
    ladd_discriminator_step,
    ladd_student_step,
    make_heads,
    player_denoisers,
    prepare_players,
    student_ema,
    student_inputs,
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

logger = get_logger("train_ladd", log_level="INFO")


@dataclass
class LADDArgs:
    """LADD: adversarial distillation of a teacher pipeline on its own features."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/ladd", max_train_steps=600,
                                                         train_batch_size=128, checkpointing_steps=300,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta1=0.0,
                                                                           adam_beta2=0.99, max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=2.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image teacher + real images instead
    teacher: str = DIGITS_TEACHER_PATH  # teacher pipeline folder (default: the shipped digits teacher)
    num_student_steps: int = 1  # the student's step count (t_list length - 1)
    shift: float = 1.0  # student schedule: sigmas = shift(linspace(1, 0, N + 1)), fresh-noise re-noising
    head_learning_rate: float = 1e-3  # AdamW learning rate of the discriminator heads
    student_update_freq: int = 2  # student step every N iterations (heads every other iteration)
    feature_modules: list[str] = field(default_factory=lambda: ["down_blocks.0", "down_blocks.1", "mid_block"])  # teacher taps
    ladd_t_mean: float = -1.0  # re-noising level s ~ logit-normal(mean, std) for the discriminator (digits: low noise)
    ladd_t_std: float = 1.0
    backward_simulation: bool = True  # multi-step: inputs from the student's own rollout (else noised data)
    lora_rank: int = 0  # > 0: the student is a LoRA adapter on the frozen teacher
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        self.text.require(images=True)  # the discriminator compares real and generated images
        if self.num_student_steps < 1:
            raise ValueError(f"`num_student_steps` must be >= 1, got {self.num_student_steps}.")
        if self.student_update_freq < 2:
            raise ValueError(f"`student_update_freq` must be >= 2 (heads train in between), got {self.student_update_freq}.")
        if not self.feature_modules:
            raise ValueError("`feature_modules` must name at least one teacher block.")
        if self.ladd_t_std <= 0:
            raise ValueError(f"`ladd_t_std` must be > 0, got {self.ladd_t_std}.")
        if self.lora_rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0 (0 = full fine-tuning), got {self.lora_rank}.")
        if self.head_learning_rate <= 0:
            raise ValueError(f"`head_learning_rate` must be > 0, got {self.head_learning_rate}.")


def main(argv=None):
    args = parse_args(LADDArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_ladd", args, find_unused_parameters=args.lora_rank > 0)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Players (teacher, student, heads on the teacher's features), one optimizer per trained player.
    t2i = data = None  # a stock text-to-image teacher with real images (--pretrained_model_name_or_path), else digits
    if args.text.pretrained_model_name_or_path is not None:
        data = TextToImageData(args.text, accelerator, run)  # LADD's teacher is only a feature extractor
        t2i = data.teacher
        teacher_model, process, prediction_type = t2i.model, t2i.process, t2i.prediction_type
        probe_cond, sample_shape = t2i.cond(data.negative, None, "cpu"), t2i.latent_shape
    else:
        teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
        process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
        teacher_model = teacher_pipe.unet
        probe_cond, sample_shape = digits_cond(torch.zeros(1, dtype=torch.long)), (1, 8, 8)
    modules, params = build_players(teacher_model, lora_rank=args.lora_rank, trainable=("student",))
    nets = player_denoisers(modules, process, prediction_type, names=("student",))
    modules["heads"] = make_heads(nets["teacher"], args.feature_modules, probe_cond, sample_shape)
    params["heads"] = list(modules["heads"].parameters())
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    critic_schedule = {**schedule, "num_training_steps": run.max_train_steps * max(args.student_update_freq - 1, 1)}
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule),
                  "heads": make_optimizer(params["heads"], replace(args.optimizer, learning_rate=args.head_learning_rate),
                                          **critic_schedule)}
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    (student_opt, student_lr), (head_opt, head_lr) = optimizers["student"], optimizers["heads"]
    nets = player_denoisers(modules, process, prediction_type, names=("student",))  # over the prepared modules
    teacher, student = nets["teacher"], nets["student"]
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if t2i is not None:  # x0, then fresh noise: LCMScheduler (VP) / stochastic flow-matching Euler (RF)
        scheduler = t2i.student_scheduler(stochastic=True)
        t_list = t2i.student_t_list(scheduler, args.num_student_steps)
        batches = data
    else:
        scheduler = flow_match_sde_scheduler(shift=args.shift)
        t_list = t_list_from_scheduler(scheduler, args.num_student_steps)
        images, labels = (torch.from_numpy(a) for a in load_digits_arrays("train"))
        batches = InfiniteBatches(images, labels, batch_size=run.train_batch_size, seed=run.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)

    step = resume_step(accelerator, run, ema, logger)  # counts student updates
    iteration = step * args.student_update_freq * run.gradient_accumulation_steps  # counts micro-batches
    batches.state_at(iteration)

    # 2. Alternating updates: heads on the other iterations, student every `student_update_freq`.
    taps = dict(feature_modules=args.feature_modules, t_mean=args.ladd_t_mean, t_std=args.ladd_t_std)
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
        if t2i is not None:  # real latents with their captions' embeddings
            real_x0, cond, _ = data.next(accelerator.device)
        else:
            real_x0, y = (t.to(accelerator.device) for t in next(batches))
            cond = digits_cond(y)
        x_t, t = student_inputs(student, torch.randn_like(real_x0), cond, t_list, real_x0,
                                backward_simulation=args.backward_simulation)
        iteration += 1
        if ((iteration - 1) // run.gradient_accumulation_steps + 1) % args.student_update_freq:  # fake-score update
            loss = ladd_discriminator_step(student, teacher, modules["heads"], x_t, t, cond, real_x0, **taps)
            update(accelerator, loss, params["heads"], head_opt, head_lr, args.optimizer.max_grad_norm,
                   guard=guard, accumulator=accumulator, player="discriminator", step=step)
            logs["discriminator_loss"] = loss.detach()
            continue
        loss = ladd_student_step(student, teacher, modules["heads"], x_t, t, cond, **taps)
        if not update(accelerator, loss, params["student"], student_opt, student_lr, args.optimizer.max_grad_norm,
                      guard=guard, accumulator=accumulator, step=step + 1):
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(student.model)
        step += 1
        logs["generator_loss"] = loss.detach()
        log_and_checkpoint(accelerator, run, step, logs, ema, progress, validate=validate)

    if t2i is not None:
        finish_text_to_image_run(accelerator, modules, params, optimizers, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=args.num_student_steps, method="LADD",
                                 prompts=data.prompts, logger=logger, push_to_hub=args.text.push_to_hub,
                                 hub_model_id=args.text.hub_model_id)
        progress.summary("train_ladd", logger)
        return
    finish_digits_run(accelerator, modules, params, optimizers, ema, scheduler, output_dir=run.output_dir,
                      teacher_path=args.teacher, num_steps=args.num_student_steps, step=step,
                      eval_num_samples=args.eval_num_samples, name="LADD student", logger=logger)

    progress.summary("train_ladd", logger)

if __name__ == "__main__":
    run_main(main)
