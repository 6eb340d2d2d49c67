"""torch.compile, int8 and channels-last on one pipeline folder, timed side by side in one run, with their
agreement with eager and their quality change on the embedded benchmarks.

    python benchmarks/speed_features.py --model outputs/self_forcing --variants eager compile int8
    python benchmarks/speed_features.py --model outputs/dmd2 --steps 1 --variants eager channels_last int8 --score

Every variant is a fresh `load_pipeline(model, compile= / quantize= / channels_last=)`; the first call
(which compiles) is timed separately, then the variants alternate for `--rounds` rounds on the same seeded
batch (medians, one thread). The agreement with eager is given for one denoiser forward (`one_forward`) and
for the sampled latents, where chained steps compound it.
`--score` adds each variant's quality on the benchmark that fits the pipeline (digits: FD / accuracy over
1,000 samples; text-to-image digits: the same through the held-out prompts, decode included; moving digits:
per-frame accuracy / FD / motion error over 500 videos).
"""

import argparse
import statistics
import time

import torch

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference, benchmark_row
from diffusers_fastgen.evaluation.moving_digits import (
    CANVAS,
    NUM_FRAMES,
    MovingDigitsReference,
    benchmark_video_pipeline,
    moving_digits_cond,
    sample_motion,
)
from diffusers_fastgen.evaluation.text_digits import score_text_digits_pipeline
from diffusers_fastgen.generate import load_pipeline
from diffusers_fastgen.pipelines import CausalWanPipeline, DigitsPipeline

VARIANTS = {"eager": {}, "compile": {"compile": True}, "int8": {"quantize": "int8"},
            "channels_last": {"channels_last": True}}


def batch_call(pipe, *, steps: int, batch_size: int, prompt: str):
    """A zero-argument callable returning the output latents of one seeded batch."""
    if isinstance(pipe, CausalWanPipeline):
        labels = torch.arange(batch_size) % 10
        _, v = sample_motion(batch_size, torch.Generator().manual_seed(0))
        cond = moving_digits_cond(labels, v)
        return lambda: pipe(prompt_embeds=cond, num_frames=NUM_FRAMES, height=CANVAS, width=CANVAS,
                            output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    items = (list(range(10)) * batch_size)[:batch_size] if isinstance(pipe, DigitsPipeline) else [prompt] * batch_size
    return lambda: pipe(items, num_inference_steps=steps, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images


@torch.no_grad()
def one_forward(pipe) -> torch.Tensor:
    """The denoiser alone, once, on seeded random inputs at timestep 500 (a Wan transformer without the
    causal cache): agreement per call, which chained sampling steps then compound."""
    g = torch.Generator().manual_seed(0)
    if isinstance(pipe, CausalWanPipeline):
        cfg = pipe.transformer.config
        x = torch.randn(4, cfg.in_channels, NUM_FRAMES, CANVAS, CANVAS, generator=g)
        return pipe.transformer(x, torch.full((4,), 500.0), torch.randn(4, 3, cfg.text_dim, generator=g),
                                return_dict=False)[0]
    cfg = pipe.unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(10, cfg.in_channels, size, size, generator=g)
    if isinstance(pipe, DigitsPipeline):
        return pipe.unet(x, torch.full((10,), 500.0), class_labels=torch.arange(10)).sample
    text = torch.randn(10, 8, cfg.cross_attention_dim, generator=g)
    return pipe.unet(x, torch.full((10,), 500.0), encoder_hidden_states=text).sample


def score(pipe, steps: int) -> dict:
    if isinstance(pipe, CausalWanPipeline):
        row = benchmark_video_pipeline(pipe, MovingDigitsReference(), num_videos=500)
        return {"accuracy": row["accuracy"], "FD": row["fd"], "motion error": row["motion_error"]}
    if isinstance(pipe, DigitsPipeline):
        row = benchmark_row(pipe, DigitsReference(), name="", num_inference_steps=steps, guidance_scale=1.0)
    else:
        row = score_text_digits_pipeline(pipe, name="", num_inference_steps=steps, guidance_scale=1.0)
    return {"accuracy": row["accuracy"], "FD": row["fd"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["eager", "compile", "int8"])
    parser.add_argument("--steps", type=int, default=1, help="sampling steps (ignored for CausalWanPipeline)")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", default="a handwritten 7")
    parser.add_argument("--score", action="store_true")
    args = parser.parse_args()
    if args.variants[0] != "eager":
        parser.error("--variants must start with eager (the reference)")
    torch.set_num_threads(1)
    calls, first, outputs, pipes, forwards = {}, {}, {}, {}, {}
    for name in args.variants:
        pipe = load_pipeline(args.model, **VARIANTS[name])
        pipes[name] = pipe
        forwards[name] = one_forward(pipe)  # first, so a compiled model compiles for this shape
        calls[name] = batch_call(pipe, steps=args.steps, batch_size=args.batch_size, prompt=args.prompt)
        start = time.perf_counter()
        outputs[name] = calls[name]()
        first[name] = time.perf_counter() - start
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    scores = {name: score(pipes[name], args.steps) for name in calls} if args.score else {}
    metrics = list(next(iter(scores.values()))) if scores else []
    print(f"| variant | first call s | median s / {args.batch_size} | speed-up | max abs diff to eager, one forward "
          "| max abs diff to eager, sampled latents |"
          + "".join(f" {m} |" for m in metrics))
    print("|---|---|---|---|---|---|" + "---|" * len(metrics))
    for name in calls:
        diff = (outputs[name].float() - outputs["eager"].float()).abs().max().item()
        cells = "".join(f" {scores[name][m]:.4g} |" for m in metrics)
        one = (forwards[name] - forwards["eager"]).abs().max().item()
        print(f"| {name} | {first[name]:.2f} | {med[name]:.4f} | {med['eager'] / med[name]:.2f}x | {one:.2e} | "
              f"{diff:.2e} |{cells}")
    print(f"({args.rounds} alternating rounds, one thread; model {args.model})")


if __name__ == "__main__":
    main()
