"""Score text-to-image digits pipelines (the shipped StableDiffusionPipeline teacher and its students).

    # the teacher table: its own stock scheduler at 1/2/4/8/25/50 steps, CFG 1/2/4
    python benchmarks/text_digits.py --teacher_table
    # a full student folder, sampled with the call its model card gives (steps, and the saved scheduler)
    python benchmarks/text_digits.py --student outputs/dmd2_text_digits --num_inference_steps 1
    # a LoRA student: the teacher with `load_lora_weights` and the saved scheduler
    python benchmarks/text_digits.py --lora outputs/dmd2_text_digits_lora --num_inference_steps 1
    # a consistency student at 4 steps with stock TCDScheduler's gamma sampler (the card's `--tcd_gamma` call)
    python benchmarks/text_digits.py --student outputs/cm_text_digits --num_inference_steps 4 --scheduler TCDScheduler --eta 0.7
    # the teacher with CFG 4 only where the timestep is in (300, 700] (CFG 1 elsewhere), 25 steps
    python benchmarks/text_digits.py --guidance_windows 4,300,700 --num_inference_steps 25

Rows: NFE, seconds per 1,000 images (VAE decode included; median of --repeats passes), FD, excess FD over the
floor, KID (×1e3), precision / recall (k = 3), accuracy and diversity against the held-out digits with the digits benchmark's classifier, prompted with phrasings never
seen in training (`evaluation.text_digits.HELD_OUT_PHRASINGS`; `--phrasings` for others). `--seeds 0 1 2` gives mean ± std over
sampling seeds. The first row is the floor: the same number of real training digits (balanced classes,
drawn per seed) scored the same way; excess FD = FD - floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference
from diffusers_fastgen.evaluation.digits_data import load_digits_arrays
from diffusers_fastgen.evaluation.text_digits import (
    HELD_OUT_PHRASINGS,
    TEXT_DIGITS_TEACHER_PATH,
    benchmark_prompts,
    score_text_digits_pipeline,
)
from diffusers_fastgen.models.interval import interval_guidance_scale

COLUMNS = ("model", "nfe", "s_per_1k", "fd", "excess_fd", "kid", "precision", "recall", "accuracy", "diversity")
HEADER = ("| model | NFE | s / 1k | FD ↓ | excess FD | KID ×1e3 ↓ | precision | recall | accuracy | diversity |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
AVERAGED = ("fd", "kid", "precision", "recall", "accuracy", "diversity")


def mean_over_seeds(rows: list[dict], head: dict) -> dict:
    """`head` + the mean and (with > 1 row) sample std over seeds of every metric."""
    out = dict(head)
    for key in AVERAGED:
        values = [r[key] for r in rows]
        out[key] = statistics.mean(values)
        out[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def rows_over_seeds(pipe, reference, *, name, seeds, num_samples, repeats, **call) -> dict:
    rows = [score_text_digits_pipeline(pipe, reference, name=name, num_samples=num_samples, seed=s, repeats=repeats,
                                       **call) for s in seeds]
    return mean_over_seeds(rows, rows[0])


def floor_row(reference: DigitsReference, num_samples: int, seeds) -> dict:
    """The metric's floor at the benchmark's sample size: `num_samples` real training digits (drawn per seed,
    classes balanced like the prompts) scored like a model."""
    train, labels = load_digits_arrays("train")
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        want = np.arange(num_samples) % 10
        pick = np.array([rng.choice(np.flatnonzero(labels == c)) for c in want])
        rows.append(reference.score(torch.from_numpy(train[pick]), want))
    return mean_over_seeds(rows, {"model": f"floor: {num_samples} real training digits", "nfe": 0, "s_per_1k": 0.0})


def parse_guidance_window(spec: str) -> tuple[float, float, float]:
    """(W, LO, HI) from "W,LO,HI"; a ValueError naming `guidance_windows` otherwise (NaN included)."""
    try:
        w, lo, hi = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"`guidance_windows` entries are W,LO,HI (three numbers), got {spec!r}.") from None
    if not (w >= 1 and 0 <= lo < hi):
        raise ValueError(f"`guidance_windows` needs W >= 1 and 0 <= LO < HI, got {spec!r}.")
    return w, lo, hi


def guidance_window_call(pipe, spec: str, num_steps: int) -> dict:
    """Pipeline-call kwargs for CFG W at timesteps in (LO, HI] only: the first step's scale, and a step-end
    callback that sets the next step's (the stock pipeline reads `_guidance_scale` every step; "off" is 1 + 1e-6,
    which keeps the batch doubled that the pipeline built for CFG)."""
    w, lo, hi = parse_guidance_window(spec)
    off = 1.0 + 1e-6
    pipe.scheduler.set_timesteps(num_steps)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]

    def callback(p, i, t, kwargs):
        nxt = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        p._guidance_scale = w if lo < nxt <= hi else off
        return kwargs
    return {"guidance_scale": w if lo < timesteps[0] <= hi else off, "callback_on_step_end": callback}


def fmt(row: dict, floor: dict) -> str:
    """One table line; excess FD = FD - the floor row's FD (both means over the same seeds)."""
    def cell(key):
        if key == "excess_fd":
            return f"{row['fd'] - floor['fd']:.2f}"
        v = row[key]
        if not isinstance(v, float):
            return str(v)
        scale = {"accuracy": 100, "kid": 1e3}.get(key, 1)
        text = f"{v * scale:.{1 if key == 'accuracy' else 2}f}"
        if key in AVERAGED and row.get(key + "_std"):
            text += f" ± {row[key + '_std'] * scale:.2f}"
        return text + ("%" if key == "accuracy" else "")
    return "| " + " | ".join(cell(k) for k in COLUMNS) + " |"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=TEXT_DIGITS_TEACHER_PATH)
    parser.add_argument("--teacher_table", action="store_true")
    parser.add_argument("--student", default=None, help="a full student pipeline folder")
    parser.add_argument("--lora", default=None, help="a LoRA student folder (weights + scheduler/) of --teacher")
    parser.add_argument("--name", default=None)
    parser.add_argument("--num_inference_steps", type=int, nargs="+", default=[1])
    parser.add_argument("--timesteps", type=int, nargs="+", default=None,
                        help="a custom schedule the model card passes as `timesteps` (e.g. sCD's 2 steps: 999 557)")
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument("--scheduler", default=None,
                        help="a stock diffusers scheduler class built from the student's saved one (from_config), e.g. "
                             "TCDScheduler")
    parser.add_argument("--eta", type=float, default=None, help="passed to the call (DDIM's eta, TCDScheduler's gamma)")
    parser.add_argument("--interval_guidance", action="store_true",
                        help="a MeanFlow student: guidance_scale = 1 + 0.01 / N for N steps (its model card's call)")
    parser.add_argument("--guidance_windows", nargs="+", default=[], metavar="W,LO,HI",
                        help="teacher rows with CFG W only at timesteps in (LO, HI], CFG 1 elsewhere (Kynkaanniemi et "
                             "al. 2024's guidance interval), at the first --num_inference_steps")
    parser.add_argument("--phrasings", nargs="+", default=list(HELD_OUT_PHRASINGS),
                        help="prompt templates ({n}: numeral, {w}: word); default the held-out ones; e.g. their training "
                             "twins: 'a handwritten {w}' 'handwritten digit {n}'")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    for spec in args.guidance_windows:  # bad values are named before any sampling
        parse_guidance_window(spec)
    benchmark_prompts(10, tuple(args.phrasings))
    if args.scheduler is not None and not (isinstance(getattr(diffusers, args.scheduler, None), type)
                                           and args.scheduler.endswith("Scheduler")):
        raise ValueError(f"`--scheduler` must name a diffusers scheduler class (e.g. TCDScheduler), got {args.scheduler!r}.")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:  # NaN fails too
        raise ValueError(f"`--eta` must be in [0, 1], got {args.eta}.")
    torch.set_num_threads(1)
    reference = DigitsReference()
    common = dict(seeds=args.seeds, num_samples=args.num_samples, repeats=args.repeats, phrasings=tuple(args.phrasings))
    rows = [floor_row(reference, args.num_samples, args.seeds)]
    floor = rows[0]
    print(fmt(rows[-1], floor), flush=True)
    if args.teacher_table:
        pipe = DiffusionPipeline.from_pretrained(args.teacher)
        for cfg in (1.0, 2.0, 4.0):
            for steps in (1, 2, 4, 8, 25, 50):
                rows.append(rows_over_seeds(pipe, reference, name=f"teacher {type(pipe.scheduler).__name__} "
                                            f"{steps} steps CFG {cfg:g}", num_inference_steps=steps,
                                            guidance_scale=cfg, **common))
                print(fmt(rows[-1], floor), flush=True)
    for spec in args.guidance_windows:
        pipe = DiffusionPipeline.from_pretrained(args.teacher)
        rows.append(rows_over_seeds(pipe, reference, name=f"teacher {type(pipe.scheduler).__name__} "
                                    f"{args.num_inference_steps[0]} steps, CFG {spec} (W, LO, HI)",
                                    num_inference_steps=args.num_inference_steps[0],
                                    **guidance_window_call(pipe, spec, args.num_inference_steps[0]), **common))
        print(fmt(rows[-1], floor), flush=True)
    for folder, lora in ((args.student, False), (args.lora, True)):
        if folder is None:
            continue
        if lora:
            pipe = DiffusionPipeline.from_pretrained(args.teacher)
            pipe.load_lora_weights(folder)
            with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
                name = json.load(f)["_class_name"]
            pipe.scheduler = getattr(diffusers, name).from_pretrained(folder, subfolder="scheduler")  # the saved recipe
        else:
            pipe = DiffusionPipeline.from_pretrained(folder)
        if args.scheduler is not None:  # the card's swap: the stock class on the saved scheduler's config
            pipe.scheduler = getattr(diffusers, args.scheduler).from_config(pipe.scheduler.config)
        calls = ([{"num_inference_steps": len(args.timesteps), "timesteps": args.timesteps}] if args.timesteps
                 else [{"num_inference_steps": steps} for steps in args.num_inference_steps])
        if args.eta is not None:
            calls = [{**call, "eta": args.eta} for call in calls]
        for call in calls:
            scale = (interval_guidance_scale(call["num_inference_steps"]) if args.interval_guidance
                     else args.guidance_scale)
            rows.append(rows_over_seeds(pipe, reference, name=f"{args.name or folder} {call['num_inference_steps']} step(s)",
                                        guidance_scale=scale, **call, **common))
            print(fmt(rows[-1], floor), flush=True)
    print(HEADER)
    for row in rows:
        print(fmt(row, floor))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
