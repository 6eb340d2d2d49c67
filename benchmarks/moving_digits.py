"""The moving-digits video benchmark table: real videos (the metric's scale) and CausalWanPipeline folders.

    python benchmarks/moving_digits.py --pipelines outputs/self_forcing outputs/causvid --num_videos 500
"""

from __future__ import annotations

import argparse

import torch

from diffusers_fastgen.evaluation.moving_digits import (
    MovingDigits,
    MovingDigitsReference,
    benchmark_video_pipeline,
    markdown_rows,
)
from diffusers_fastgen.pipelines import CausalWanPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", nargs="*", default=[])
    parser.add_argument("--num_videos", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scales", type=float, nargs="*", default=[1.0],
                        help="each pipeline is scored at each CFG scale (> 1 needs a teacher trained with cond_dropout)")
    parser.add_argument("--skip_reference", action="store_true", help="omit the real / frozen / noise rows")
    parser.add_argument("--any_phase", action="store_true",
                        help="real clips and path fits start anywhere on the bounce cycle (train_causal_sft --any_phase)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref = MovingDigitsReference()
    rows = []
    for split in () if args.skip_reference else ("train", "held_out"):
        data = MovingDigits(split, any_phase=args.any_phase).sample(args.num_videos,
                                                                    torch.Generator().manual_seed(args.seed))
        rows.append({"model": f"real videos ({split} digits)",
                     **ref.score(data["video"], data["labels"], data["v"], any_phase=args.any_phase)})
        frozen = data["video"][:, :, :1].expand_as(data["video"])
        rows.append({"model": f"first real frame repeated ({split})",
                     **ref.score(frozen, data["labels"], data["v"], any_phase=args.any_phase)})
    if not args.skip_reference:
        noise = torch.rand(args.num_videos, 1, 8, 16, 16, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
        rows.append({"model": "uniform noise", **ref.score(noise, data["labels"], data["v"], any_phase=args.any_phase)})
    for path in args.pipelines:
        pipe = CausalWanPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        for w in args.guidance_scales:
            torch.manual_seed(args.seed)
            rows.append({"model": path if w == 1.0 else f"{path} (CFG {w:g})", "steps": len(pipe.config.denoising_timesteps),
                         **benchmark_video_pipeline(pipe, ref, num_videos=args.num_videos, seed=args.seed,
                                                    guidance_scale=w, any_phase=args.any_phase)})
    print(markdown_rows(rows))


if __name__ == "__main__":
    main()
