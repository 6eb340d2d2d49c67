"""CausalKD: a causal few-step student regressed onto a bidirectional teacher's ODE solutions, block
by block (the ODE initialisation of CausVid arXiv:2412.07772 sec. 4.2 / Self-Forcing).

    accelerate launch examples/train_causal_kd/train_causal_kd.py --output_dir outputs/causal_kd

1. Pairs: for `num_pairs` moving-digit conditions the teacher's Euler ODE (`teacher_steps` steps, the
   student's schedule points among them) runs from noise to x0; the states at the student's schedule
   t_0 = 1 > ... > t_{K-1} and the endpoint are kept (generated once, saved as safetensors in the
   output folder, reused on resume).
2. Each step picks one schedule point per block (diffusion forcing on the ODE trajectory), builds the
   input video from those states, and the block-causal student regresses the endpoint x0 of every
   block (losses.regression.kd_loss) in one masked pass.
3. The EMA student is saved as a CausalWanPipeline with its few-step schedule, reloaded, benchmarked.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from safetensors.torch import load_file, save_file

from diffusers_fastgen.evaluation.moving_digits import (
    CANVAS,
    MOVING_DIGITS_TEACHER_PATH,
    NUM_FRAMES,
    moving_digits_cond,
    sample_motion,
)
from diffusers_fastgen.losses.regression import kd_loss
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.causal_wan import CausalWan
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.training import (
    Accumulator,
    EMAArgs,
    LoRAArgs,
    NonFiniteGuard,
    OptimizerArgs,
    RunArgs,
    TextToVideoArgs,
    check_pipeline_folder,
    make_optimizer,
    parse_args,
    run_main,
    save_config,
    setup_accelerator,
    update,
)
from diffusers_fastgen.training.causal import block_step_indices, step_generator, with_clean_point
from diffusers_fastgen.training.distribution_matching_steps import build_players
from diffusers_fastgen.training.lora import BASE
from diffusers_fastgen.training.players import log_and_checkpoint, prepare_players, resume_step, student_ema
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.video import (
    finish_video_run,
    finish_wan_run,
    load_video_teacher,
    null_cond,
    student_t_list,
    teacher_ode,
    timesteps_from_t_list,
    validate_video_student,
)

logger = get_logger("train_causal_kd", log_level="INFO")


@dataclass
class CausalKDArgs:
    """Block-causal regression of a few-step student onto teacher ODE pairs."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/causal_kd", max_train_steps=1500,
                                                         train_batch_size=32, checkpointing_steps=500,
                                                         validation_steps=0))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=2e-4, max_grad_norm=1.0))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=10.0))
    video: TextToVideoArgs = field(default_factory=TextToVideoArgs)  # a stock WanPipeline teacher with prompts instead
    teacher: str = MOVING_DIGITS_TEACHER_PATH  # CausalWanPipeline folder of the bidirectional moving-digits teacher
    num_frames_per_block: int = 2  # causal block size (frames)
    num_student_steps: int = 4  # few-step schedule per block: t_i = 1 - i / K
    clean_blocks: bool = True  # blocks also drawn clean (t = 0, the ODE path's end), as the inference cache holds them
    num_pairs: int = 1024  # teacher ODE solutions generated once
    teacher_steps: int = 24  # Euler steps of the teacher ODE (a multiple of num_student_steps)
    guidance_scale: float = 3.0  # CFG of the teacher ODE; 3 = best for the shipped teacher (docs/results.md)
    pair_batch_size: int = 128  # teacher batch while generating pairs
    eval_num_videos: int = 500  # moving-digits benchmark videos at the end (0 skips; none with a WanPipeline)
    lora: LoRAArgs = field(default_factory=LoRAArgs)  # LoRA mode: adapters on the frozen teacher

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "CausalWanPipeline", "teacher")
        if not os.path.isdir(self.teacher):
            raise ValueError(f"`teacher` {self.teacher!r} is not a CausalWanPipeline folder; train one with "
                             "examples/train_causal_sft/train_causal_sft.py --num_frames_per_block 8 and pass --teacher.")
        if self.video.pretrained_model_name_or_path is not None:
            self.video.check_block(self.num_frames_per_block)
        elif self.num_frames_per_block < 1 or NUM_FRAMES % self.num_frames_per_block:
            raise ValueError(f"`num_frames_per_block` must divide the {NUM_FRAMES} frames, got {self.num_frames_per_block}.")
        if self.num_student_steps < 1 or self.teacher_steps % self.num_student_steps:
            raise ValueError(f"`teacher_steps` ({self.teacher_steps}) must be a multiple of num_student_steps "
                             f"({self.num_student_steps}) >= 1.")
        if self.guidance_scale < 1:
            raise ValueError(f"`guidance_scale` must be >= 1, got {self.guidance_scale}.")
        if self.num_pairs < 1 or self.pair_batch_size < 1:
            raise ValueError(f"need num_pairs >= 1 and pair_batch_size >= 1, got {self.num_pairs}, {self.pair_batch_size}.")


def generate_pairs(teacher: Denoiser, t_list: torch.Tensor, args: CausalKDArgs, device) -> dict:
    """{'states' (N, K, 1, F, 16, 16) at t_list, 'x0' (N, 1, F, 16, 16), 'cond' (N, 3, 32)}."""
    g = torch.Generator().manual_seed(1234)
    labels = torch.randint(0, 10, (args.num_pairs,), generator=g)
    _, v = sample_motion(args.num_pairs, g)
    cond = moving_digits_cond(labels, v)
    t_grid = torch.linspace(1.0, 0.0, args.teacher_steps + 1, device=device)
    keep = [int(round(float(1 - t) * args.teacher_steps)) for t in t_list]  # grid index of each t_i
    states, x0 = [], []
    for start in range(0, args.num_pairs, args.pair_batch_size):
        c = {"encoder_hidden_states": cond[start:start + args.pair_batch_size].to(device)}
        noise = torch.randn(c["encoder_hidden_states"].shape[0], 1, NUM_FRAMES, CANVAS, CANVAS, generator=g).to(device)
        path = teacher_ode(teacher, noise, c, t_grid, uncond=null_cond(c), guidance_scale=args.guidance_scale)
        states.append(torch.stack([path[i] for i in keep], 1).cpu())
        x0.append(path[-1].cpu())
    return {"states": torch.cat(states), "x0": torch.cat(x0), "cond": cond}


def generate_wan_pairs(teacher: Denoiser, t_list: torch.Tensor, args: CausalKDArgs, device, wan, embeddings,
                       negative) -> dict:
    """A WanPipeline teacher: {'states' (N, K, C, F, h, w), 'x0', 'index' (N,) prompt indices}. The Euler grid
    has teacher_steps / K steps in each of the student's (shifted) intervals, so every t_i is a grid point."""
    g = torch.Generator().manual_seed(1234)
    index = torch.arange(args.num_pairs) % next(iter(embeddings.values())).shape[0]
    m = args.teacher_steps // args.num_student_steps
    ends = torch.cat([t_list.cpu(), torch.zeros(1)])
    t_grid = torch.cat([torch.linspace(float(a), float(b), m + 1)[:-1] for a, b in zip(ends[:-1], ends[1:])]
                       + [torch.zeros(1)]).to(device)
    states, x0 = [], []
    for start in range(0, args.num_pairs, args.pair_batch_size):
        idx = index[start:start + args.pair_batch_size]
        c, u = wan.cond(embeddings, idx, device), wan.cond(negative, torch.zeros_like(idx), device)
        noise = torch.randn(len(idx), *wan.latent_shape, generator=g).to(device)
        path = teacher_ode(teacher, noise, c, t_grid, uncond=u, guidance_scale=args.guidance_scale)
        states.append(torch.stack([path[i * m] for i in range(args.num_student_steps)], 1).cpu())
        x0.append(path[-1].cpu())
    return {"states": torch.cat(states), "x0": torch.cat(x0), "index": index}


def load_or_generate_pairs(accelerator, teacher, t_list, args: CausalKDArgs, generate=None) -> dict:
    path = os.path.join(args.run.output_dir, "ode_pairs.safetensors")
    if accelerator.is_main_process and not os.path.isfile(path):
        pairs = generate() if generate is not None else generate_pairs(teacher, t_list, args, accelerator.device)
        save_file(pairs, path + ".tmp")
        os.replace(path + ".tmp", path)  # atomic: a cut-off run never leaves half a file
        logger.info("generated %d teacher ODE pairs -> %s", args.num_pairs, path)
    accelerator.wait_for_everyone()
    return load_file(path)


def causal_kd_step(student: Denoiser, states: torch.Tensor, x0: torch.Tensor, cond: dict, t_list: torch.Tensor,
                   num_frames_per_block: int, *, include_clean: bool = True) -> torch.Tensor:
    """states (B, K, C, F, H, W): per block, the ODE state at a random schedule point (with include_clean also
    the path's end, the clean x0 at t = 0, as the inference cache holds it); regress x0."""
    b, _, _, f = states.shape[:4]
    if include_clean:
        states, t_list = torch.cat([states, x0[:, None]], 1), with_clean_point(t_list)
    idx = block_step_indices(b, f, num_frames_per_block, states.shape[1], states.device)  # (B, F)
    x_t = states.gather(1, idx[:, None, None, :, None, None].expand(-1, 1, *states.shape[2:])).squeeze(1)
    prediction = student(x_t, t_list[idx], cond)  # x0 prediction, per-frame t
    return kd_loss(prediction, x0).mean()


def main(argv=None):
    args = parse_args(CausalKDArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_causal_kd", args, find_unused_parameters=args.lora.lora_rank > 0)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    # 1. Teacher (frozen) and the causal student (a copy of it); the ODE pairs.
    # a stock WanPipeline teacher (--pretrained_model_name_or_path; wan set), else the moving-digits teacher
    wan, teacher_model, prompts, embeddings, negative = load_video_teacher(args.video, args.teacher,
                                                                           guidance_scale=args.guidance_scale)
    if args.lora.lora_rank:  # the student: an adapter on the teacher itself ("base")
        modules, params = build_players(teacher_model, lora_rank=args.lora.lora_rank, trainable=("student",),
                                        lora_alpha=args.lora.lora_alpha, lora_target_modules=args.lora.lora_target_modules)
    else:
        modules = {"teacher": teacher_model, "student": copy.deepcopy(teacher_model).float().requires_grad_(True)}
        params = {"student": list(modules["student"].parameters())}
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizers = {"student": make_optimizer(params["student"], args.optimizer, **schedule)}
    modules, optimizers = prepare_players(accelerator, modules, optimizers, gradient_checkpointing=run.gradient_checkpointing)
    optimizer, lr_scheduler = optimizers["student"]
    rf = RectifiedFlow()
    lora = "base" in modules
    trained = modules["base"] if lora else modules["student"]  # the module holding the student's weights
    teacher = Denoiser(modules["base"], rf, "flow", adapter=BASE) if lora else Denoiser(modules["teacher"], rf, "flow")
    student = Denoiser(CausalWan(trained, args.num_frames_per_block), rf, "flow", adapter="student" if lora else None)
    ema = student_ema(accelerator, modules, args.ema, run.train_batch_size)
    if wan is not None:  # the per-block schedule on the teacher's shift
        t_list = wan.student_t_list(args.num_student_steps, shift=args.video.shift).to(accelerator.device)
        pairs = load_or_generate_pairs(accelerator, teacher, t_list, args, generate=lambda: generate_wan_pairs(
            teacher, t_list, args, accelerator.device, wan, embeddings, negative))
    else:
        t_list = student_t_list(args.num_student_steps).to(accelerator.device)
        pairs = load_or_generate_pairs(accelerator, teacher, t_list, args)

    step = resume_step(accelerator, run, ema, logger)

    # 2. The loop: batch i on rank r is drawn by a generator seeded with (seed, r, i), so resume is exact.
    def validate(s):  # sample videos of the EMA student every `validation_steps`
        validate_video_student(accelerator, trained, ema, num_frames_per_block=args.num_frames_per_block,
                               denoising_timesteps=timesteps_from_t_list(t_list.tolist()), step=s, output_dir=run.output_dir,
                               wan=wan, embeddings=embeddings, adapter="student" if lora else None)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    micro = step * run.gradient_accumulation_steps  # micro-batch index: the draws of each are a function of it
    while step < run.max_train_steps:
        g = step_generator(run.seed, micro, accelerator.process_index)
        micro += 1
        idx = torch.randint(0, args.num_pairs, (run.train_batch_size,), generator=g)
        states, x0 = pairs["states"][idx].to(accelerator.device), pairs["x0"][idx].to(accelerator.device)
        if wan is not None:  # prompt embeddings by the pairs' prompt indices
            cond = wan.cond(embeddings, pairs["index"][idx], accelerator.device)
        else:
            cond = {"encoder_hidden_states": pairs["cond"][idx].to(accelerator.device)}
        with accelerator.autocast():
            loss = causal_kd_step(student, states, x0, cond, t_list, args.num_frames_per_block,
                                  include_clean=args.clean_blocks)
        if not update(accelerator, loss, params["student"], optimizer, lr_scheduler, args.optimizer.max_grad_norm,
                      guard=guard, accumulator=accumulator, step=step + 1):
            continue  # a skipped non-finite update (--max_nonfinite_skips)
        ema.update(trained)
        step += 1
        log_and_checkpoint(accelerator, run, step, {"loss": loss.detach()}, ema, progress, validate=validate)

    # 3. Save the EMA student with its few-step recipe; reload and benchmark.
    if wan is not None:
        finish_wan_run(accelerator, student.model, trained, ema, wan, output_dir=run.output_dir,
                       num_frames_per_block=args.num_frames_per_block,
                       denoising_timesteps=timesteps_from_t_list(t_list.tolist()), context_noise=0, prompts=prompts,
                       logger=logger, adapter="student" if lora else None)
        progress.summary("train_causal_kd", logger)
        return
    finish_video_run(accelerator, student.model, trained, ema, output_dir=run.output_dir, adapter="student" if lora else None,
                     num_frames_per_block=args.num_frames_per_block,
                     denoising_timesteps=timesteps_from_t_list(t_list.tolist()),
                     eval_num_videos=args.eval_num_videos, name="CausalKD student", logger=logger)
    progress.summary("train_causal_kd", logger)

if __name__ == "__main__":
    run_main(main)
