"""Benchmark rows of a training checkpoint's student (raw weights and EMA) without finishing the run.

    python benchmarks/eval_checkpoint.py --run outputs/meanflow --checkpoint checkpoint-300 --steps 1 2

The run folder's final pipeline layout is rebuilt from the teacher (or stage-1 model) named in its
train_config.yaml: the student architecture (interval input for MeanFlow) and the script's scheduler.

A run on a stock text-to-image digits pipeline (`--pretrained_model_name_or_path`, e.g. the shipped
`text_digits_teacher`) is scored by `evaluation.text_digits` instead: the teacher's pipeline holding the
checkpoint's UNet, sampled with LCMScheduler (DMD2, f-distill, CM: x0, then fresh noise) or, with
`--deterministic`, DDIM trailing (KD), at the run's `student_times` when it set them (the model card's
`timesteps`), mean ± std over `--seeds`:

    python benchmarks/eval_checkpoint.py --run outputs/t2i_dmd2 --checkpoint checkpoint-250 --steps 1 --seeds 0 1 2
"""

import argparse
import os

import torch
import yaml
from safetensors.torch import load_file

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference, benchmark_row, markdown_table, seeded_scores
from diffusers_fastgen.evaluation.text_digits import score_text_digits_pipeline
from diffusers_fastgen.models.interval import add_interval_input
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_map_scheduler, flow_match_sde_scheduler, scm_rf_scheduler
from diffusers_fastgen.training.teachers import TextToImageTeacher


def student_pipeline(config: dict) -> DigitsPipeline:
    """An untrained student pipeline of the run's architecture and sampler."""
    base = DigitsPipeline.from_pretrained(config.get("stage1") or config["teacher"]).unet
    if "interval_dim" in config:
        return DigitsPipeline(unet=add_interval_input(base, dim=config["interval_dim"]), scheduler=flow_map_scheduler())
    if "sigma_d" in config:
        return DigitsPipeline(unet=base, scheduler=scm_rf_scheduler(config["sigma_d"], config["intermediate_t"]))
    return DigitsPipeline(unet=base, scheduler=flow_match_sde_scheduler(shift=config["shift"]))


def text_to_image_student(config: dict, deterministic: bool) -> TextToImageTeacher:
    """The run's stock teacher pipeline with the student's sampler and step times (the model card's call, from
    `sampling_kwargs`); its UNet is to get the checkpoint's weights."""
    if config.get("lora_rank"):
        raise ValueError("a LoRA run's checkpoint holds adapters, not a UNet: score its final folder with "
                         "`benchmarks/text_digits.py --lora <run>`.")
    teacher = TextToImageTeacher(config["pretrained_model_name_or_path"])
    if config.get("student_times"):
        teacher.set_custom_schedule(config["student_times"], noise_input=True)
    teacher.pipe.scheduler = teacher.student_scheduler(stochastic=not deterministic)
    return teacher


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", required=True, help="e.g. checkpoint-300 (inside <run>/checkpoints)")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--weights", nargs="+", default=["raw", "ema"], choices=["raw", "ema"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="text-to-image runs: sampling seeds")
    parser.add_argument("--deterministic", action="store_true",
                        help="text-to-image runs: DDIM trailing (KD's sampler) instead of LCMScheduler")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.run, "train_config.yaml")) as fh:
        config = yaml.safe_load(fh)
    folder = os.path.join(args.run, "checkpoints", args.checkpoint)
    text = config.get("pretrained_model_name_or_path") is not None
    reference, rows = DigitsReference(), []
    teacher = text_to_image_student(config, args.deterministic) if text else None
    pipe = teacher.pipe if text else student_pipeline(config)  # every weight of its UNet is replaced per file below
    for kind in args.weights:
        # accelerate names a lone prepared model model.safetensors, several model_0, model_1, ... (student first)
        raw = "model.safetensors" if os.path.isfile(os.path.join(folder, "model.safetensors")) else "model_0.safetensors"
        file = raw if kind == "raw" else "ema_student.safetensors"
        state = load_file(os.path.join(folder, file))
        missing, unexpected = pipe.unet.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise RuntimeError(f"{file}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for n in args.steps:
            if text:
                call = teacher.sampling_kwargs(n)
                scores = seeded_scores(lambda seed: score_text_digits_pipeline(
                    pipe, reference, name="", num_samples=args.num_samples, seed=seed, **call), args.seeds)
                spread = f", FD std {scores['fd'][1]:.2f} over seeds {args.seeds}" if len(args.seeds) > 1 else ""
                rows.append({"model": f"{args.checkpoint} {kind}{spread}", "steps": n, "nfe": n,
                             **{metric: mean for metric, (mean, _) in scores.items()}})
                continue
            rows.append(benchmark_row(pipe, reference, name=f"{args.checkpoint} {kind}", num_inference_steps=n,
                                      guidance_scale=1.0, num_samples=args.num_samples, repeats=1))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
