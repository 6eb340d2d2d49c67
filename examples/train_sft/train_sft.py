"""SFT: denoising fine-tuning (or training from scratch) of a class-conditional diffusers UNet.

Trains the embedded digits teacher by default (rectified flow, flow-matching target, logit-normal t,
class dropout for classifier-free guidance, EMA):

    accelerate launch examples/train_sft/train_sft.py --output_dir outputs/digits_teacher

Fine-tunes a pipeline folder with `--pretrained_model_name_or_path` (its scheduler decides the process
and target: flow for FlowMatch*, eps / v for DDPM-family schedulers), on the digits or on your images
(`--dataset_name` / `--train_data_dir`, labels from `--label_column`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

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
    check_finite,
    check_pipeline_folder,
    log_image_grid,
    make_optimizer,
    parse_args,
    save_config,
    save_image_grid,
    setup_accelerator,
    update,
)
from diffusers_fastgen.training.data import InfiniteBatches, load_digits_arrays, load_image_dataset
from diffusers_fastgen.training.players import log_and_checkpoint, resume_step
from diffusers_fastgen.training.progress import TrainingProgress

logger = get_logger("train_sft", log_level="INFO")


@dataclass
class SFTArgs:
    """Denoising fine-tuning (SFT) of a class-conditional diffusers UNet."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/sft", max_train_steps=2500,
                                                         train_batch_size=128, checkpointing_steps=1000,
                                                         validation_steps=1000))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=1e-3, lr_warmup_steps=200))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=50.0))
    pretrained_model_name_or_path: str | None = None  # pipeline folder to fine-tune; None = new digits UNet
    dataset_name: str | None = None  # a `datasets` name (must be cached offline); None = embedded digits
    train_data_dir: str | None = None  # an imagefolder directory instead of the digits
    label_column: str = "label"  # class-label column of the user dataset
    cond_dropout: float = 0.1  # probability of replacing the class by the null class (CFG training)
    logit_mean: float = 0.0  # t ~ sigmoid(N(logit_mean, logit_std^2))
    logit_std: float = 1.0  # spread of the logit-normal t distribution
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])  # new digits UNet widths
    layers_per_block: int = 2  # new digits UNet depth
    validation_num_inference_steps: int = 50  # Euler steps of the validation grid
    validation_guidance_scale: float = 1.0  # CFG of the validation grid

    def __post_init__(self):
        check_pipeline_folder(self.pretrained_model_name_or_path, "DigitsPipeline", "pretrained_model_name_or_path")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"`cond_dropout` must be in [0, 1), got {self.cond_dropout}.")
        if self.logit_std <= 0:
            raise ValueError(f"`logit_std` must be > 0, got {self.logit_std}.")
        if self.dataset_name and self.train_data_dir:
            raise ValueError("pass at most one of `dataset_name` and `train_data_dir`.")
        if self.validation_num_inference_steps < 1:
            raise ValueError(f"`validation_num_inference_steps` must be >= 1, got {self.validation_num_inference_steps}.")


def load_data(args: SFTArgs) -> tuple[torch.Tensor, torch.Tensor]:
    if args.dataset_name or args.train_data_dir:
        images, labels = load_image_dataset(args.dataset_name, args.train_data_dir, label_column=args.label_column)
        if labels is None:
            raise ValueError(f"the dataset has no `label_column` {args.label_column!r}; the digits UNet is class-conditional.")
        return torch.from_numpy(images), torch.from_numpy(labels)
    images, labels = load_digits_arrays("train")
    return torch.from_numpy(images), torch.from_numpy(labels)


def build_model(args: SFTArgs):
    """(unet, process, native prediction type, sampling scheduler for grids and the saved pipeline)."""
    if args.pretrained_model_name_or_path is None:
        unet = digits_unet(args.block_out_channels, args.layers_per_block)
        return unet, RectifiedFlow(), "flow", flow_map_scheduler(shift=1.0)
    pipe = DigitsPipeline.from_pretrained(args.pretrained_model_name_or_path)
    process, prediction_type = process_from_scheduler(pipe.scheduler)
    return pipe.unet, process, prediction_type, pipe.scheduler


def sft_step(denoiser: Denoiser, x0: torch.Tensor, labels: torch.Tensor, *, cond_dropout: float, logit_mean: float,
             logit_std: float) -> torch.Tensor:
    """One denoising loss evaluation (mean over the batch)."""
    eps = torch.randn_like(x0)
    t = sample_logit_normal((x0.shape[0],), mean=logit_mean, std=logit_std, device=x0.device)
    drop = torch.rand(labels.shape, device=labels.device) < cond_dropout
    labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
    x_t = add_noise(denoiser.process, x0, eps, t)
    prediction = denoiser(x_t, t, digits_cond(labels), target=denoiser.prediction_type)
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

    unet, process, prediction_type, scheduler = build_model(args)
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizer, lr_scheduler = make_optimizer(unet.parameters(), args.optimizer, **schedule)
    images, labels = load_data(args)
    batches = InfiniteBatches(images, labels, batch_size=run.train_batch_size, seed=run.seed,
                              rank=accelerator.process_index, world_size=accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMA(unet, schedule=args.ema.ema_schedule, decay=args.ema.ema_decay, halflife_kimg=args.ema.ema_halflife_kimg,
              batch_size=run.train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps,
              gamma=args.ema.ema_gamma, start_iter=args.ema.ema_start_iter)
    denoiser = Denoiser(unet, process, prediction_type)

    step = resume_step(accelerator, run, ema, logger)
    batches.state_at(step * run.gradient_accumulation_steps)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    while step < run.max_train_steps:
        x0, y = (t.to(accelerator.device) for t in next(batches))
        loss = sft_step(denoiser, x0, y, cond_dropout=args.cond_dropout, logit_mean=args.logit_mean,
                        logit_std=args.logit_std)
        applied = update(accelerator, loss, unet.parameters(), optimizer, lr_scheduler,
                         args.optimizer.max_grad_norm, guard=guard, accumulator=accumulator, step=step + 1)
        if not applied:  # a micro-batch, or a skipped non-finite update
            continue
        ema.update(unet)
        step += 1
        log_and_checkpoint(accelerator, run, step, {"loss": loss.detach(), "lr": lr_scheduler.get_last_lr()[0]}, ema, progress,
                           validate=lambda s: validate(accelerator, unet, ema, args, s, scheduler))

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
    main()
