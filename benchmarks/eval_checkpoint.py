"""Benchmark rows of a training checkpoint's student (raw weights and EMA) without finishing the run.

    python benchmarks/eval_checkpoint.py --run outputs/meanflow --checkpoint checkpoint-300 --steps 1 2

The run folder's final pipeline layout is rebuilt from the teacher (or stage-1 model) named in its
train_config.yaml: the student architecture (interval input for MeanFlow) and the script's scheduler.
"""

import argparse
import os

import torch
import yaml
from safetensors.torch import load_file

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference, benchmark_row, markdown_table
from diffusers_fastgen.models.interval import add_interval_input
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import flow_map_scheduler, flow_match_sde_scheduler, scm_rf_scheduler


def student_pipeline(config: dict) -> DigitsPipeline:
    """An untrained student pipeline of the run's architecture and sampler."""
    base = DigitsPipeline.from_pretrained(config.get("stage1") or config["teacher"]).unet
    if "interval_dim" in config:
        return DigitsPipeline(unet=add_interval_input(base, dim=config["interval_dim"]), scheduler=flow_map_scheduler())
    if "sigma_d" in config:
        return DigitsPipeline(unet=base, scheduler=scm_rf_scheduler(config["sigma_d"], config["intermediate_t"]))
    return DigitsPipeline(unet=base, scheduler=flow_match_sde_scheduler(shift=config["shift"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--checkpoint", required=True, help="e.g. checkpoint-300 (inside <run>/checkpoints)")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--weights", nargs="+", default=["raw", "ema"], choices=["raw", "ema"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.run, "train_config.yaml")) as fh:
        config = yaml.safe_load(fh)
    folder = os.path.join(args.run, "checkpoints", args.checkpoint)
    reference, rows = DigitsReference(), []
    for kind in args.weights:
        pipe = student_pipeline(config)
        # accelerate names a lone prepared model model.safetensors, several model_0, model_1, ... (student first)
        raw = "model.safetensors" if os.path.isfile(os.path.join(folder, "model.safetensors")) else "model_0.safetensors"
        file = raw if kind == "raw" else "ema_student.safetensors"
        state = load_file(os.path.join(folder, file))
        missing, unexpected = pipe.unet.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise RuntimeError(f"{file}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for n in args.steps:
            rows.append(benchmark_row(pipe, reference, name=f"{args.checkpoint} {kind}", num_inference_steps=n,
                                      guidance_scale=1.0, num_samples=args.num_samples, repeats=1))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
