"""Feature taps: read an intermediate block's output of any adapter-wrapped model with a forward hook,
optionally stopping the forward right there (the rest of the network is not run)."""

from __future__ import annotations

import contextlib

import torch

from .denoiser import unwrap_model


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def tap_features(model, module_name: str, *, stop: bool = False):
    """Within the block, every forward of `model` stores `module_name`'s output in the yielded list;
    with stop=True the forward is cut right after that module (call it through `run_until_tap`)."""
    inner = unwrap_model(model)
    try:
        module = inner.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"`module_name` {module_name!r} is not a submodule of {type(inner).__name__}.") from None
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        if stop:
            raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def run_until_tap(denoiser, x_t, t, cond, module_name: str) -> torch.Tensor:
    """Features of `module_name` at (x_t, t, cond); the layers after it are never evaluated."""
    with tap_features(denoiser.model, module_name, stop=True) as captured:
        try:
            denoiser(x_t, t, cond)
        except _StopForward:
            pass
    if not captured:
        raise RuntimeError(f"module {module_name!r} was not reached in the forward pass.")
    return captured[0]
