"""Long streams: a causal moving-digits student generating 1x, 2x, 4x its training length with a rolling
attention window, streamed block by block.

    python benchmarks/long_stream.py --model outputs/self_forcing --multiples 1 2 4 --local_attn_size 8

Each length runs in a fresh process (its peak RSS is the process's own). The pipeline is the saved folder
with the window fields overridden (`--local_attn_size`, `--sink_size`, `--sinks_in_window`); every finished
block is scored and dropped as it arrives, so only the KV cache (bounded by the window) and one block stay
in memory. Per 8-frame window: per-frame accuracy, FD, motion error and flicker (`score_windows`, the path
fit free to start at any bounce phase), and the motion error of the 8-frame windows starting at every block;
per length: median seconds per block, KV-cache size, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from diffusers_fastgen.evaluation.moving_digits import (
    CANVAS,
    NUM_FRAMES,
    MovingDigitsReference,
    moving_digits_cond,
    sample_motion,
    score_windows,
)
from diffusers_fastgen.models.causal_wan import KVCache
from diffusers_fastgen.pipelines import CausalWanPipeline


def run_length(args) -> dict:
    """One length in this process: per-window scores, seconds per block, KV-cache bytes, peak RSS."""
    torch.set_num_threads(1)
    overrides = {"local_attn_size": args.local_attn_size, "sink_size": args.sink_size,
                 "sinks_in_window": args.sinks_in_window}
    pipe = CausalWanPipeline.from_pretrained(args.model, **overrides)
    pipe.set_progress_bar_config(disable=True)
    frames = NUM_FRAMES * args.multiple
    g = torch.Generator().manual_seed(args.seed)
    labels = torch.arange(args.num_videos) % 10
    _, v = sample_motion(args.num_videos, g)
    cache_bytes = []
    real_new_cache = KVCache.__init__

    def counting_init(self, *a, **kw):  # record the size of every cache the pipeline allocates
        real_new_cache(self, *a, **kw)
        cache_bytes.append(self.k.numel() * self.k.element_size() * 2)

    KVCache.__init__ = counting_init
    windows, block_seconds, pending = [], [], []  # windows: batch-major, args.multiple per batch
    try:
        for start in range(0, args.num_videos, args.batch_size):
            sl = slice(start, start + args.batch_size)
            tick = time.perf_counter()
            for block in pipe.stream(prompt_embeds=moving_digits_cond(labels[sl], v[sl]), num_frames=frames,
                                     height=CANVAS, width=CANVAS, generator=g):
                block_seconds.append(time.perf_counter() - tick)
                pending.append(block)
                if sum(b.shape[2] for b in pending) == NUM_FRAMES:  # a full window: only its frames are kept
                    windows.append(torch.cat(pending, 2))
                    pending = []
                tick = time.perf_counter()
    finally:
        KVCache.__init__ = real_new_cache
    ref = MovingDigitsReference()
    per_window = [score_windows(ref, torch.cat(windows[w::args.multiple]), labels, v)[0] for w in range(args.multiple)]
    videos = torch.cat([torch.cat(windows[i:i + args.multiple], 2) for i in range(0, len(windows), args.multiple)])
    stride = pipe.layout[-1]  # 8-frame windows starting at every block: where in the stream the motion breaks
    sliding = {s: ref.score(videos[:, :, s:s + NUM_FRAMES], labels, v, any_phase=True)["motion_error"]
               for s in range(0, frames - NUM_FRAMES + 1, stride)}
    return {"multiple": args.multiple, "frames": frames, "windows": per_window, "sliding_motion_error": sliding,
            "median_block_s": statistics.median(block_seconds), "kv_cache_mb": max(cache_bytes) / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a CausalWanPipeline folder of a moving-digits student")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--local_attn_size", type=int, default=8, help="window in latent frames (-1 = global)")
    parser.add_argument("--sink_size", type=int, default=0)
    parser.add_argument("--sinks_in_window", action="store_true")
    parser.add_argument("--num_videos", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--multiple", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.multiple is not None:
        print(json.dumps(run_length(args)))
        return
    rows = []
    for m in args.multiples:
        cmd = [sys.executable, __file__, "--model", args.model, "--multiple", str(m), "--local_attn_size",
               str(args.local_attn_size), "--sink_size", str(args.sink_size), "--num_videos", str(args.num_videos),
               "--batch_size", str(args.batch_size), "--seed", str(args.seed)] + (
                   ["--sinks_in_window"] if args.sinks_in_window else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
    print(f"window {args.local_attn_size} frames, sinks {args.sink_size} "
          f"({'inside' if args.sinks_in_window else 'outside'} the window); {args.num_videos} videos per length")
    print("| length | frames | window | accuracy | FD | motion error (px) | flicker |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for w, s in enumerate(row["windows"]):
            print(f"| {row['multiple']}x | {row['frames']} | {w * NUM_FRAMES}-{(w + 1) * NUM_FRAMES - 1} | "
                  f"{s['accuracy']:.3f} | {s['fd']:.2f} | {s['motion_error']:.3f} | {s['flicker']:.3f} |")
    print()
    for row in rows:
        print(f"{row['multiple']}x, motion error of the 8-frame window starting at frame: " +
              ", ".join(f"{s}: {e:.2f}" for s, e in row["sliding_motion_error"].items()))
    print()
    print("| length | median s / block | KV cache MB | peak RSS MB | last window vs first: accuracy, motion error |")
    print("|---|---|---|---|---|")
    for row in rows:
        first, last = row["windows"][0], row["windows"][-1]
        print(f"| {row['multiple']}x | {row['median_block_s']:.4f} | {row['kv_cache_mb']:.3f} | {row['peak_rss_mb']:.0f} | "
              f"{last['accuracy'] / first['accuracy'] - 1:+.1%}, {last['motion_error'] / first['motion_error'] - 1:+.1%} |")


if __name__ == "__main__":
    main()
