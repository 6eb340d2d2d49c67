"""The Wan memory plan (docs/wan_memory.md) against meta-device counts, a real KV-cache allocation and peft."""

import os
import re

import torch

from diffusers_fastgen.memory_plan import (
    LORA_TARGETS,
    WAN_CONFIGS,
    kv_cache_bytes_per_frame,
    latent_layout,
    lora_parameter_count,
    meta_transformer,
    self_forcing_plan,
)
from diffusers_fastgen.models.causal_wan import CausalWan
from diffusers_fastgen.testing.tiny import tiny_wan_transformer
from diffusers_fastgen.training.lora import add_lora_adapters

DOC = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "wan_memory.md")


def _gib(n):
    return f"{n / 2**30:.2f} GiB"


def test_the_documented_plan_is_the_computed_one():
    text = open(DOC).read()
    for name, config in WAN_CONFIGS.items():
        plan = self_forcing_plan(config)
        model = meta_transformer(config)
        assert plan["parameters"] == sum(p.numel() for p in model.parameters())
        for value in (plan["parameters"], plan["lora_adapter_parameters"], plan["kv_cache_bytes_per_frame"]):
            assert f"{value:,}" in text, (name, value)
        for key in ("full_state_bytes", "lora_state_bytes", "kv_cache_bytes_per_block", "kv_cache_bytes_per_video"):
            assert _gib(plan[key]) in text, (name, key)
    assert [int(n.replace(",", "")) for n in re.findall(r"\*\*([\d,]+)\*\*", text)] == [1418996800, 14288491584]


def test_kv_cache_formula_matches_a_real_allocation():
    model = tiny_wan_transformer(num_layers=2)
    causal = CausalWan(model, 2)
    cache = causal.new_cache(1, 6, 8, 12, dtype=torch.bfloat16)  # 6 frames of 8x12 latents: 4x6 = 24 tokens
    allocated = sum(t.numel() * t.element_size() for t in vars(cache).values() if torch.is_tensor(t) and t.ndim > 1)
    config = dict(model.config)
    assert allocated == 6 * kv_cache_bytes_per_frame(config, 24, cache_bytes=2)
    causal.remove()


def test_lora_count_matches_peft():
    model = tiny_wan_transformer(num_layers=2)
    before = sum(p.numel() for p in model.parameters())
    add_lora_adapters(model, ["student"], rank=4, target_modules=LORA_TARGETS)
    assert sum(p.numel() for p in model.parameters()) - before == lora_parameter_count(tiny_wan_transformer(num_layers=2), 4)


def test_latent_layout_of_480p_81_frames():
    assert latent_layout(480, 832, 81) == (21, 1560)
