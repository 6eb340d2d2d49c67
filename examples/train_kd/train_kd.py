"""KD: distil a teacher into a 1- or few-step student by regressing teacher ODE endpoints.

1. Pairs: the teacher (many Euler steps, optional CFG) solves the probability-flow ODE from noise;
   the states at the student's t_list and the endpoint x0 go into a `datasets` dataset on disk
   (reused when the recipe matches).
2. The student (initialised from the teacher) learns x0 from each state: kd_loss.
3. The student is saved as a DigitsPipeline whose FlowMapEulerDiscreteScheduler(shift) is the
   schedule it was trained on; 1 and N steps both work.

    accelerate launch examples/train_kd/train_kd.py --output_dir outputs/kd
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.evaluation.digits_benchmark import write_benchmark
from diffusers_fastgen.guidance import guided_prediction
from diffusers_fastgen.losses import kd_loss
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.sampling import teacher_ode_states
from diffusers_fastgen.schedulers import flow_map_scheduler, t_list_from_scheduler
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
from diffusers_fastgen.training.data import InfiniteBatches
from diffusers_fastgen.training.players import (
    finish_text_to_image_run,
    log_and_checkpoint,
    resume_step,
    validate_digits_student,
    validate_text_to_image_student,
)
from diffusers_fastgen.training.progress import TrainingProgress
from diffusers_fastgen.training.teachers import TextToImageTeacher, load_prompts

logger = get_logger("train_kd", log_level="INFO")


@dataclass
class KDArgs:
    """Knowledge distillation of a teacher pipeline into a few-step student."""

    run: RunArgs = field(default_factory=lambda: RunArgs(output_dir="outputs/kd", max_train_steps=1200,
                                                         train_batch_size=128, checkpointing_steps=500,
                                                         validation_steps=500))
    optimizer: OptimizerArgs = field(default_factory=lambda: OptimizerArgs(learning_rate=2e-4, lr_warmup_steps=100))
    ema: EMAArgs = field(default_factory=lambda: EMAArgs(ema_schedule="halflife", ema_halflife_kimg=20.0))
    text: TextToImageArgs = field(default_factory=TextToImageArgs)  # a stock text-to-image teacher instead
    teacher: str = DIGITS_TEACHER_PATH  # digits teacher folder (default: the shipped one)
    num_student_steps: int = 2  # the student's largest step count (t_list length - 1)
    shift: float | None = None  # student schedule shift (default: 1 on digits, the teacher's on flow-matching pipelines)
    num_pairs: int = 6000  # teacher ODE solutions to generate
    teacher_steps: int = 16  # total teacher Euler steps per solution (split evenly over the student's intervals)
    teacher_guidance_scale: float = 1.0  # CFG of the teacher ODE
    pairs_dir: str | None = None  # pairs go to <pairs_dir>/pairs-<recipe hash>/ (default: <output_dir>/teacher_pairs)
    pairs_batch_size: int = 500  # teacher batch size while generating
    eval_num_samples: int = 1000  # samples for the final benchmark rows (0 skips)

    def __post_init__(self):
        check_pipeline_folder(self.teacher, "DigitsPipeline", "teacher")
        self.text.require(prompts=True)
        if self.num_student_steps < 1:
            raise ValueError(f"`num_student_steps` must be >= 1, got {self.num_student_steps}.")
        if self.teacher_steps < self.num_student_steps or self.teacher_steps % self.num_student_steps:
            raise ValueError(f"`teacher_steps` must be a multiple of num_student_steps={self.num_student_steps}, "
                             f"got {self.teacher_steps}.")
        if self.num_pairs < 1:
            raise ValueError(f"`num_pairs` must be >= 1, got {self.num_pairs}.")
        if self.teacher_guidance_scale < 0:
            raise ValueError(f"`teacher_guidance_scale` must be >= 0, got {self.teacher_guidance_scale}.")


def generate_pairs(teacher: Denoiser, t_list: torch.Tensor, args: KDArgs, seed: int, conditions):
    """Teacher ODE states at t_list and endpoints -> datasets.Dataset(label, states (K+1, C, H, W)).

    conditions: the Conditions of the teacher kind: `label` is a class (digits) or a prompt index."""
    import datasets

    g = torch.Generator().manual_seed(seed)
    labels_all = torch.arange(args.num_pairs) % conditions.count
    rows = {"label": [], "states": []}
    for labels in tqdm(labels_all.split(args.pairs_batch_size), desc="teacher ODE pairs"):
        noise = torch.randn(labels.shape[0], *conditions.sample_shape, generator=g)
        cond, uncond = conditions(labels), conditions.uncond(labels)

        def velocity(x, t):
            return guided_prediction(teacher, x, t, cond, uncond, conditions.cfg_scale(args.teacher_guidance_scale),
                                     target="flow")

        states = teacher_ode_states(velocity, noise, t_list,
                                    steps_per_segment=args.teacher_steps // args.num_student_steps)
        rows["label"].extend(labels.tolist())
        rows["states"].extend(torch.stack(states, 1).numpy())  # (B, K+1, C, H, W)
    return datasets.Dataset.from_dict(rows)


class DigitsConditions:
    """Digits: ten classes, 8x8 samples, CFG against the null class."""

    count, sample_shape = 10, (1, 8, 8)

    def __call__(self, labels):
        return digits_cond(labels)

    def uncond(self, labels):
        return digits_cond(torch.full_like(labels, NULL_CLASS))

    def cfg_scale(self, scale):
        return scale


class PromptConditions:
    """A text-to-image teacher: prompt indices into the cached embeddings, CFG against the negative prompt
    (guidance-distilled Flux: its guidance embedding, set by --teacher_guidance_scale, instead)."""

    def __init__(self, teacher, embeddings, negative, device):
        self.teacher, self.embeddings, self.negative, self.device = teacher, embeddings, negative, device
        self.count = next(iter(embeddings.values())).shape[0]
        self.sample_shape = teacher.latent_shape

    def __call__(self, labels):
        return self.teacher.cond(self.embeddings, labels.cpu(), self.device)

    def uncond(self, labels):
        return self.teacher.cond(self.negative, torch.zeros_like(labels).cpu(), self.device)

    def cfg_scale(self, scale):
        return 1.0 if self.teacher.flux_guidance else scale


def load_or_generate_pairs(accelerator, teacher: Denoiser, t_list, args: KDArgs, conditions, source: str):
    """Pairs live in `<pairs_dir>/pairs-<recipe hash>/`, a folder this script creates and owns, and are
    reused when their recipe (teacher, t_list, steps, CFG, count, seed) matches. Nothing else under
    `pairs_dir` is read, replaced or deleted: a user folder stays as it was."""
    import hashlib
    import shutil

    import datasets

    recipe = {"teacher": source, "t_list": [round(float(t), 6) for t in t_list],
              "teacher_steps": args.teacher_steps, "teacher_guidance_scale": args.teacher_guidance_scale,
              "num_pairs": args.num_pairs, "seed": args.run.seed}
    digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    pairs_dir = os.path.join(args.pairs_dir or os.path.join(args.run.output_dir, "teacher_pairs"), f"pairs-{digest}")
    recipe_file = os.path.join(pairs_dir, "recipe.json")
    if accelerator.is_main_process and not os.path.isfile(recipe_file):
        if os.path.exists(pairs_dir):
            raise ValueError(f"{pairs_dir!r} exists but holds no pairs recipe.json; it was not written by this script, "
                             "so it is left alone: move it or pass another `pairs_dir`.")
        ds = generate_pairs(teacher, t_list, args, seed=args.run.seed, conditions=conditions)
        tmp = pairs_dir + ".tmp"  # ours: an interrupted earlier write of the same recipe
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(tmp)
        with open(os.path.join(tmp, "recipe.json"), "w") as fh:
            json.dump(recipe, fh)
        os.replace(tmp, pairs_dir)  # atomic: the folder appears complete or not at all
    accelerator.wait_for_everyone()
    with open(recipe_file) as fh:
        if json.load(fh) != recipe:
            raise ValueError(f"{recipe_file} does not hold this run's pair recipe; pass another `pairs_dir`.")
    table = datasets.load_from_disk(pairs_dir).with_format("torch")[:]  # {column: tensor}
    return table["states"].float(), table["label"].long()


def student_step(student: Denoiser, states: torch.Tensor, cond: dict, t_list: torch.Tensor) -> torch.Tensor:
    """KD loss at a random point of the student's schedule for each sample.

    states: (B, K+1, C, H, W) teacher ODE states at t_list (last = x0 target)."""
    b, k = states.shape[0], len(t_list) - 1
    i = torch.randint(0, k, (b,), device=states.device)
    x_t = states[torch.arange(b), i]  # (B, C, H, W)
    t = t_list.to(states.device)[i]
    x0 = student(x_t, t, cond, target="x0")
    return kd_loss(x0, states[:, -1]).mean()


def save_student(accelerator, unet, ema, scheduler, args: KDArgs, step: int) -> DigitsPipeline:
    model = accelerator.unwrap_model(unet)
    ema.copy_to(model)
    check_finite(model, "the KD student")
    pipe = DigitsPipeline(unet=model, scheduler=scheduler)
    pipe.save_pretrained(args.run.output_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(torch.arange(10).repeat(10), num_inference_steps=1, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    save_image_grid(images, os.path.join(args.run.output_dir, "samples_1step.png"), nrow=10, upscale=4)
    log_image_grid(accelerator, images, step, tag="student_1step", nrow=10)
    return pipe


def main(argv=None):
    args = parse_args(KDArgs, argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    run = args.run
    accelerator = setup_accelerator(run, "train_kd", args)
    if accelerator.is_main_process:
        save_config(args, os.path.join(run.output_dir, "train_config.yaml"))

    t2i = None  # a stock text-to-image teacher (--pretrained_model_name_or_path), else the digits teacher
    if args.text.pretrained_model_name_or_path is not None:
        text = args.text
        t2i = TextToImageTeacher(text.pretrained_model_name_or_path, revision=text.revision, variant=text.variant,
                                 cache_dir=text.cache_dir, weight_dtype=text.weight_dtype, resolution=text.resolution,
                                 guidance_scale=args.teacher_guidance_scale, max_sequence_length=text.max_sequence_length)
        prompts = load_prompts(text.prompts, text.caption_column)
        embeddings, negative = t2i.embed_prompts(prompts, negative_prompt=text.negative_prompt,
                                                 batch_size=text.encode_batch_size, cache_dir=text.embeddings_cache)
        t2i.release_text_encoders()
        teacher = Denoiser(t2i.model.requires_grad_(False).eval(), t2i.process, t2i.prediction_type)
        conditions = PromptConditions(t2i, embeddings, negative, accelerator.device)
        scheduler = t2i.student_scheduler(shift=args.shift, stochastic=False)  # x0, then the ODE's own noise
        t_list = t2i.student_t_list(scheduler, args.num_student_steps)
        source = json.dumps([text.pretrained_model_name_or_path, text.revision, text.variant, text.resolution,
                             text.negative_prompt, prompts])
    else:
        teacher_pipe = DigitsPipeline.from_pretrained(args.teacher)
        teacher = Denoiser(teacher_pipe.unet.requires_grad_(False).eval(), *process_from_scheduler(teacher_pipe.scheduler))
        conditions = DigitsConditions()
        scheduler = flow_map_scheduler(shift=1.0 if args.shift is None else args.shift)
        t_list = t_list_from_scheduler(scheduler, args.num_student_steps)
        source = os.path.abspath(args.teacher)
    states, labels = load_or_generate_pairs(accelerator, teacher, t_list, args, conditions, source)

    # The student starts from the teacher, in fp32 whatever the teacher's dtype.
    unet = (copy.deepcopy(t2i.model).float().requires_grad_(True) if t2i is not None
            else DigitsPipeline.from_pretrained(args.teacher).unet)
    if run.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    schedule = {"num_training_steps": run.max_train_steps, "num_processes": accelerator.num_processes}  # LR schedule
    optimizer, lr_scheduler = make_optimizer(unet.parameters(), args.optimizer, **schedule)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMA(unet, schedule=args.ema.ema_schedule, decay=args.ema.ema_decay, halflife_kimg=args.ema.ema_halflife_kimg,
              batch_size=run.train_batch_size * accelerator.num_processes * run.gradient_accumulation_steps,
              gamma=args.ema.ema_gamma, start_iter=args.ema.ema_start_iter)
    student = Denoiser(unet, teacher.process, teacher.prediction_type)
    batches = InfiniteBatches(states, labels, batch_size=run.train_batch_size, seed=run.seed,
                              rank=accelerator.process_index, world_size=accelerator.num_processes)

    step = resume_step(accelerator, run, ema, logger)
    batches.state_at(step * run.gradient_accumulation_steps)

    def validate(s):  # a 1-step sample grid of the EMA student every `validation_steps`
        if t2i is not None:  # the teacher's pipeline class, precomputed embeddings of a few prompts
            first = {k: v[:4] for k, v in embeddings.items()}
            return validate_text_to_image_student(accelerator, {"student": unet}, ema, t2i, scheduler, first,
                                                  num_steps=1, step=s, output_dir=run.output_dir)
        validate_digits_student(accelerator, {"student": unet}, ema, scheduler, num_steps=1, step=s,
                                output_dir=run.output_dir)

    guard = NonFiniteGuard(run.max_nonfinite_skips)
    accumulator = Accumulator(run.gradient_accumulation_steps)  # per player
    progress = TrainingProgress(accelerator, run, step, guard)
    while step < run.max_train_steps:
        x, y = (t.to(accelerator.device) for t in next(batches))
        loss = student_step(student, x, conditions(y), t_list)
        applied = update(accelerator, loss, unet.parameters(), optimizer, lr_scheduler,
                         args.optimizer.max_grad_norm, guard=guard, accumulator=accumulator, step=step + 1)
        if not applied:  # a micro-batch, or a skipped non-finite update
            continue
        ema.update(unet)
        step += 1
        log_and_checkpoint(accelerator, run, step, {"kd_loss": loss.detach(), "lr": lr_scheduler.get_last_lr()[0]}, ema, progress,
                           validate=validate)

    if t2i is not None:
        finish_text_to_image_run(accelerator, {"student": unet}, {"student": list(unet.parameters())},
                                 {"student": (optimizer, lr_scheduler)}, ema, t2i, scheduler, output_dir=run.output_dir,
                                 num_steps=args.num_student_steps, method="KD", prompts=prompts, logger=logger,
                                 push_to_hub=args.text.push_to_hub, hub_model_id=args.text.hub_model_id)
        progress.summary("train_kd", logger)
        return
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pipe = save_student(accelerator, unet, ema, scheduler, args, step)
        logger.info("saved the student pipeline to %s", run.output_dir)
        if args.eval_num_samples:
            print(write_benchmark(pipe, run.output_dir, name="KD student", num_samples=args.eval_num_samples,
                                  step_counts=[1, args.num_student_steps]))
    accelerator.wait_for_everyone()  # ranks tear the process group down together (a lone gloo rank can hang)
    accelerator.end_training()

    progress.summary("train_kd", logger)

if __name__ == "__main__":
    run_main(main)
