"""Build the text-to-image digits teacher (`evaluation.text_digits`): a stock StableDiffusionPipeline.

    python benchmarks/build_text_digits_teacher.py --output_dir outputs/text_digits_build

1. trains an AutoencoderKL on the 16x16 training digits (reconstruction + a small KL), sets its
   scaling_factor to 1 / std of the latents, and reports the FD of its reconstructions of the held-out
   digits beside the real-data FD;
2. pretrains the text encoder the way SD's was: a tiny stock CLIPModel (text tower + a ViT on the 16x16
   digits) trained with its own contrastive loss on training digits paired with captions in the training
   phrasings, so prompts that name a class in new phrasings land near the class (`--clip_steps 0` keeps a
   seeded random text encoder, the first teacher's);
3. writes `init/`: a StableDiffusionPipeline of that VAE, the prompt-vocabulary CLIPTokenizer, that CLIP's
   text tower as a frozen CLIPTextModel, a fresh UNet2DConditionModel and an SD1.5-like DDIM scheduler
   (scaled-linear betas, eps prediction, trailing timesteps);
4. writes `images/`: an imagefolder (metadata.jsonl captions) of every training digit in every training
   phrasing;
5. trains the UNet with `examples/train_sft` on those images and captions (10 % empty prompts), through the
   scripts' text-to-image flags, into `teacher/`, and copies it (without checkpoints / samples) to
   `--ship_to` when given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

from diffusers_fastgen.evaluation.digits_benchmark import DigitsReference
from diffusers_fastgen.evaluation.digits_data import load_digits_arrays
from diffusers_fastgen.evaluation.text_digits import (
    MAX_TOKENS,
    RESOLUTION,
    TRAIN_PHRASINGS,
    build_clip_tokenizer,
    digit_prompt,
    to_digits,
    to_pixels,
    write_imagefolder,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_vae(steps: int, batch_size: int, kl_weight: float, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=RESOLUTION)
    x = to_pixels(torch.from_numpy(load_digits_arrays("train")[0]))
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (batch_size,), generator=g)]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = (recon - batch).square().mean() + kl_weight * dist.kl().mean() / batch[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"vae step {step}: loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    vae.eval()
    with torch.no_grad():
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


@torch.no_grad()
def vae_rows(vae: AutoencoderKL, reference: DigitsReference) -> list[dict]:
    held, labels = load_digits_arrays("held_out")
    recon = vae.decode(vae.encode(to_pixels(torch.from_numpy(held))).latent_dist.mean).sample.clamp(-1, 1)
    train, train_labels = load_digits_arrays("train")
    return [{"model": "real train digits vs held-out", **reference.score(torch.from_numpy(train), train_labels)},
            {"model": "VAE reconstructions of the held-out digits", **reference.score(to_digits(recon), labels)}]


def text_config(tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=32,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def pretrain_text_encoder(tokenizer, steps: int, batch_size: int, seed: int) -> CLIPTextModel:
    """The text tower of a tiny CLIPModel trained with CLIP's contrastive loss (`return_loss=True`) on training
    digits paired with a caption of their class in a random training phrasing."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=RESOLUTION, patch_size=4, num_channels=3, projection_dim=32)
    clip = CLIPModel(CLIPConfig(text_config=text_config(tokenizer).to_dict(), vision_config=vision.to_dict(),
                                projection_dim=32))
    images, labels = load_digits_arrays("train")
    pixels = to_pixels(torch.from_numpy(images))
    captions = [[digit_prompt(c, p) for p in TRAIN_PHRASINGS] for c in range(10)]
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(0, len(pixels), (batch_size,), generator=g)
        phrasing = torch.randint(0, len(TRAIN_PHRASINGS), (batch_size,), generator=g)
        text = [captions[int(labels[r])][int(k)] for r, k in zip(rows, phrasing)]
        ids = tokenizer(text, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        loss = clip(input_ids=ids.input_ids, pixel_values=pixels[rows], return_loss=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"clip step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return clip.text_model.eval()  # a CLIPTextModel


def build_init(vae: AutoencoderKL, folder: str, seed: int, clip_steps: int) -> None:
    tokenizer = build_clip_tokenizer()
    if clip_steps:
        text_encoder = pretrain_text_encoder(tokenizer, clip_steps, 128, seed)
        torch.manual_seed(seed)
    else:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer)).eval()
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/text_digits_build")
    parser.add_argument("--vae_steps", type=int, default=2000)
    parser.add_argument("--kl_weight", type=float, default=1e-3)
    parser.add_argument("--clip_steps", type=int, default=1000, help="contrastive pretraining steps of the text "
                        "encoder (0: a seeded random one)")
    parser.add_argument("--vae_from", default=None, help="a pipeline folder whose vae/ to reuse instead of training "
                        "one (e.g. the shipped teacher: its latents caches stay valid)")
    parser.add_argument("--sft_steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship_to", default=None, help="copy the trained teacher folder here")
    parser.add_argument("--images_only", action="store_true", help="only write <output_dir>/images (for the "
                        "scripts' --train_data_dir with the shipped teacher) and stop")
    args = parser.parse_args()
    for name in ("vae_steps", "clip_steps", "sft_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0, got {getattr(args, name)}.")
    torch.set_num_threads(1)
    out = args.output_dir
    init, images, teacher = (os.path.join(out, n) for n in ("init", "images", "teacher"))
    if args.images_only:
        print(f"{write_imagefolder(images)} training images with captions in {images}")
        return
    reference = DigitsReference()
    if not os.path.isfile(os.path.join(init, "model_index.json")):
        if args.vae_from:
            vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval()
        else:
            vae = train_vae(args.vae_steps, 64, args.kl_weight, args.seed)
        for row in vae_rows(vae, reference):
            print(row, flush=True)
        build_init(vae, init, args.seed, args.clip_steps)
    if not os.path.isfile(os.path.join(images, "metadata.jsonl")):
        print(f"{write_imagefolder(images)} training images with captions in {images}", flush=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", os.path.join(ROOT, "examples", "train_sft", "train_sft.py"),
           "--pretrained_model_name_or_path", init, "--train_data_dir", images, "--resolution", str(RESOLUTION),
           "--output_dir", teacher, "--max_train_steps", str(args.sft_steps), "--train_batch_size", "128",
           "--cond_dropout", "0.1", "--learning_rate", "1e-3", "--lr_warmup_steps", "200",
           "--validation_steps", "1000", "--checkpointing_steps", "1000", "--report_to", "none",
           "--resume_from_checkpoint", "latest"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if args.ship_to:
        if os.path.exists(args.ship_to):
            raise ValueError(f"`ship_to` {args.ship_to!r} exists; remove it first (nothing is overwritten).")
        shutil.copytree(teacher, args.ship_to, ignore=shutil.ignore_patterns(
            "checkpoints", "samples", "latents", "logs", "run_summary.json", "*.tmp"))
        print(f"shipped the teacher to {args.ship_to}")


if __name__ == "__main__":
    main()
