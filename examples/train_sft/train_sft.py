"""SFT: denoising fine-tuning (or training from scratch) of a diffusers denoiser.

Trains the embedded digits teacher by default (rectified flow, flow-matching target, logit-normal t,
class dropout for classifier-free guidance, EMA):

    accelerate launch examples/train_sft/train_sft.py --output_dir outputs/digits_teacher

Fine-tunes a stock text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, Flux) on your images and captions:

    accelerate launch examples/train_sft/train_sft.py --pretrained_model_name_or_path <pipeline> \
        --train_data_dir <imagefolder with metadata.jsonl> --resolution 512 --output_dir outputs/sft

The teacher's scheduler decides the process and target (eps / v for DDPM-family schedulers, flow for
FlowMatch*); `--cond_dropout` replaces captions by `--negative_prompt` (default empty) for CFG; the result is
the same pipeline class with the trained denoiser. A digits pipeline folder is fine-tuned with `--init_from`,
on the digits or on a labelled dataset (`--class_data_dir` / `--class_dataset_name`, `--label_column`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import partial

import torch
from accelerate.logging import get_logger

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.losses import denoising_loss
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond, digits_unet
from diffusers_fastgen.parametrization import RectifiedFlow, add_noise, process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_map_scheduler
from diffusers_fastgen.timesteps import sample_logit_normal
from diffusers_fastgen.training import (
    Accumulator,
    EMAArgs,
    NonFiniteGuard,
    OptimizerArgs,
    RunArgs,
    TextToImageArgs,
    check_finite,
    check_pipeline_folder,
    log_image_grid,
    make_optimizer,
    parse_args,
    run_main,
    save_config,
    save_image_grid,
    setup_accelerator,
    update,
)
from diffusers_fastgen.training.data import InfiniteBatches, load_digits_arrays, load_image_dataset
from diffusers_fastgen.training.image_data import TextToImageData
from diffusers_fastgen.training.players import (
    finish_text_to_image_run,
    log_and_checkpoint,
    resume_step,
    validate_text_to_image_student,
)
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.teachers import drop_prompts

logger = get_logger("train_sft", log_level="INFO")


@dataclass
class SFTArgs:
    """Denoising fine-tuning (SFT) of the digits UNet or of a stock text-to-image pipeline's denoiser."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/sft", max_train_steps=2500,
                                                         train_batch_size=128, checkpointing_steps=1000,
                                                         validation_steps=1000))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-3, lr_warmup_steps=200))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=50.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image pipeline to fine-tune instead
    init_from: str | None = None  # a DigitsPipeline folder to fine-tune; None = a new digits UNet
    class_dataset_name: str | None = None  # digits path: a labelled `datasets` name (cached offline); None = the digits
    class_data_dir: str | None = None  # digits path: a labelled imagefolder directory instead of the digits
    label_column: str = "label"  # class-label column of that labelled dataset
    cond_dropout: float = 0.1  # probability of replacing the class (or caption) by the null one (CFG training)
    logit_mean: float = 0.0  # t ~ sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0  # spread of the logit-normal t distribution
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # new digits UNet widths
    layers_per_block: int = 2  # new digits UNet depth
    validation_num_inference_steps: int = 50  # sampler steps of the validation grid (and the saved pipeline's card)
    validation_guidance_scale: float = 1.0  # CFG of the digits validation grid and of the text-to-image model card

    def __post_init__(self):
        check_pipeline_folder(self.init_from, "DigitsPipeline", "init_from")
        self.text.require(images=True)  # SFT learns from images: real images with their captions
        if self.text.pretrained_model_name_or_path is not None and (self.init_from or self.class_dataset_name
                                                                    or self.class_data_dir):
            raise ValueError("`init_from`, `class_dataset_name` and `class_data_dir` are for the digits UNet; with "
                             "`pretrained_model_name_or_path` pass images with `train_data_dir` / `dataset_name`.")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"`cond_dropout` must be in [0, 1), got {self.cond_dropout}.")
        if self.logit_std <= 0:
            raise ValueError(f"`logit_std` must be > 0, got {self.logit_std}.")
        if self.class_dataset_name and self.class_data_dir:
            raise ValueError("pass at most one of `class_dataset_name` and `class_data_dir`.")
        if self.validation_num_inference_steps < 1:
            raise ValueError(f"`validation_num_inference_steps` must be >= 1, got {self.validation_num_inference_steps}.")


def load_data(args: SFTArgs) -> tuple[torch.Tensor, torch.Tensor]:
    if args.class_dataset_name or args.class_data_dir:
        images, labels = load_image_dataset(args.class_dataset_name, args.class_data_dir, label_column=args.label_column)
        if labels is None:
            raise ValueError(f"the dataset has no `label_column` {args.label_column!r}; the digits UNet is class-conditional.")
        return torch.from_numpy(images), torch.from_numpy(labels)
    images, labels = load_digits_arrays("train")
    return torch.from_numpy(images), torch.from_numpy(labels)


def build_model(args: SFTArgs):
    """(unet, process, native prediction type, sampling scheduler for grids and the saved pipeline)."""
    if args.init_from is None:
        unet = digits_unet(args.block_out_channels, args.layers_per_block)
        return unet, RectifiedFlow(), "flow", flow_map_scheduler(shift=1.0)
    pipe = DigitsPipeline.from_pretrained(args.init_from)
    process, prediction_type = process_from_scheduler(pipe.scheduler)
    return pipe.unet, process, prediction_type, pipe.scheduler


def drop_labels(labels: torch.Tensor, cond_dropout: float) -> dict:
    """Digits conditioning with each class replaced by the null class with probability `cond_dropout`."""
    drop = torch.rand(labels.shape, device=labels.device) < cond_dropout
    return digits_cond(torch.where(drop, torch.full_like(labels, NULL_CLASS), labels))


def sft_step(denoiser: Denoiser, x0: torch.Tensor, make_cond, *, logit_mean: float, logit_std: float) -> torch.Tensor:
    """One denoising loss evaluation (mean over the batch) at logit-normal times. make_cond() draws the batch's
    (dropped-out) conditioning after the noise and times (the digits teacher's draw order)."""
    eps = torch.randn_like(x0)
    t = sample_logit_normal((x0.shape[0],), mean=logit_mean, std=logit_std, device=x0.device)
    cond = make_cond()
    x_t = add_noise(denoiser.process, x0, eps, t)
    prediction = denoiser(x_t, t, cond, target=denoiser.prediction_type)
    return denoising_loss(prediction, x0, eps, t, process=denoiser.process,
                          prediction_type=denoiser.prediction_type).mean()


def validate(accelerator, unet, ema, args: SFTArgs, step: int, scheduler) -> None:
    """Sample a 10x10 grid (one column per class) with the EMA weights."""
    model = accelerator.unwrap_model(unet)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ema.copy_to(model)
    pipe = DigitsPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(10)
    images = pipe(labels, num_inference_steps=args.validation_num_inference_steps,
                  guidance_scale=args.validation_guidance_scale, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    model.load_state_dict(backup)
    save_image_grid(images, os.path.join(args.run.output_dir, "samples", f"step_{step:06d}.png"), nrow=10, upscale=4)
    log_image_grid(accelerator, images, step, nrow=10)


def main(argv=None):
    args = parse_args(SFTArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_sft", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    data = t2i = None  # a stock text-to-image pipeline (--pretrained_model_name_or_path), else the digits UNet
    if args.text.pretrained_model_name_or_path is not None:
        data = TextToImageData(args.text, accelerator, run)  # latents + caption embeddings; text encoders released
        t2i = data.teacher
        unet = t2i.model.float().requires_grad_(True)  # trained in fp32 whatever --weight_dtype the rest uses
        process, prediction_type, scheduler = t2i.process, t2i.prediction_type, t2i.pipe.scheduler
    else:
        unet, process, prediction_type, scheduler = build_model(args)
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizer, lr_scheduler = make_optimizer(unet.parameters(), args.optimizer, **schedule)
    if t2i is None:
        images, labels = load_data(args)
        batches = InfiniteBatches(images, labels, batch_size=run.train_batch_size, seed=run.seed,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMA(unet, schedule=args.ema.ema_schedule, decay=args.ema.ema_decay, halflife_kimg=args.ema.ema_halflife_kimg,
              batch_size=run.train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps,
              gamma=args.ema.ema_gamma, start_iter=args.ema.ema_start_iter)
    denoiser = Denoiser(unet, process, prediction_type)

    step = resume_step(accelerator, run, ema, logger)
    (data or batches).state_at(step * run.gradient_accumulation_steps)

    def validate_now(s: int) -> None:
        if t2i is None:
            return validate(accelerator, unet, ema, args, s, scheduler)
        return validate_text_to_image_student(accelerator, {"student": unet}, ema, t2i, scheduler,
                                              data.validation_embeddings(), num_steps=args.validation_num_inference_steps,
                                              step=s, output_dir=run.output_dir)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    while step < run.max_train_steps:
        if t2i is not None:  # VAE latents of real images, their captions' embeddings
            x0, cond, uncond = data.next(accelerator.device)
            make_cond = partial(drop_prompts, cond, uncond, args.cond_dropout)
        else:
            x0, y = (t.to(accelerator.device) for t in next(batches))
            make_cond = partial(drop_labels, y, args.cond_dropout)
        loss = sft_step(denoiser, x0, make_cond, logit_mean=args.logit_mean, logit_std=args.logit_std)
        applied = update(accelerator, loss, unet.parameters(), optimizer, lr_scheduler,
                         args.optimizer.max_grad_norm, guard=guard, accumulator=accumulator, step=step + 1)
        if not applied:  # a micro-batch, or a skipped non-finite update
            continue
        ema.update(unet)
        step += 1
        log_and_checkpoint(accelerator, run, step, {"loss": loss.detach(), "lr": lr_scheduler.get_last_lr()[0]}, ema, progress,
                           validate=validate_now)

    if t2i is not None:  # the same pipeline class with the EMA denoiser and the teacher's own scheduler
        recipe = t2i.guided_sampling_kwargs(args.validation_num_inference_steps, args.validation_guidance_scale,
                                            args.text.negative_prompt)
        validate_now(step)
        finish_text_to_image_run(accelerator, {"student": unet}, {"student": list(unet.parameters())},
                                 {"student": (optimizer, lr_scheduler)}, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=args.validation_num_inference_steps, method="SFT", prompts=data.prompts,
                                 logger=logger, push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id,
                                 sampling=recipe)
        progress.summary("train_sft", logger)
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        validate(accelerator, unet, ema, args, step, scheduler)
        model = accelerator.unwrap_model(unet)
        ema.copy_to(model)
        check_finite(model, "the EMA model")
        DigitsPipeline(unet=model, scheduler=scheduler).save_pretrained(run.output_dir)
        logger.info("saved the EMA pipeline to %s", run.output_dir)
    accelerator.wait_for_everyone()  # ranks tear the process group down together (a lone gloo rank can hang)
    accelerator.end_training()

    progress.summary("train_sft", logger)

if __name__ == "__main__":
    run_main(main)
