"""Exponential moving average of a model's weights with fp32 shadows.

Three schedules for the decay beta at optimizer step n (batch size B images per step):
    constant:  beta = decay
    halflife:  beta = 0.5 ** (B / (halflife_kimg * 1000))            (EDM, arXiv:2206.00364)
    power:     beta = (1 - 1/n) ** (gamma + 1)                       (EDM2, arXiv:2312.02696 eq. 3)
Before `start_iter` the shadow copies the weights (beta = 0).
"""

from __future__ import annotations

import torch

from .models.denoiser import unwrap_model

EMA_SCHEDULES = ("constant", "halflife", "power")


def ema_decay(step: int, *, schedule: str, decay: float = 0.999, halflife_kimg: float = 0.5, batch_size: int = 1,
              gamma: float = 6.94, start_iter: int = 0) -> float:
    """beta for the update after optimizer step `step` (1-based)."""
    if schedule not in EMA_SCHEDULES:
        raise ValueError(f"`schedule` must be one of {EMA_SCHEDULES}, got {schedule!r}.")
    if step <= start_iter:
        return 0.0
    if schedule == "constant":
        return decay
    if schedule == "halflife":
        return 0.5 ** (batch_size / (halflife_kimg * 1000.0))
    n = step - start_iter
    return (1.0 - 1.0 / n) ** (gamma + 1.0) if n > 1 else 0.0


class EMA:
    """fp32 shadow of `model`'s trainable parameters (or of the `parameters` named)."""

    def __init__(self, model: torch.nn.Module, *, schedule: str = "constant", decay: float = 0.999,
                 halflife_kimg: float = 0.5, batch_size: int = 1, gamma: float = 6.94, start_iter: int = 0,
                 parameters: list[str] | None = None):
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"`schedule` must be one of {EMA_SCHEDULES}, got {schedule!r}.")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`decay` must be in [0, 1), got {decay}.")
        self.kwargs = dict(schedule=schedule, decay=decay, halflife_kimg=halflife_kimg, batch_size=batch_size,
                           gamma=gamma, start_iter=start_iter)
        model = unwrap_model(model)  # names without DDP's "module." prefix, so copy_to works on the bare model
        # Which parameters to average: the named ones, or every trainable one.
        keep = set(parameters) if parameters is not None else None
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()
                       if (p.requires_grad if keep is None else n in keep)}
        self.step = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> float:
        """One EMA update after an optimizer step; returns the beta used."""
        self.step += 1
        beta = ema_decay(self.step, **self.kwargs)
        names, shadows, params = [], [], []
        for name, p in unwrap_model(model).named_parameters():
            if name in self.shadow:
                names.append(name)
                shadows.append(self.shadow[name])
                params.append(p.detach().float())
        torch._foreach_lerp_(shadows, params, 1.0 - beta)
        return beta

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, p in unwrap_model(model).named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict:
        return {"step": self.step, "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state is missing parameters: {sorted(missing)[:5]}...")
        self.step = int(state["step"])
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])
