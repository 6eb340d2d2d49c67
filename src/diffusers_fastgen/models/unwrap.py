"""The diffusers model inside the wrappers that training and sampling put around it."""

from __future__ import annotations

import torch


def unwrap_model(model):
    """The diffusers model inside DDP / FSDP (`.module`), torch.compile (`._orig_mod`) and our own
    non-module wrappers that hold it as `.model` (models.causal_wan.CausalWan, models.Denoiser)."""
    while True:
        if not isinstance(model, torch.nn.Module) and isinstance(getattr(model, "model", None), torch.nn.Module):
            model = model.model
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
