"""KV-cache speed-up of block-causal rollouts on a tiny Wan.

An N-block rollout with a few-step schedule, two ways that give the same video:
  cached:    CausalWanPipeline: each forward runs only the current block against the KV cache, plus one
             forward per block to write it;
  recompute: no cache: every forward recomputes the whole prefix (finished blocks at the context
             timestep + the current block) under the block-causal mask.
Medians over interleaved rounds, one thread.

    python benchmarks/causal_kv_cache.py --blocks 8 --size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

from diffusers_fastgen.pipelines import CausalWanPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler, causal_scheduler


def recompute_rollout(causal, noise, text, steps, n, generator):
    sched = FlowMatchFewStepScheduler()
    b = noise.shape[0]
    done = []
    for start in range(0, noise.shape[2], n):
        sched.set_timesteps(timesteps=steps)
        x = noise[:, :, start:start + n]
        for timestep in sched.timesteps:
            seq = torch.cat(done + [x], 2)
            frame_t = torch.cat([torch.zeros(b, start), timestep.expand(b, n)], 1)
            x = sched.step(causal(seq, frame_t, text)[:, :, start:], timestep, x, generator=generator).prev_sample
        done.append(x)
    return torch.cat(done, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--frames_per_block", type=int, default=2)
    parser.add_argument("--size", type=int, default=32, help="latent height = width (32: 256 tokens per frame)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 750, 500, 250])
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=64, ffn_dim=128,
                                        num_layers=args.num_layers, cross_attn_norm=True, rope_max_seq_len=64).eval()
    pipe = CausalWanPipeline(transformer=transformer, scheduler=causal_scheduler(),
                             num_frames_per_block=args.frames_per_block, denoising_timesteps=args.steps)
    f, s = args.blocks * args.frames_per_block, args.size
    noise, text = torch.randn(1, 16, f, s, s), torch.randn(1, 8, 32)

    def cached():
        return pipe(prompt_embeds=text, latents=noise, height=s, width=s, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames

    def recompute():
        with torch.no_grad(), pipe.causal_transformer() as causal:
            return recompute_rollout(causal, noise, text, args.steps, args.frames_per_block,
                                     torch.Generator().manual_seed(0))

    err = (cached() - recompute()).abs().max().item()  # same video both ways (and a warm-up)
    times = {"cached": [], "recompute": []}
    for _ in range(args.rounds):
        for name, fn in (("cached", cached), ("recompute", recompute)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = s * s // 4
    print(f"tiny Wan: {args.num_layers} layers, dim 64, {args.blocks} blocks x {args.frames_per_block} frames x "
          f"{tokens} tokens, {len(args.steps)} steps per block; max |cached - recompute| = {err:.2e}")
    print("| rollout | median s | ratio |")
    print("|---|---|---|")
    print(f"| cached (KV cache) | {med['cached']:.3f} | 1.00 |")
    print(f"| recompute the prefix | {med['recompute']:.3f} | {med['recompute'] / med['cached']:.2f} |")


if __name__ == "__main__":
    main()
