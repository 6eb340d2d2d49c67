"""Memory of full vs LoRA DMD2 on an SD1.5-architecture UNet (random weights, built from config; no
download): peak RSS of one process that builds the players, runs one fake-score and one student
update (AdamW, so the optimizer state exists) and reports weights + grads + optimizer state.

    python benchmarks/dmd2_memory.py --width 0.5 --lora_rank 64

Each mode runs in its own subprocess so its peak RSS is its own. --width scales SD1.5's
block_out_channels (320, 640, 1280, 1280); 1.0 is the real SD1.5 UNet (860 M parameters), whose full
DMD2 (3 UNets, 2 trained with AdamW, fp32) needs about 31 GB and does not fit this 24 GB machine.
"""

import argparse
import json
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time, torch
from diffusers import UNet2DConditionModel
from diffusers_fastgen.parametrization import vp_from_betas
from diffusers_fastgen.training import OptimizerArgs, make_optimizer, peak_rss_mb, training_state_mb
from diffusers_fastgen.training.distribution_matching_steps import build_players, fake_score_step, player_denoisers, student_step

width, lora_rank, batch, res = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(2)
channels = [int(round(c * width / 32)) * 32 for c in (320, 640, 1280, 1280)]
unet = UNet2DConditionModel(sample_size=res, in_channels=4, out_channels=4, block_out_channels=channels,
                            layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
base_params = sum(p.numel() for p in unet.parameters())
modules, params = build_players(unet, lora_rank=lora_rank)
nets = player_denoisers(modules, vp_from_betas(), "epsilon")
opts = {n: make_optimizer(params[n], OptimizerArgs(learning_rate=1e-5))[0] for n in ("student", "fake_score")}
cond = {"encoder_hidden_states": torch.randn(batch, 77, 768)}
uncond = {"encoder_hidden_states": torch.zeros(batch, 77, 768)}
x, t = torch.randn(batch, 4, res, res), torch.ones(batch)
start = time.perf_counter()
fake_score_step(nets["student"], nets["fake_score"], x, t, cond).backward()
opts["fake_score"].step()
student_step(nets["student"], nets["teacher"], nets["fake_score"], x, t, cond, uncond, guidance_scale=2.0,
             t_min=0.02, t_max=0.98).backward()
opts["student"].step()
print(json.dumps({"base_params": base_params, "trainable": {n: sum(p.numel() for p in v) for n, v in params.items()},
                  "state_mb": training_state_mb(modules.values(), opts.values()), "peak_rss_mb": peak_rss_mb(),
                  "seconds": time.perf_counter() - start}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64, help="latent side (64 = 512 px for SD1.5)")
    parser.add_argument("--skip_full", action="store_true", help="LoRA mode only (full SD1.5 does not fit 24 GB)")
    args = parser.parse_args()
    rows = []
    for rank in ((args.lora_rank,) if args.skip_full else (0, args.lora_rank)):
        out = subprocess.run([sys.executable, "-c", WORKER, str(args.width), str(rank), str(args.batch_size),
                              str(args.resolution)], capture_output=True, text=True, check=True)
        rows.append((rank, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[-1][1]["base_params"]
    print(f"SD1.5-architecture UNet x{args.width}: {base / 1e6:.1f} M parameters; batch {args.batch_size}, "
          f"{args.resolution}x{args.resolution} latents, fp32, one fake-score + one student AdamW update\n")
    print("| mode | trainable (student / fake score) | weights + grads + AdamW state | peak RSS | time of the two updates |")
    print("|---|---|---|---|---|")
    for rank, r in rows:
        mode = "full DMD2 (3 UNets, 2 trained)" if rank == 0 else f"LoRA DMD2 r={rank} (1 base + 2 adapters)"
        tr = r["trainable"]
        print(f"| {mode} | {tr['student'] / 1e6:.1f} M / {tr['fake_score'] / 1e6:.1f} M | {r['state_mb'] / 1024:.2f} GB | "
              f"{r['peak_rss_mb'] / 1024:.2f} GB | {r['seconds']:.1f} s |")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"\n(total {time.time() - start:.0f} s)")
