"""Evaluate digits pipeline folders at chosen step counts and guidance scales; print a markdown table.

    python benchmarks/digits.py --pipelines outputs/digits_teacher --steps 1 2 4 8 16 50 --guidance_scales 1 2 --reference
    python benchmarks/digits.py --pipelines outputs/dmd2=DMD2 --steps 1 --seeds 0 1 2 --floor

`--seeds` samples every row with each seed and reports mean ± std; `--floor` adds the real-data floor (the
same number of real training digits against the held-out ones, one random subset per seed) and each row's
excess FD over it, (FD − floor) — the quantity student / teacher ratios should be taken of.
"""

import argparse
import os

import torch

from diffusers_fastgen.evaluation.digits_benchmark import (
    METRICS,
    DigitsReference,
    benchmark_row,
    markdown_table,
    real_floor,
    seeded_scores,
)
from diffusers_fastgen.pipelines import DigitsPipeline


def _cell(metric, mean, std):
    scale, fmt = (1e3, "{:.2f}") if metric == "kid" else ((100, "{:.1f}%") if metric == "accuracy" else (1, "{:.2f}"))
    return fmt.format(mean * scale) + (f" ± {fmt.format(std * scale).rstrip('%')}" if std else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipelines", nargs="+", required=True, help="pipeline folders, optionally 'path=label'")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 50])
    parser.add_argument("--guidance_scales", nargs="+", type=float, default=[1.0])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="sampling seeds (mean ± std over them)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported (one seed)")
    parser.add_argument("--reference", action="store_true", help="also print the real-data and noise rows")
    parser.add_argument("--floor", action="store_true", help="the real-data floor at --num_samples, and excess FD")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps timings steady)")
    args = parser.parse_args()
    if any(s < 1 for s in args.steps):
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    torch.set_num_threads(args.threads)
    reference = DigitsReference()
    if len(args.seeds) == 1 and not args.floor:  # the single-seed table with timings
        rows = reference.reference_rows(args.seeds[0]) if args.reference else []
        for path, label in _folders(args.pipelines):
            pipe = DigitsPipeline.from_pretrained(path)
            for g in args.guidance_scales:
                for steps in args.steps:
                    rows.append(benchmark_row(pipe, reference, name=label, num_inference_steps=steps, guidance_scale=g,
                                              num_samples=args.num_samples, seed=args.seeds[0], repeats=args.repeats))
                    print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
        print()
        print(markdown_table(rows))
        return
    floor = seeded_scores(lambda seed: real_floor(reference, args.num_samples, seed), args.seeds)
    header = "| model | steps | CFG | " + " | ".join(METRICS) + " | excess FD |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    lines.append("| real train digits (floor) | – | – | " + " | ".join(_cell(m, *floor[m]) for m in METRICS) + " | 0 |")
    print("\n".join(lines), flush=True)
    for path, label in _folders(args.pipelines):
        pipe = DigitsPipeline.from_pretrained(path)
        for g in args.guidance_scales:
            for steps in args.steps:
                scores = seeded_scores(lambda seed: benchmark_row(pipe, reference, name=label, num_inference_steps=steps,
                                                                  guidance_scale=g, num_samples=args.num_samples,
                                                                  seed=seed), args.seeds)
                excess = scores["fd"][0] - floor["fd"][0]
                lines.append(f"| {label} | {steps} | {g} | " + " | ".join(_cell(m, *scores[m]) for m in METRICS)
                             + f" | {excess:.3f} |")
                print(lines[-1], flush=True)
    print(f"\n({len(args.seeds)} seed(s) x {args.num_samples} samples against the 360 held-out digits; KID x 1e3)")
    print("\n".join(lines))


def _folders(specs):
    for spec in specs:
        path, _, label = spec.partition("=")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"--pipelines: {path!r} is not a pipeline folder (no model_index.json).")
        yield path, label or os.path.basename(path.rstrip("/"))


if __name__ == "__main__":
    main()
