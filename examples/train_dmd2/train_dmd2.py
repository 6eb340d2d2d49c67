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
from contextlib import nullcontext
from dataclasses import dataclass, field, replace

import torch
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.evaluation.digits_benchmark import write_benchmark
from diffusers_fastgen.guidance import guided_prediction
from diffusers_fastgen.losses import denoising_loss
from diffusers_fastgen.losses.distribution_matching import (
    approx_r1_loss,
    dmd_generator_loss,
    gan_discriminator_loss,
    gan_generator_loss,
)
from diffusers_fastgen.models import Denoiser, unwrap_model
from diffusers_fastgen.models.discriminator import head_for_features
from diffusers_fastgen.models.features import run_until_tap, tap_features
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.parametrization import add_noise, process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_match_sde_scheduler, t_list_from_scheduler
from diffusers_fastgen.timesteps import sample_uniform
from diffusers_fastgen.training import (
    EMAArgs,
    check_replicas_in_sync,
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
from diffusers_fastgen.training.lora import BASE, adapter_parameters, add_lora_adapters

logger = logging.getLogger("train_dmd2")


@dataclass
class DMD2Args:
    """DMD2 distillation of a teacher pipeline into a few-step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/dmd2", max_train_steps=250,
                                                         train_batch_size=128, checkpointing_steps=125,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-4, adam_beta1=0.0,
                                                                           adam_beta2=0.999, max_grad_norm=10.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=2.0))
    teacher: str = DIGITS_TEACHER_PATH  # teacher pipeline folder (default: the shipped digits teacher)
    num_student_steps: int = 1  # the student's step count (t_list length - 1)
    shift: float = 1.0  # student schedule: sigmas = shift(linspace(1, 0, N + 1)), fresh-noise re-noising
    guidance_scale: float = 1.0  # teacher CFG in the real score
    fake_score_learning_rate: float = 1e-4  # AdamW learning rate of the fake score
    student_update_freq: int = 5  # student step every N iterations (fake score every iteration)
    dmd_t_min: float = 0.02  # the DMD loss noises student samples at t ~ U[dmd_t_min, dmd_t_max]
    dmd_t_max: float = 0.98
    backward_simulation: bool = True  # multi-step: inputs from the student's own rollout (else noised data)
    lora_rank: int = 0  # > 0: student and fake score are LoRA adapters on one frozen base (the teacher)
    gan_generator_weight: float = 0.0  # > 0 turns on DMD2's GAN branch: weight of the student's GAN loss
    gan_discriminator_weight: float = 1e-2  # weight of the discriminator loss added to the fake-score loss
    gan_feature_module: str = "mid_block"  # fake-score block whose output the discriminator head reads
    r1_weight: float = 0.0  # approximate R1 on real data (0 = off)
    r1_sigma: float = 0.01  # perturbation of real inputs for approximate R1
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
        if self.gan_generator_weight < 0 or self.gan_discriminator_weight < 0 or self.r1_weight < 0:
            raise ValueError("`gan_generator_weight`, `gan_discriminator_weight` and `r1_weight` must be >= 0.")
        if self.lora_rank < 0:
            raise ValueError(f"`lora_rank` must be >= 0 (0 = full fine-tuning), got {self.lora_rank}.")
        if self.fake_score_learning_rate <= 0:
            raise ValueError(f"`fake_score_learning_rate` must be > 0, got {self.fake_score_learning_rate}.")


def student_inputs(student: Denoiser, noise, cond, t_list, real_x0, *, backward_simulation: bool):
    """(x_t, t) at a uniformly chosen point of the student's schedule, no gradient.

    Point 0 is the noise itself. Point i > 0 is reached by the student's own i-step rollout
    (backward simulation, DMD2 Sec. 4.5) or by noising real data (`real_x0`)."""
    b, k = noise.shape[0], len(t_list) - 1
    i = int(torch.randint(0, k, ())) if k > 1 else 0
    t = t_list[i].expand(b).to(noise.device)
    if i == 0:
        return noise, t
    if not backward_simulation:
        return add_noise(student.process, real_x0, torch.randn_like(noise), t), t
    x = noise
    with torch.no_grad():
        for j in range(i):
            x0 = student(x, t_list[j].expand(b).to(noise.device), cond)
            x = add_noise(student.process, x0, torch.randn_like(noise), t_list[j + 1].expand(b).to(noise.device))
    return x, t


def student_step(student, teacher, fake_score, x_t, t, cond, uncond, *, guidance_scale, t_min, t_max,
                 head=None, gan_weight: float = 0.0, feature_module: str = "mid_block"):
    """DMD loss of the student's x0 at (x_t, t): teacher (real, with CFG) vs fake score at a fresh noise
    level; with the GAN branch (`head`, gan_weight > 0) plus the non-saturating GAN loss of the head on the
    fake score's `feature_module` features of the same noisy sample, differentiated w.r.t. the sample.

    Network evaluations: student fwd + bwd, teacher fwd (one 2B batch with CFG), fake fwd; GAN: + fake fwd
    cut at the tapped block and its bwd to the input (cheaper than recording the whole fake forward)."""
    gan = head is not None and gan_weight > 0
    x0 = student(x_t, t, cond)
    s = sample_uniform((x0.shape[0],), t_min=t_min, t_max=t_max, device=x0.device)
    noisy = add_noise(student.process, x0 if gan else x0.detach(), torch.randn_like(x0), s)
    with torch.no_grad():
        x0_teacher = guided_prediction(teacher, noisy.detach(), s, cond, uncond, guidance_scale)
        x0_fake = fake_score(noisy.detach(), s, cond)
    loss = dmd_generator_loss(x0, x0_teacher, x0_fake)
    if gan:
        loss = loss + gan_weight * gan_generator_loss(head(run_until_tap(fake_score, noisy, s, cond, feature_module)))
    return loss.mean()


def fake_score_step(student, fake_score, x_t, t, cond, *, real_x0=None, head=None, disc_weight: float = 0.0,
                    feature_module: str = "mid_block", r1_weight: float = 0.0, r1_sigma: float = 0.01):
    """Denoising loss of the fake score on fresh student samples (the student is not differentiated);
    with the GAN branch (`head`) plus the discriminator loss on the fake score's features: fake
    features come from the denoising forward itself, real ones from noised `real_x0` with a forward cut
    at the tapped block; optional approximate R1 on perturbed real inputs.

    Network evaluations: student fwd (no grad), fake fwd + bwd (GAN: + fake fwd to the tapped block and
    its bwd, for real data; R1: once more)."""
    with torch.no_grad():
        x0 = student(x_t, t, cond)
    eps = torch.randn_like(x0)
    s = sample_uniform((x0.shape[0],), t_min=0.0, t_max=1.0, device=x0.device)
    noisy = add_noise(fake_score.process, x0, eps, s)
    with tap_features(fake_score.model, feature_module) if head is not None else nullcontext([]) as features:
        prediction = fake_score(noisy, s, cond, target=fake_score.prediction_type)
    loss = denoising_loss(prediction, x0, eps, s, process=fake_score.process, prediction_type=fake_score.prediction_type)
    if head is None:
        return loss.mean()
    noisy_real = add_noise(fake_score.process, real_x0, torch.randn_like(real_x0), s)
    logits_real = head(run_until_tap(fake_score, noisy_real, s, cond, feature_module))
    loss = loss + disc_weight * gan_discriminator_loss(logits_real, head(features[0]))
    if r1_weight > 0:
        perturbed = noisy_real + r1_sigma * torch.randn_like(noisy_real)
        logits_perturbed = head(run_until_tap(fake_score, perturbed, s, cond, feature_module))
        loss = loss + r1_weight * approx_r1_loss(logits_real, logits_perturbed)
    return loss.mean()


def build_players(args: DMD2Args):
    """(modules to prepare, {player: parameters}, process, prediction type, adapters or None).

    Full mode: teacher, and student + fake score as trainable copies of it.
    LoRA mode: one frozen base with adapters "student" and "fake_score"; the teacher is the base."""
    teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
    process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
    base = teacher_pipe.unet.requires_grad_(False)
    if args.lora_rank:
        add_lora_adapters(base, ["student", "fake_score"], rank=args.lora_rank)
        params = {"student": adapter_parameters(base, "student"), "fake_score": adapter_parameters(base, "fake_score")}
        return {"base": base}, params, process, prediction_type
    base.eval()
    student, fake = copy.deepcopy(base).requires_grad_(True), copy.deepcopy(base).requires_grad_(True)
    params = {"student": list(student.parameters()), "fake_score": list(fake.parameters())}
    return {"teacher": base, "student": student, "fake_score": fake}, params, process, prediction_type


def make_head(fake_module, process, prediction_type, args: DMD2Args):
    """Size a discriminator head by one dry forward of the fake score cut at `gan_feature_module`."""
    adapter = "fake_score" if args.lora_rank else None
    probe = Denoiser(fake_module, process, prediction_type, adapter=adapter)
    with torch.no_grad():
        labels = torch.zeros(1, dtype=torch.long)
        features = run_until_tap(probe, torch.zeros(1, 1, 8, 8), torch.full((1,), 0.5), digits_cond(labels),
                                 args.gan_feature_module)
    return head_for_features(features)


def save_student(accelerator, modules, ema, scheduler, args: DMD2Args, step: int) -> DigitsPipeline:
    """Write the student as a pipeline folder (full) or base pipeline + LoRA weights (LoRA), then reload it
    the way a user would and sample a grid."""
    out = args.run.output_dir
    if args.lora_rank:
        base = accelerator.unwrap_model(modules["base"])
        ema.copy_to(base)
        lora = get_peft_model_state_dict(base, adapter_name="student")
        DigitsPipeline(unet=DigitsPipeline.from_pretrained(args.teacher).unet, scheduler=scheduler).save_pretrained(out)
        DigitsPipeline.save_lora_weights(out, unet_lora_layers=lora)
        pipe = DigitsPipeline.from_pretrained(out)
        pipe.load_lora_weights(out)  # stock diffusers LoRA loading
    else:
        model = accelerator.unwrap_model(modules["student"])
        ema.copy_to(model)
        DigitsPipeline(unet=model, scheduler=scheduler).save_pretrained(out)
        pipe = DigitsPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    images = pipe(torch.arange(10).repeat(10), num_inference_steps=args.num_student_steps, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    save_image_grid(images, os.path.join(out, "samples.png"), nrow=10, upscale=4)
    log_image_grid(accelerator, images, step, tag="student", nrow=10)
    return pipe


def main(argv=None):
    args = parse_args(DMD2Args, argv)
    run = args.run
    accelerator = setup_accelerator(run, "train_dmd2", args, find_unused_parameters=args.lora_rank > 0)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Players, and one optimizer per trainable player.
    modules, params, process, prediction_type = build_players(args)
    if args.gan_generator_weight > 0:  # discriminator head on the fake score's features, trained with it
        modules["head"] = make_head(modules.get("fake_score", modules.get("base")), process, prediction_type, args)
        params["fake_score"] = params["fake_score"] + list(modules["head"].parameters())
    for name, module in modules.items():
        if run.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing") and name != "teacher":
            module.enable_gradient_checkpointing()
        module.train(name != "teacher")
    student_opt, student_lr = make_optimizer(params["student"], args.optimizer)
    fake_opt, fake_lr = make_optimizer(params["fake_score"], replace(args.optimizer,
                                                                     learning_rate=args.fake_score_learning_rate))
    trainable = [n for n in modules if n != "teacher"]
    prepared = accelerator.prepare(*(modules[n] for n in trainable), student_opt, fake_opt, student_lr, fake_lr)
    modules.update(zip(trainable, prepared[:len(trainable)]))
    student_opt, fake_opt, student_lr, fake_lr = prepared[len(trainable):]
    if args.lora_rank:
        unet = modules["base"]
        teacher = Denoiser(unet, process, prediction_type, adapter=BASE)
        student = Denoiser(unet, process, prediction_type, adapter="student")
        fake_score = Denoiser(unet, process, prediction_type, adapter="fake_score")
        ema_names = [n for n, p in unwrap_model(unet).named_parameters() if "lora_" in n and ".student" in n]
    else:
        teacher = Denoiser(modules["teacher"].to(accelerator.device), process, prediction_type)
        student = Denoiser(modules["student"], process, prediction_type)
        fake_score = Denoiser(modules["fake_score"], process, prediction_type)
        ema_names = None
    ema = EMA(student.model, schedule=args.ema.ema_schedule, decay=args.ema.ema_decay,
              halflife_kimg=args.ema.ema_halflife_kimg, batch_size=run.train_batch_size * accelerator.num_processes,
              gamma=args.ema.ema_gamma, start_iter=args.ema.ema_start_iter, parameters=ema_names)
    scheduler = flow_match_sde_scheduler(shift=args.shift)
    t_list = t_list_from_scheduler(scheduler, args.num_student_steps)

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

    # 2. Alternating updates: fake score every iteration, student every `student_update_freq`.
    progress = tqdm(range(run.max_train_steps), initial=step, disable=not accelerator.is_local_main_process)
    logs = {}
    while step < run.max_train_steps:
        real_x0, y = (t.to(accelerator.device) for t in next(batches))
        noise = torch.randn_like(real_x0)
        cond, uncond = digits_cond(y), digits_cond(torch.full_like(y, NULL_CLASS))
        x_t, t = student_inputs(student, noise, cond, t_list, real_x0, backward_simulation=args.backward_simulation)
        iteration += 1
        if iteration % args.student_update_freq:
            loss = fake_score_step(student, fake_score, x_t, t, cond, real_x0=real_x0, head=modules.get("head"),
                                   disc_weight=args.gan_discriminator_weight, feature_module=args.gan_feature_module,
                                   r1_weight=args.r1_weight, r1_sigma=args.r1_sigma)
            update(accelerator, loss, params["fake_score"], fake_opt, fake_lr, args.optimizer.max_grad_norm)
            logs["fake_score_loss"] = loss.detach()
            continue
        loss = student_step(student, teacher, fake_score, x_t, t, cond, uncond, guidance_scale=args.guidance_scale,
                            t_min=args.dmd_t_min, t_max=args.dmd_t_max, head=modules.get("head"),
                            gan_weight=args.gan_generator_weight, feature_module=args.gan_feature_module)
        update(accelerator, loss, params["student"], student_opt, student_lr, args.optimizer.max_grad_norm)
        if "head" in modules:
            fake_opt.zero_grad(set_to_none=True)  # the GAN loss also reached the fake score and head: drop that
        ema.update(student.model)
        step += 1
        progress.update(1)
        logs["dmd_loss"] = loss.detach()
        if step % run.logging_steps == 0:
            scalars = {k: v.item() for k, v in logs.items()}
            progress.set_postfix(**scalars)
            accelerator.log(scalars, step=step)
        if run.checkpointing_steps and step % run.checkpointing_steps == 0:
            save_checkpoint(accelerator, run.output_dir, step, emas={"student": ema},
                            total_limit=run.checkpoints_total_limit)

    accelerator.wait_for_everyone()
    check_replicas_in_sync(accelerator, params["student"] + params["fake_score"])
    if accelerator.is_main_process:
        logger.info("peak RSS %.1f MB; weights + grads + optimizer state %.1f MB; trainable parameters: "
                    "student %d, fake score %d", peak_rss_mb(), training_state_mb(modules, [student_opt, fake_opt]),
                    sum(p.numel() for p in params["student"]), sum(p.numel() for p in params["fake_score"]))
        pipe = save_student(accelerator, modules, ema, scheduler, args, step)
        logger.info("saved the student to %s", run.output_dir)
        if args.eval_num_samples:
            print(write_benchmark(pipe, run.output_dir, name="DMD2 student" + (" (LoRA)" if args.lora_rank else ""),
                                  num_samples=args.eval_num_samples, step_counts=[args.num_student_steps]))
    accelerator.wait_for_everyone()  # ranks tear the process group down together (a lone gloo rank can hang)
    accelerator.end_training()


def update(accelerator, loss, params, optimizer, lr_scheduler, max_grad_norm: float) -> None:
    """backward, clip, step, zero_grad for one player."""
    accelerator.backward(loss)
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def training_state_mb(modules: dict, optimizers) -> float:
    """Bytes held by every player's weights, their gradients and the optimizer states, in MB."""
    params = {id(p): p for m in modules.values() for p in m.parameters()}.values()
    total = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in params)
    for opt in optimizers:
        total += sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
                     if torch.is_tensor(v))
    return total / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
