"""End-to-end speed-up of a distilled student over its teacher, same pipeline code, one process.

    python benchmarks/speedup.py --teacher src/diffusers_fastgen/evaluation/assets/digits_teacher \
        --teacher_steps 50 --teacher_guidance 1.0 --student outputs/dmd2 --student_steps 1

Teacher and student batches alternate for `--rounds` rounds after a warm-up (one thread, as docs/results.md's
timings); the medians give the wall-clock speed-up, and its fraction of the NFE ratio (teacher steps, x2
with CFG, over student steps), which is the limit when the denoiser dominates. Pipelines: anything
`diffusers_fastgen.generate.load_pipeline` opens (DigitsPipeline takes class labels, the others prompts).
"""

import argparse
import statistics
import time

import torch

from diffusers_fastgen.generate import load_pipeline
from diffusers_fastgen.pipelines import DigitsPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--teacher_steps", type=int, default=50)
    parser.add_argument("--teacher_guidance", type=float, default=1.0)
    parser.add_argument("--student", required=True)
    parser.add_argument("--student_steps", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"teacher": (load_pipeline(args.teacher), args.teacher_steps, args.teacher_guidance),
            "student": (load_pipeline(args.student), args.student_steps, 1.0)}

    def sample(name):
        pipe, steps, guidance = runs[name]
        items = (list(range(10)) * args.batch_size)[:args.batch_size] if isinstance(pipe, DigitsPipeline) else \
            [args.prompt] * args.batch_size
        start = time.perf_counter()
        pipe(items, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
             generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start

    for name in runs:  # warm-up
        sample(name)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name in runs:
            times[name].append(sample(name))
    t, s = statistics.median(times["teacher"]), statistics.median(times["student"])
    nfe_t = args.teacher_steps * (2 if args.teacher_guidance > 1 else 1)
    nfe_s = args.student_steps
    print(f"| model | steps | CFG | NFE | median s / {args.batch_size} samples (decode included) |")
    print("|---|---|---|---|---|")
    print(f"| teacher | {args.teacher_steps} | {args.teacher_guidance} | {nfe_t} | {t:.4f} |")
    print(f"| student | {args.student_steps} | 1.0 | {nfe_s} | {s:.4f} |")
    ratio = nfe_t / nfe_s
    print(f"speed-up {t / s:.1f}x; NFE ratio {ratio:.0f}x; fraction of the NFE limit {t / s / ratio:.2f} "
          f"({args.rounds} alternating rounds, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
