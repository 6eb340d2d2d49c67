"""Jacobian-vector products of a network, exact (forward-mode AD) or by finite differences.

Used by sCM (d f / dt along the PF-ODE) and MeanFlow (du/dt = v . d_z u + d_t u).

Seen on CPU with torch 2.13 / diffusers 0.42: the fused SDPA kernels have no forward-mode AD
formula, so exact JVPs run under the math attention backend (both diffusers' dispatcher and plain
F.scaled_dot_product_attention are switched), and GroupNorm's forward-AD rule needs contiguous
inputs, so primals and tangents are made contiguous.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

JVP_METHODS = ("exact", "finite_difference")


@contextlib.contextmanager
def math_attention():
    """Route every attention call through the math kernel (forward-mode AD capable)."""
    from diffusers.models.attention_dispatch import attention_backend

    with sdpa_kernel(SDPBackend.MATH), attention_backend("_native_math"):
        yield


def _contiguous(xs):
    return tuple(x.contiguous() if torch.is_tensor(x) else x for x in xs)


def jvp(fn, primals: tuple, tangents: tuple, *, method: str = "exact", eps: float = 1e-3):
    """Return (fn(*primals), J_fn(primals) . tangents).

    method="exact": torch.func.jvp under `math_attention()`; gradients flow to the parameters
      through the primal output (the tangent output is what losses stop-grad anyway).
    method="finite_difference": central difference (fn(p + eps v) - fn(p - eps v)) / (2 eps), in the
      input dtype, plus one extra forward for the primal: 3 forwards, no forward-mode AD needed.
    """
    if method not in JVP_METHODS:
        raise ValueError(f"`method` must be one of {JVP_METHODS}, got {method!r}.")
    if len(primals) != len(tangents):
        raise ValueError(f"`primals` and `tangents` must have the same length, got {len(primals)} and {len(tangents)}.")
    primals, tangents = _contiguous(primals), _contiguous(tangents)
    if method == "exact":
        with math_attention():
            return torch.func.jvp(fn, primals, tangents)
    out = fn(*primals)
    with torch.no_grad():
        plus = fn(*(p + eps * v for p, v in zip(primals, tangents)))
        minus = fn(*(p - eps * v for p, v in zip(primals, tangents)))
    return out, (plus - minus) / (2 * eps)
