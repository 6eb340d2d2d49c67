"""Memory plan for causal-video distillation on real Wan sizes, from configs on the meta device (no weights).

`self_forcing_plan(config)` returns the parameter count read off a meta-device `WanTransformer3DModel`, the
training state of Self-Forcing / CausVid (three Wan players: the student and the fake score trained, the
teacher frozen) in full and LoRA modes, and the KV cache of the causal student per latent frame, per block
and per video. docs/wan_memory.md shows the arithmetic for Wan2.1-T2V-1.3B and 14B; tests check it against
the meta-device counts, a real cache allocation and peft's own adapter counts.

Counted: weights, gradients and AdamW's two moments (fp32 for trained tensors: 4 + 4 + 8 = 16 bytes per
parameter), frozen weights in `frozen_bytes` (2: bf16), and the KV cache in `cache_bytes`. Not counted:
activations (they depend on the rollout length, gradient checkpointing and batch size), the text encoder
(released after the prompts are embedded) and the VAE.
"""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
               freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
WAN_CONFIGS = {  # the released Wan2.1 text-to-video transformers (Wan-AI/Wan2.1-T2V-*-Diffusers)
    "Wan2.1-T2V-1.3B": dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan2.1-T2V-14B": dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
# LoRA targets in every block: self- and cross-attention projections and both feed-forward layers.
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2")
TRAINED_BYTES = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq


def meta_transformer(config: dict) -> WanTransformer3DModel:
    """The transformer built from `config` on the meta device (shapes only, no memory)."""
    with init_empty_weights():
        return WanTransformer3DModel(**config)


def lora_parameter_count(model, rank: int, targets=LORA_TARGETS) -> int:
    """Parameters of one rank-`rank` LoRA adapter on every block Linear whose name ends with a target:
    rank * (in_features + out_features) each (A: rank x in, B: out x rank)."""
    total = 0
    for name, module in model.named_modules():
        if name.startswith("blocks.") and isinstance(module, torch.nn.Linear) and name.endswith(tuple(targets)):
            total += rank * (module.in_features + module.out_features)
    return total


def latent_layout(height: int, width: int, num_frames: int, *, spatial: int = 8, temporal: int = 4,
                  patch: tuple[int, int] = (2, 2)) -> tuple[int, int]:
    """(latent frames, tokens per latent frame) of a video: Wan's VAE keeps frame 0 and compresses the rest
    `temporal`-fold, and divides height/width by `spatial`; the transformer then patches 2x2."""
    if (num_frames - 1) % temporal or height % (spatial * patch[0]) or width % (spatial * patch[1]):
        raise ValueError(f"{num_frames} frames of {height}x{width} do not fit the VAE factors ({temporal}, {spatial}) "
                         f"and patch {patch}.")
    return (num_frames - 1) // temporal + 1, (height // spatial // patch[0]) * (width // spatial // patch[1])


def kv_cache_bytes_per_frame(config: dict, tokens_per_frame: int, *, cache_bytes: int = 2, batch_size: int = 1) -> int:
    """Keys and values of one latent frame in every layer: 2 x layers x tokens x heads x head_dim x bytes."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return 2 * config["num_layers"] * tokens_per_frame * dim * cache_bytes * batch_size


def self_forcing_plan(config: dict, *, lora_rank: int = 64, frozen_bytes: int = 2, cache_bytes: int = 2,
                      height: int = 480, width: int = 832, num_frames: int = 81, frames_per_block: int = 3) -> dict:
    model = meta_transformer(config)
    params = sum(p.numel() for p in model.parameters())
    adapter = lora_parameter_count(model, lora_rank)
    frames, tokens = latent_layout(height, width, num_frames)
    per_frame = kv_cache_bytes_per_frame(config, tokens, cache_bytes=cache_bytes)
    return {
        "parameters": params,
        # full: student and fake score trained (16 B/param each), teacher frozen (frozen_bytes/param)
        "full_state_bytes": params * (2 * TRAINED_BYTES + frozen_bytes),
        # LoRA: one frozen base serves all three players; two adapters (student, fake score) are trained
        "lora_adapter_parameters": adapter,
        "lora_state_bytes": params * frozen_bytes + 2 * adapter * TRAINED_BYTES,
        "latent_frames": frames,
        "tokens_per_frame": tokens,
        "kv_cache_bytes_per_frame": per_frame,
        "kv_cache_bytes_per_block": per_frame * frames_per_block,
        "kv_cache_bytes_per_video": per_frame * frames,
    }
