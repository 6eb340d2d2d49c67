"""Jacobian-vector products of a network, exact (forward-mode AD) or by finite differences.

Used by sCM (d f / dt along the PF-ODE) and MeanFlow (du/dt = v . d_z u + d_t u).

Seen on CPU with torch 2.13 / diffusers 0.42: the fused SDPA kernels have no forward-mode AD
formula, so exact JVPs run under the math attention backend (both diffusers' dispatcher and plain
F.scaled_dot_product_attention are switched), and GroupNorm's forward-AD rule needs contiguous
inputs (see `forward_ad_compatible`).

Finite differences in t need care: sinusoidal timestep embeddings have frequencies up to one radian
per native timestep unit (1/1000 of RF time), so eps must be far below 1e-3. Measured on the tiny
Wan / UNet2D of tests/test_jvp_guidance.py, float32, (x, t) tangent, relative error vs exact:
eps=1e-3: 0.11 / 0.18;  1e-4: 1.1e-3 / 2.1e-3;  3e-5: 2.4e-4 / 5.0e-4;  1e-5: 1.1e-3 / 2.3e-3
(rounding takes over below 3e-5), hence the default eps=3e-5.
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from diffusers.models.attention_dispatch import attention_backend
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

JVP_METHODS = ("exact", "finite_difference")


class _ContiguousGroupNorm(TorchFunctionMode):
    """Hands group_norm contiguous inputs: UNet attention blocks pass it transposed views, which its
    forward-AD rule cannot `view` (seen with torch 2.13 on UNet2DModel). A torch-function mode applies to
    the current thread inside its `with` block only; nothing global is patched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.group_norm:
            args = (args[0].contiguous(), *args[1:])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forward_ad_compatible():
    """Make diffusers models forward-mode differentiable on CPU, for the duration of the block (this
    thread only): every attention call goes through the math kernel (diffusers' dispatcher and plain
    SDPA), and group_norm receives contiguous inputs."""
    with sdpa_kernel(SDPBackend.MATH), attention_backend("_native_math"), _ContiguousGroupNorm():
        yield


def _contiguous(xs):
    return tuple(x.contiguous() if torch.is_tensor(x) else x for x in xs)


def jvp(fn, primals: tuple, tangents: tuple, *, method: str = "exact", eps: float = 3e-5):
    """Return (fn(*primals), J_fn(primals) . tangents).

    method="exact": forward-mode AD (dual tensors) under `forward_ad_compatible()`; gradients flow to the
      parameters through the primal output (the tangent output is what losses stop-grad anyway).
    method="finite_difference": central difference (fn(p + eps v) - fn(p - eps v)) / (2 eps), in the
      input dtype, plus one extra forward for the primal: 3 forwards, no forward-mode AD needed.
    """
    if method not in JVP_METHODS:
        raise ValueError(f"`method` must be one of {JVP_METHODS}, got {method!r}.")
    if len(primals) != len(tangents):
        raise ValueError(f"`primals` and `tangents` must have the same length, got {len(primals)} and {len(tangents)}.")
    primals, tangents = _contiguous(primals), _contiguous(tangents)
    if method == "exact":
        # Dual tensors (torch.autograd.forward_ad) rather than torch.func.jvp: the same forward-mode rules
        # and cost, but the call runs on ordinary tensors, so a DDP-wrapped model works (its forward
        # rejects functorch's wrapped tensors) and the primal output keeps its autograd graph.
        with forward_ad_compatible(), fwAD.dual_level():
            duals = [fwAD.make_dual(p, v.to(p.dtype)) if torch.is_tensor(p) and p.is_floating_point() else p
                     for p, v in zip(primals, tangents)]
            out, tangent = fwAD.unpack_dual(fn(*duals))
        if tangent is None:  # the output does not depend on the primals
            tangent = torch.zeros_like(out)
        return out, tangent
    out = fn(*primals)
    with torch.no_grad():
        plus = fn(*(p + eps * v for p, v in zip(primals, tangents)))
        minus = fn(*(p - eps * v for p, v in zip(primals, tangents)))
    return out, (plus - minus) / (2 * eps)
