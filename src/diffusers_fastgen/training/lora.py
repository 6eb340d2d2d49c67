"""LoRA distillation on one frozen base: several peft adapters (student, fake_score) share the base,
and the teacher is the base with adapters disabled."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from ..models.adapters import BASE, activate_adapter, active_adapter, use_adapter  # noqa: F401 (re-exported)
from ..models.unwrap import unwrap_model

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "time_emb_proj")


def add_lora_adapters(model, names, *, rank: int, alpha: float | None = None, target_modules=DEFAULT_TARGETS):
    """Freeze `model` and add one LoRA adapter per name (B initialised to 0: every adapter starts as the base)."""
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}.")
    model.requires_grad_(False)
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} | {n for n, _ in model.named_modules()}
    targets = [t for t in target_modules if any(m.endswith(t) for m in present)]
    if not targets:
        raise ValueError(f"none of `target_modules` {list(target_modules)} exist in {type(model).__name__}.")
    for name in names:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True),
                          adapter_name=name)
    for p in adapter_parameters(model, names):
        p.requires_grad_(True)
    return model


def adapter_parameters(model, names) -> list[torch.nn.Parameter]:
    names = [names] if isinstance(names, str) else list(names)
    return [p for n, p in model.named_parameters() if "lora_" in n and any(f".{a}." in n or n.endswith(f".{a}") for a in names)]




def merged_copy(model, adapter: str, ema=None):
    """A plain copy of `model` (no peft layers, fp32) whose weights are the base with `adapter` merged in; `ema`
    (over the adapter's parameters) is copied in first. The model itself is not changed."""
    work = copy.deepcopy(unwrap_model(model)).float()
    if ema is not None:
        ema.copy_to(work)
    activate_adapter(work, adapter)
    for module in work.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapter])
    state = {k.replace(".base_layer", ""): v for k, v in work.state_dict().items() if "lora_" not in k}
    plain = type(work).from_config(work.config)
    plain.load_state_dict(state)
    return plain
