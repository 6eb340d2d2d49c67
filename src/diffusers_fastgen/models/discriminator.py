"""Small discriminator heads on a denoiser's intermediate features (DMD2's GAN branch, LADD)."""

from __future__ import annotations

from torch import nn


class ConvHead(nn.Module):
    """(B, C, H, W) UNet features -> (B, 1) logits: GroupNorm, SiLU, 3x3 conv, SiLU, global mean, linear."""

    def __init__(self, channels: int, hidden: int = 64, groups: int = 8):
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(min(groups, channels), channels), nn.SiLU(),
            nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, hidden)
            nn.Linear(hidden, 1),
        )

    def forward(self, features):
        # Attention blocks hand back channels-last strided features; GroupNorm's CPU backward on such an
        # input that does not itself require grad segfaults (torch 2.13), so make them contiguous.
        return self.net(features.contiguous())


def conv_head(channels: int, hidden: int = 64, groups: int = 8) -> nn.Module:
    """(B, C, H, W) UNet features -> (B, 1) logits."""
    return ConvHead(channels, hidden, groups)


class TokenHead(nn.Module):
    """(B, L, D) transformer tokens -> (B, 1) logits: per-token MLP, then mean over tokens."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens):
        return self.mlp(tokens).mean(dim=1)  # (B, L, 1) -> (B, 1)


def head_for_features(features) -> nn.Module:
    """A conv head for (B, C, H, W) features, a token head for (B, L, D) ones."""
    if features.ndim == 4:
        return conv_head(features.shape[1])
    if features.ndim == 3:
        return TokenHead(features.shape[-1])
    raise ValueError(f"features must be (B, C, H, W) or (B, L, D), got shape {tuple(features.shape)}.")


class FeatureHeads(nn.Module):
    """One head per tapped block (LADD's multi-level discriminator): a list of features -> a list of
    (B, 1) logits. One module, so DDP/FSDP wrap and sync all heads together."""

    def __init__(self, heads):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, features):
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature tensors, got {len(features)}.")
        # Features of a frozen bf16 / fp16 teacher (--weight_dtype) meet heads trained in fp32: cast (differentiably).
        dtype = next(self.parameters()).dtype
        return [head(f.to(dtype)) for head, f in zip(self.heads, features)]
