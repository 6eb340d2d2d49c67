"""Evaluate digits pipeline folders at chosen step counts and guidance scales; print a markdown table.

    python benchmarks/digits.py --pipelines outputs/digits_teacher --steps 1 2 4 8 16 50 --guidance_scales 1 2 --reference
"""

import argparse
import os

import torch

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference, benchmark_row, markdown_table
from diffusers_fastgen.pipelines import DigitsPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--pipelines", nargs="+", required=True, help="pipeline folders, optionally 'path=label'")
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 50])
    parser.add_argument("--guidance_scales", nargs="+", type=float, default=[1.0])
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    parser.add_argument("--reference", action="store_true", help="also print the real-data and noise rows")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps timings steady)")
    args = parser.parse_args()
    if any(s < 1 for s in args.steps):
        raise ValueError(f"--steps must be >= 1, got {args.steps}.")
    torch.set_num_threads(args.threads)
    reference = DigitsReference()
    rows = reference.reference_rows(args.seed) if args.reference else []
    for spec in args.pipelines:
        path, _, label = spec.partition("=")
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ValueError(f"--pipelines: {path!r} is not a pipeline folder (no model_index.json).")
        pipe = DigitsPipeline.from_pretrained(path)
        for g in args.guidance_scales:
            for steps in args.steps:
                rows.append(benchmark_row(pipe, reference, name=label or os.path.basename(path.rstrip("/")),
                                          num_inference_steps=steps, guidance_scale=g, num_samples=args.num_samples,
                                          seed=args.seed, repeats=args.repeats))
                print(markdown_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
