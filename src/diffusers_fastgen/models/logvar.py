"""Learned log-variance u(t) for adaptive loss weighting (EDM2, Karras et al. arXiv:2312.02696 Sec. 5;
sCM arXiv:2410.11081 Sec. 4.2): the loss becomes  loss(t) e^(-u(t)) + u(t), whose minimiser over u is
log E[loss | t], so every noise level contributes with unit expected weight.

A training-only module kept beside the student (it is not part of the exported pipeline, so the
student's diffusers weights are untouched): Fourier features of the time, then a linear layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LogVarHead(nn.Module):
    """t (B,) -> log-variance (B,). Features cos/sin(2 pi (f t + phase)) with fixed random frequencies
    (EDM2's MPFourier), then Linear(num_features -> 1) initialised to zero (u = 0: unit weight)."""

    def __init__(self, num_features: int = 128, scale: float = 1.0, seed: int = 0):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"`num_features` must be >= 1, got {num_features}.")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", scale * torch.randn(num_features, generator=g))
        self.register_buffer("phases", torch.rand(num_features, generator=g))
        self.linear = nn.Linear(num_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = math.sqrt(2) * torch.cos(2 * math.pi * (t.float()[:, None] * self.freqs + self.phases))  # (B, F)
        return self.linear(features).squeeze(-1)
