"""Players shared by every distillation script: preparing them for accelerate, the student's EMA, and
the end of a digits run (save the student as a pipeline folder, reload it, write its benchmark rows).

`modules` is {name: nn.Module}: "teacher" (frozen, not prepared) and the trained players ("student",
"fake_score", ... ), or {"base"} with LoRA adapters per player (training.lora).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from huggingface_hub import create_repo, upload_folder
from peft.utils import get_peft_model_state_dict

from ..ema import EMA
from ..evaluation.digits_benchmark import write_benchmark
from ..models import unwrap_model
from ..pipelines import DigitsPipeline
from .accelerate_setup import check_replicas_in_sync, peak_rss_mb, training_state_mb
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import InfiniteBatches, load_digits_arrays
from .lora import use_adapter
from .nonfinite import check_finite
from .teachers import apply_recipe, lora_config, lora_state
from .validation import log_image_grid, save_image_grid


def save_digits_student(accelerator, modules, ema, scheduler, *, output_dir: str, teacher_path: str,
                        num_steps: int, step: int = 0):
    """Write the student (EMA weights) as a DigitsPipeline folder carrying `scheduler` (full mode), or as
    the base pipeline + `save_lora_weights` (LoRA mode), reload it the way a user would (stock
    `load_lora_weights` for LoRA) and save a sample grid. Returns the reloaded pipeline."""
    if "base" in modules:
        base = accelerator.unwrap_model(modules["base"])
        ema.copy_to(base)
        check_finite(base, "the student (LoRA base + adapters)")
        lora = get_peft_model_state_dict(base, adapter_name="student")
        DigitsPipeline(unet=DigitsPipeline.from_pretrained(teacher_path).unet, scheduler=scheduler).save_pretrained(output_dir)
        DigitsPipeline.save_lora_weights(output_dir, unet_lora_layers=lora,
                                         unet_lora_adapter_metadata=lora_config(base, "student"))
        pipe = DigitsPipeline.from_pretrained(output_dir)
        pipe.load_lora_weights(output_dir)  # stock diffusers LoRA loading
    else:
        model = accelerator.unwrap_model(modules["student"])
        ema.copy_to(model)
        check_finite(model, "the student")
        DigitsPipeline(unet=model, scheduler=scheduler).save_pretrained(output_dir)
        pipe = DigitsPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    images = pipe(torch.arange(10).repeat(10), num_inference_steps=num_steps, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    save_image_grid(images, os.path.join(output_dir, "samples.png"), nrow=10, upscale=4)
    log_image_grid(accelerator, images, step, tag="student", nrow=10)
    return pipe


def prepare_players(accelerator, modules: dict, optimizers: dict, *, gradient_checkpointing: bool = False):
    """Train mode (the teacher: eval, moved to the device), gradient checkpointing on the trained players,
    and `accelerator.prepare` of every trained module with `optimizers` = {player: (optimizer, lr_scheduler)}.
    Returns (modules, optimizers) holding the prepared objects."""
    for name, module in modules.items():
        if gradient_checkpointing and name != "teacher" and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        module.train(name != "teacher")
    trainable = [n for n in modules if n != "teacher"]
    players = list(optimizers)
    prepared = accelerator.prepare(*(modules[n] for n in trainable), *(optimizers[n][0] for n in players),
                                   *(optimizers[n][1] for n in players))
    k, p = len(trainable), len(players)
    modules = {**modules, **dict(zip(trainable, prepared[:k]))}
    optimizers = {n: (prepared[k + i], prepared[k + p + i]) for i, n in enumerate(players)}
    if "teacher" in modules:
        modules["teacher"].to(accelerator.device)
    return modules, optimizers


def student_ema(accelerator, modules: dict, ema_args, batch_size: int):
    """EMA of the student: the whole student module, or (LoRA mode) only the student adapter's weights."""
    model, names = modules.get("student"), None
    if "base" in modules:
        model = modules["base"]
        names = [n for n, _ in unwrap_model(model).named_parameters() if "lora_" in n and ".student" in n]
    return EMA(model, schedule=ema_args.ema_schedule, decay=ema_args.ema_decay, halflife_kimg=ema_args.ema_halflife_kimg,
               batch_size=batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps,
               gamma=ema_args.ema_gamma, start_iter=ema_args.ema_start_iter, parameters=names)


def finish_digits_run(accelerator, modules: dict, params: dict, optimizers: dict, ema, scheduler, *, output_dir: str,
                      teacher_path: str, num_steps: int, step: int, eval_num_samples: int, name: str, logger,
                      step_counts=None) -> None:
    """End of a digits distillation run: check that DDP replicas agree, log memory, save the student
    folder (rank 0), write its benchmark rows (at `step_counts`, default [num_steps]), and tear the process
    group down on all ranks together."""
    accelerator.wait_for_everyone()
    check_replicas_in_sync(accelerator, [p for ps in params.values() for p in ps])
    if accelerator.is_main_process:
        counts = ", ".join(f"{n} {sum(p.numel() for p in ps)}" for n, ps in params.items())
        logger.info("peak RSS %.1f MB; weights + grads + optimizer state %.1f MB; trainable parameters: %s",
                    peak_rss_mb(), training_state_mb(modules.values(), [o for o, _ in optimizers.values()]), counts)
        pipe = save_digits_student(accelerator, modules, ema, scheduler, output_dir=output_dir,
                                   teacher_path=teacher_path, num_steps=num_steps, step=step)
        logger.info("saved the student to %s", output_dir)
        if eval_num_samples:
            print(write_benchmark(pipe, output_dir, name=name + (" (LoRA)" if "base" in modules else ""),
                                  num_samples=eval_num_samples, step_counts=step_counts or [num_steps]))
    accelerator.wait_for_everyone()  # ranks tear the process group down together (a lone gloo rank can hang)
    accelerator.end_training()


@torch.no_grad()
def validate_text_to_image_student(accelerator, modules: dict, ema, teacher, scheduler, embeddings: dict, *,
                                   num_steps: int, step: int, output_dir: str, sampling: dict | None = None) -> None:
    """Samples of the EMA student for a few prompts through the teacher's own pipeline class (its VAE, the
    recipe scheduler, precomputed embeddings: the text encoders are released): samples/step_<step>.png and the
    trackers. The EMA weights are swapped in and the training weights restored after; LoRA mode runs the
    student adapter. Everything runs in fp32 (a bf16 VAE is copied once to fp32)."""
    model = accelerator.unwrap_model(modules["base"] if "base" in modules else modules["student"])
    components = dict(teacher.pipe.components)
    if components.get("vae") is not None and components["vae"].dtype != torch.float32:
        if getattr(teacher, "_vae_fp32", None) is None:
            teacher._vae_fp32 = copy.deepcopy(components["vae"]).float()
        components["vae"] = teacher._vae_fp32
    with ema_weights(model, ema):
        components[teacher.component] = model.eval()
        components["scheduler"] = type(scheduler).from_config(scheduler.config)
        pipe = type(teacher.pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        # SD3 / Flux draw their re-noising from the global generator: seeded here, the training RNG put back after.
        with torch.random.fork_rng(devices=[]), use_adapter(model, "student" if "base" in modules else None):
            torch.manual_seed(0)
            images = pipe(**teacher.prompt_kwargs(embeddings, torch.float32), height=teacher.resolution,
                          width=teacher.resolution, output_type="pt", generator=torch.Generator().manual_seed(0),
                          **(sampling if sampling is not None else teacher.sampling_kwargs(num_steps))).images
    images = images * 2 - 1
    save_image_grid(images, os.path.join(output_dir, "samples", f"step_{step:06d}.png"), nrow=len(images))
    log_image_grid(accelerator, images, step, tag="student", nrow=len(images))


def finish_text_to_image_run(accelerator, modules: dict, params: dict, optimizers: dict, ema, teacher, scheduler, *,
                             output_dir: str, num_steps: int, method: str, prompts: list[str], logger,
                             push_to_hub: bool = False, hub_model_id: str | None = None,
                             sampling: dict | list[dict] | None = None) -> None:
    """End of a run on a stock text-to-image teacher (`training.teachers.TextToImageTeacher`): check that DDP
    replicas agree, save the EMA student as the teacher's pipeline class with its recipe scheduler (or, in
    LoRA mode, the teacher's `save_lora_weights` file + scheduler) and a model card, reload it with stock
    diffusers, and save a grid of its samples for the first prompts (rank 0). `sampling`: the stock call's
    arguments (a list: one per step count, all in the card, the first for the grid)."""
    accelerator.wait_for_everyone()
    check_replicas_in_sync(accelerator, [p for ps in params.values() for p in ps])
    if accelerator.is_main_process:
        counts = ", ".join(f"{n} {sum(p.numel() for p in ps)}" for n, ps in params.items())
        logger.info("peak RSS %.1f MB; weights + grads + optimizer state %.1f MB; trainable parameters: %s",
                    peak_rss_mb(), training_state_mb(modules.values(), [o for o, _ in optimizers.values()]), counts)
        if "base" in modules:
            base = accelerator.unwrap_model(modules["base"])
            ema.copy_to(base)
            pipe = teacher.save_student(output_dir, None, scheduler, num_steps=num_steps, method=method,
                                        lora_layers=lora_state(base, "student"), lora_config=lora_config(base, "student"),
                                        sampling=sampling)
        else:
            student = accelerator.unwrap_model(modules["student"])
            ema.copy_to(student)
            pipe = teacher.save_student(output_dir, student, scheduler, num_steps=num_steps, method=method,
                                        sampling=sampling)
        logger.info("saved the student to %s", output_dir)
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)  # SD3 / Flux draw the re-noising noise from the global generator
        recipe = apply_recipe(pipe, first_recipe(sampling) if sampling is not None else teacher.sampling_kwargs(num_steps))
        images = pipe(prompts[:8], height=teacher.resolution, width=teacher.resolution, output_type="pt",
                      generator=torch.Generator().manual_seed(0), **recipe).images
        save_image_grid(images * 2 - 1, os.path.join(output_dir, "samples.png"), nrow=min(8, len(images)), upscale=1)
        if push_to_hub:  # the folder as saved (no checkpoints), to the user's repo
            repo_id = create_repo(hub_model_id or os.path.basename(os.path.abspath(output_dir)), exist_ok=True).repo_id
            upload_folder(repo_id=repo_id, folder_path=output_dir, ignore_patterns=["checkpoints/**", "*.tmp"])
            logger.info("pushed %s to the Hub as %s", output_dir, repo_id)
    accelerator.wait_for_everyone()  # ranks tear the process group down together (a lone gloo rank can hang)
    accelerator.end_training()


def first_recipe(sampling: dict | list[dict]) -> dict:
    """The first of a list of sampling recipes (or the one given)."""
    return sampling[0] if isinstance(sampling, list) else sampling


def resume_step(accelerator, run, ema, logger) -> int:
    """`--resume_from_checkpoint` (a path or "latest"): the accelerate state and the student EMA restored, the
    step to continue from returned (0 without a checkpoint)."""
    checkpoint = resolve_checkpoint(run.output_dir, run.resume_from_checkpoint)
    if checkpoint is None:
        return 0
    step = load_checkpoint(accelerator, checkpoint, emas={"student": ema})["step"]
    logger.info("resumed from %s at step %d", checkpoint, step)
    return step


def digits_batches(accelerator, run, ema, logger):
    """(batches over the digits train split, first step): resumes from `run.resume_from_checkpoint`
    (accelerate state + the student EMA) and moves the data order to that step. One batch per step."""
    images, labels = (torch.from_numpy(a) for a in load_digits_arrays("train"))
    batches = InfiniteBatches(images, labels, batch_size=run.train_batch_size, seed=run.seed,
                              rank=accelerator.process_index, world_size=accelerator.num_processes)
    return resumed_batches(accelerator, run, ema, logger, batches)


def resumed_batches(accelerator, run, ema, logger, batches):
    """(batches, first step): `resume_step`, then the data order (`batches.state_at`) moved to that step for
    one batch per step (a script with several iterations per step positions its batches itself)."""
    step = resume_step(accelerator, run, ema, logger)
    batches.state_at(step * run.gradient_accumulation_steps)
    return batches, step


def log_and_checkpoint(accelerator, run, step: int, scalars: dict, ema, progress, *, validate=None) -> None:
    """After an optimizer step: log `scalars` (tensors, read only every `logging_steps`), call
    `validate(step)` on the main process every `validation_steps`, and save an atomic checkpoint every
    `checkpointing_steps` (the trained network's EMA as `ema_student.safetensors` in every script)."""
    progress.update(1, scalars)
    if step % run.logging_steps == 0:
        values = {k: float(v) for k, v in scalars.items()}
        progress.set_postfix(**values)
        accelerator.log(values, step=step)
    if validate is not None and run.validation_steps and step % run.validation_steps == 0 and accelerator.is_main_process:
        validate(step)
    if run.checkpointing_steps and step % run.checkpointing_steps == 0:
        save_checkpoint(accelerator, run.output_dir, step, emas={"student": ema}, total_limit=run.checkpoints_total_limit)


@contextlib.contextmanager
def ema_weights(model, ema):
    """`model` holds the EMA weights inside the block; its training weights and train/eval mode are put back
    after, also on an error."""
    backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in ema.shadow}
    was_training = model.training
    try:
        ema.copy_to(model)
        yield model
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in backup:
                    p.copy_(backup[n])
        model.train(was_training)


@torch.no_grad()
def validate_digits_student(accelerator, modules: dict, ema, scheduler, *, num_steps: int, step: int, output_dir: str):
    """A 10x10 sample grid (one column per class) of the EMA student with `scheduler` at `num_steps`:
    samples/step_<step>.png and the trackers. The EMA weights are swapped in and the training weights
    restored after; in LoRA mode the student adapter is active for the sampling."""
    model = accelerator.unwrap_model(modules["base"] if "base" in modules else modules["student"])
    with ema_weights(model, ema):
        pipe = DigitsPipeline(unet=model.eval(), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        with use_adapter(model, "student" if "base" in modules else None):
            images = pipe(torch.arange(10).repeat(10), num_inference_steps=num_steps, output_type="latent",
                          generator=torch.Generator().manual_seed(0)).images
    save_image_grid(images, os.path.join(output_dir, "samples", f"step_{step:06d}.png"), nrow=10, upscale=4)
    log_image_grid(accelerator, images, step, tag="student", nrow=10)
