"""Memory of DMD2 on an SDXL-architecture UNet (random weights built from config; nothing downloaded):
peak RSS of one process that builds the players with the frozen base in `--weight_dtype`, runs one
fake-score update and one student update (AdamW, so its state exists), for LoRA and full modes.

    python benchmarks/sdxl_dmd2_memory.py --width 1.0 --skip_full        # the real SDXL UNet, LoRA only
    python benchmarks/sdxl_dmd2_memory.py --width 0.25                   # LoRA vs full on a narrower SDXL

--width scales SDXL's block_out_channels (320, 640, 1280) and its head counts (5, 10, 20) together, so
the head dimension stays 64; 1.0 is the real SDXL UNet (2.57 B parameters), whose full DMD2 (two fp32
trained copies with AdamW state beside the teacher) needs about 90 GB and does not fit this 24 GB machine.
Each mode runs in its own subprocess so its peak RSS is its own. Text embeddings are random tensors of
the real shapes (77 x 2048 tokens, 1280-d pooled): the text encoders are released before training (the
embedding cache), so they are not part of the training state.
"""

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, sys, time, torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers_fastgen.parametrization import vp_from_betas
from diffusers_fastgen.training import OptimizerArgs, make_optimizer, peak_rss_mb, training_state_mb
from diffusers_fastgen.training.distribution_matching_steps import build_players, fake_score_step, player_denoisers, student_step

width, lora_rank, latent, dtype = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
torch.manual_seed(0)
torch.set_num_threads(2)
channels = [int(round(c * width / 64)) * 64 for c in (320, 640, 1280)]
config = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 2, 10), attention_head_dim=[c // 64 for c in channels],
              cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
              addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32)
with init_empty_weights():
    unet = UNet2DConditionModel(**config)
unet = unet.to(dtype).to_empty(device="cpu")  # random weights straight in the frozen dtype (no fp32 copy)
with torch.no_grad():
    for p in unet.parameters():
        p.normal_(0, 0.02)
base_params = sum(p.numel() for p in unet.parameters())
modules, params = build_players(unet, lora_rank=lora_rank)
nets = player_denoisers(modules, vp_from_betas(), "epsilon")
opts = {n: make_optimizer(params[n], OptimizerArgs(learning_rate=1e-5))[0] for n in ("student", "fake_score")}
b = 1
cond = {"encoder_hidden_states": torch.randn(b, 77, 2048), "added_cond_kwargs": {
    "text_embeds": torch.randn(b, 1280), "time_ids": torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]])}}
uncond = {"encoder_hidden_states": torch.zeros(b, 77, 2048), "added_cond_kwargs": {
    "text_embeds": torch.zeros(b, 1280), "time_ids": cond["added_cond_kwargs"]["time_ids"]}}
x, t = torch.randn(b, 4, latent, latent), torch.ones(b)
start = time.perf_counter()
loss = fake_score_step(nets["student"], nets["fake_score"], x, t, cond)
loss.backward(); opts["fake_score"].step(); opts["fake_score"].zero_grad()
loss = student_step(nets["student"], nets["teacher"], nets["fake_score"], x, t, cond, uncond, guidance_scale=5.0,
                    t_min=0.02, t_max=0.98)
loss.backward(); opts["student"].step(); opts["student"].zero_grad()
print(json.dumps({"base_params": base_params, "trainable": {n: sum(p.numel() for p in ps) for n, ps in params.items()},
                  "lora_dtype": str(params["student"][0].dtype),
                  "state_mb": training_state_mb(modules.values(), list(opts.values())),
                  "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - start}))
"""


def run(width, lora_rank, latent, dtype):
    out = subprocess.run([sys.executable, "-c", WORKER, str(width), str(lora_rank), str(latent), dtype],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px, 128 = 1024 px)")
    parser.add_argument("--weight_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--skip_full", action="store_true", help="LoRA mode only (full SDXL does not fit 24 GB)")
    args = parser.parse_args()
    rows = {"lora": run(args.width, args.lora_rank, args.latent, args.weight_dtype)}
    if not args.skip_full:
        rows["full"] = run(args.width, 0, args.latent, args.weight_dtype)
    print(f"SDXL UNet width {args.width}: {rows['lora']['base_params'] / 1e6:.0f} M parameters, frozen base "
          f"{args.weight_dtype}, latents {args.latent}x{args.latent}, batch 1, LoRA rank {args.lora_rank}")
    print("| mode | trainable (student + fake) | weights + grads + AdamW MB | peak RSS MB | s for 2 updates |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        trainable = sum(r["trainable"].values())
        print(f"| {mode} | {trainable / 1e6:.1f} M | {r['state_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |")
    if "full" in rows:
        print(f"LoRA / full peak RSS: {rows['lora']['peak_rss_mb'] / rows['full']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
