"""Classifier-free guidance (Ho & Salimans, arXiv:2207.12598)."""

from __future__ import annotations

import torch


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """uncond + w (cond - uncond). w = 1 returns cond; w = 0 returns uncond.

    Valid for any prediction that is affine in the score (x0, eps, v, flow) at a shared x_t and t.
    """
    return uncond + guidance_scale * (cond - uncond)


def guided_prediction(denoiser, x_t, t, cond, uncond, guidance_scale: float, **kwargs):
    """One batched call of `denoiser` on [cond; uncond] and the guided combination.

    `cond` / `uncond` are dicts of conditioning tensors batched along dim 0 (same keys). With
    guidance_scale == 1 only the conditional half is evaluated.
    """
    if guidance_scale == 1.0:
        return denoiser(x_t, t, cond, **kwargs)
    if set(cond) != set(uncond):
        raise ValueError(f"`cond` and `uncond` must have the same keys, got {sorted(cond)} and {sorted(uncond)}.")
    both = {k: _cat(cond[k], uncond[k]) for k in cond}
    t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim > 0 else t
    out_c, out_u = denoiser(torch.cat([x_t, x_t]), t2, both, **kwargs).chunk(2)
    return apply_cfg(out_c, out_u, guidance_scale)


def _cat(a, b):
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if a is None:
        return None
    raise TypeError(f"conditioning values must be tensors, dicts of tensors or None, got {type(a).__name__}.")
