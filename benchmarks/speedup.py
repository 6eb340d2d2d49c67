"""End-to-end speed-up of a distilled student over its teacher, same pipeline code, one process.

    python benchmarks/speedup.py --teacher src/diffusers_fastgen/evaluation/assets/digits_teacher \
        --teacher_steps 50 --teacher_guidance 1.0 --student outputs/dmd2 --student_steps 1

Teacher and student batches alternate for `--rounds` rounds after a warm-up (one thread, as docs/results.md's
timings); the medians give the wall-clock speed-up, and its fraction of the NFE ratio (teacher steps, x2
with CFG, over student steps), which is the limit when the denoiser dominates.

Pipelines: anything `diffusers_fastgen.generate.load_pipeline` opens. DigitsPipeline samples class labels;
pipelines with a VAE (StableDiffusionPipeline and the like) sample `--prompt` and are timed twice, decoded
(`output_type="np"`, the wall clock a user sees) and as latents, so the table says what the decode costs;
CausalWanPipeline folders without a text encoder sample the moving-digits conditioning (CFG against its null
conditioning) and report frames per second and the time to the first finished block — for a bidirectional
teacher (one block holding every frame) that is the whole video. `--channels_last` adds rows with the
denoiser and VAE in channels-last memory format, timed in the same rounds.
"""

import argparse
import statistics
import time

import torch

from diffusers_fastgen.evaluation.moving_digits import (
    CANVAS,
    NUM_FRAMES,
    moving_digits_cond,
    moving_digits_null_cond,
    sample_motion,
)
from diffusers_fastgen.generate import load_pipeline, to_channels_last
from diffusers_fastgen.pipelines import CausalWanPipeline, DigitsPipeline


def sampler(pipe, *, steps: int, guidance: float, batch_size: int, prompt: str, output_type: str):
    """A zero-argument callable that samples one batch and returns (seconds, seconds to the first block)."""
    g = torch.Generator().manual_seed(0)
    if isinstance(pipe, CausalWanPipeline):
        labels = torch.arange(batch_size) % 10
        _, v = sample_motion(batch_size, torch.Generator().manual_seed(0))
        cond = moving_digits_cond(labels, v)
        extra = {"guidance_scale": guidance, "negative_prompt_embeds": moving_digits_null_cond(batch_size)} \
            if guidance > 1 else {}
        def run():
            start, first = time.perf_counter(), None
            for _ in pipe.stream(prompt_embeds=cond, num_frames=NUM_FRAMES, height=CANVAS, width=CANVAS, generator=g, **extra):
                first = first if first is not None else time.perf_counter() - start
            return time.perf_counter() - start, first
        return run
    if isinstance(pipe, DigitsPipeline):
        items = (list(range(10)) * batch_size)[:batch_size]
    else:
        items = [prompt] * batch_size

    def run():
        start = time.perf_counter()
        pipe(items, num_inference_steps=steps, guidance_scale=guidance, output_type=output_type, generator=g)
        return time.perf_counter() - start, None
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--teacher_steps", type=int, default=50, help="ignored for CausalWanPipeline (its recipe)")
    parser.add_argument("--teacher_guidance", type=float, default=1.0)
    parser.add_argument("--student", required=True)
    parser.add_argument("--student_steps", type=int, default=1, help="ignored for CausalWanPipeline (its recipe)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", default="a handwritten 7")
    parser.add_argument("--channels_last", action="store_true", help="also time both in channels-last format")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {"teacher": (args.teacher, args.teacher_steps, args.teacher_guidance),
              "student": (args.student, args.student_steps, 1.0)}
    runs, nfe = {}, {}
    for name, (path, steps, guidance) in models.items():
        variants = [("", False)] + ([(" channels-last", True)] if args.channels_last else [])
        for suffix, channels_last in variants:
            pipe = load_pipeline(path)
            if channels_last:
                to_channels_last(pipe)
            kinds = [("np", "")] + ([("latent", ", no decode")] if getattr(pipe, "vae", None) is not None
                                    and not isinstance(pipe, CausalWanPipeline) else [])
            for output_type, label in kinds:
                key = f"{name}{suffix}{label}"
                runs[key] = sampler(pipe, steps=steps, guidance=guidance, batch_size=args.batch_size,
                                    prompt=args.prompt, output_type=output_type)
                if isinstance(pipe, CausalWanPipeline):
                    cfg = pipe.config
                    nfe[key] = (len(cfg.denoising_timesteps), cfg.num_frames_per_block, guidance)
                else:
                    nfe[key] = steps * (2 if guidance > 1 else 1)
    for run in runs.values():  # warm-up
        run()
    times = {key: [] for key in runs}
    firsts = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            total, first = run()
            times[key].append(total)
            if first is not None:
                firsts[key].append(first)
    med = {key: statistics.median(v) for key, v in times.items()}
    video = any(firsts.values())
    if video:
        frames = NUM_FRAMES * args.batch_size
        print(f"| model | steps per block | frames per block | CFG | median s / {args.batch_size} videos | "
              "frames / s | median s to first block |")
        print("|---|---|---|---|---|---|---|")
        for key in runs:
            steps, block, guidance = nfe[key]
            print(f"| {key} | {steps} | {block} | {guidance} | {med[key]:.4f} | {frames / med[key]:.1f} | "
                  f"{statistics.median(firsts[key]):.4f} |")
        t, s = "teacher", "student"
        print(f"speed-up {med[t] / med[s]:.1f}x in frames per second, "
              f"{statistics.median(firsts[t]) / statistics.median(firsts[s]):.1f}x in time to first block "
              f"({args.rounds} alternating rounds, {args.threads} thread(s))")
        return
    print(f"| model | NFE | median s / {args.batch_size} samples |")
    print("|---|---|---|")
    for key in runs:
        print(f"| {key} | {nfe[key]} | {med[key]:.4f} |")
    for suffix in ("", ", no decode"):
        t, s = f"teacher{suffix}", f"student{suffix}"
        if t in med and s in med:
            ratio = nfe[t] / nfe[s]
            print(f"{t.replace('teacher', '').strip(', ') or 'wall clock'}: speed-up {med[t] / med[s]:.1f}x; "
                  f"NFE ratio {ratio:.0f}x; fraction of the NFE limit {med[t] / med[s] / ratio:.2f}")
    if "student, no decode" in med:
        print(f"decode: {med['student'] - med['student, no decode']:.4f} s of the student's {med['student']:.4f} s; "
              f"{med['teacher'] - med['teacher, no decode']:.4f} s of the teacher's {med['teacher']:.4f} s")
    if args.channels_last:
        for name in ("teacher", "student"):
            print(f"channels-last {name}: {med[name] / med[f'{name} channels-last']:.2f}x")
    print(f"({args.rounds} alternating rounds, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
