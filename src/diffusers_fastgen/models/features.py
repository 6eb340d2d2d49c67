"""Feature taps: read intermediate blocks' outputs of any adapter-wrapped model with forward hooks.

Three ways to read them, by what the caller needs to differentiate:
- `tap_features`: a normal forward that also records the tapped outputs (e.g. the fake score's
  denoising forward, whose features also feed a discriminator head);
- `run_until_tap`: the forward is cut after the last tapped block (the rest of the net never runs);
- `forward_with_tap_grad`: one full forward whose autograd graph stops at the last tap: the blocks
  after it run without recording, so the network output comes for the price of a no-grad forward while
  the features stay differentiable (DMD2's GAN generator term: the fake score's x0 and its features
  of the same noisy sample, in one pass).
`frozen` turns parameters' gradients off for a block, so a backward through a critic computes input
gradients only (no weight gradients that would be thrown away).
"""

from __future__ import annotations

import contextlib

import torch

from .denoiser import unwrap_model


class _StopForward(Exception):
    pass


def _names(module_names) -> list[str]:
    names = [module_names] if isinstance(module_names, str) else list(module_names)
    if not names:
        raise ValueError("`module_name` must name at least one submodule.")
    return names


@contextlib.contextmanager
def tap_features(model, module_name, *, stop: bool = False, no_grad_after: bool = False):
    """Within the block, a forward of `model` stores the outputs of `module_name` (one name or a list) in
    the yielded list, in the order given. stop=True cuts the forward after the last of them has run
    (call it through `run_until_tap`); no_grad_after=True runs the rest without autograd recording
    (the grad mode is restored when the block exits, whatever happened inside it)."""
    inner = unwrap_model(model)
    names = _names(module_name)
    modules = []
    for name in names:
        try:
            modules.append(inner.get_submodule(name))
        except AttributeError:
            raise ValueError(f"`module_name` {name!r} is not a submodule of {type(inner).__name__}.") from None
    captured: list[torch.Tensor | None] = [None] * len(names)
    slots = {}
    for i, module in enumerate(modules):
        slots.setdefault(id(module), []).append(i)

    def hook(module, _inputs, output):
        for i in slots[id(module)]:
            captured[i] = _image_features(output)
        if all(c is not None for c in captured):
            if stop:
                raise _StopForward
            if no_grad_after:
                torch.set_grad_enabled(False)

    handles = [m.register_forward_hook(hook) for m in {id(m): m for m in modules}.values()]
    grad_mode = torch.is_grad_enabled()
    try:
        yield captured
    finally:
        torch.set_grad_enabled(grad_mode)
        for handle in handles:
            handle.remove()


def _image_features(output):
    """A block's output, or for tuple outputs the last tensor in it: the image stream of joint text-image
    blocks (SD3 / Flux return (text, image); SD3's last block returns (None, image)), the hidden states of
    UNet down blocks (which return (hidden, skip tuple))."""
    if not isinstance(output, tuple):
        return output
    tensors = [o for o in output if torch.is_tensor(o)]
    return tensors[-1] if tensors else None


def _check_reached(captured, module_name) -> None:
    missing = [n for n, c in zip(_names(module_name), captured) if c is None]
    if missing:
        raise RuntimeError(f"module(s) {missing} were not reached in the forward pass.")


def run_until_tap(denoiser, x_t, t, cond, module_name):
    """Features of `module_name` (a tensor; a list for a list of names) at (x_t, t, cond); the layers
    after the last tapped one are never evaluated."""
    with tap_features(denoiser.model, module_name, stop=True) as captured:
        try:
            denoiser(x_t, t, cond)
        except _StopForward:
            pass
    _check_reached(captured, module_name)
    return captured[0] if isinstance(module_name, str) else list(captured)


def forward_with_tap_grad(denoiser, x_t, t, cond, module_name, *, target: str = "x0"):
    """(prediction, features) from one forward: the features of `module_name` carry the autograd graph
    back to the inputs (and to parameters that require grad); everything after the last tap runs
    without recording, so `prediction` has no graph."""
    with tap_features(denoiser.model, module_name, no_grad_after=True) as captured:
        prediction = denoiser(x_t, t, cond, target=target)
    _check_reached(captured, module_name)
    return prediction.detach(), captured[0] if isinstance(module_name, str) else list(captured)


@contextlib.contextmanager
def without_gradient_checkpointing(model):
    """Run `model` without gradient checkpointing inside the block (restored on exit).

    Needed for a forward whose backward must see the module as it was during the forward: a
    checkpointed block is recomputed during backward, i.e. after `frozen` restored requires_grad
    (autograd then saves different tensors and torch raises a CheckpointError) or after another peft
    adapter was activated on a shared base (silently wrong gradients)."""
    inner = unwrap_model(model)
    active = bool(getattr(inner, "is_gradient_checkpointing", False))
    if active:
        inner.disable_gradient_checkpointing()
    try:
        yield
    finally:
        if active:
            inner.enable_gradient_checkpointing()


@contextlib.contextmanager
def frozen(params):
    """Temporarily set requires_grad=False on `params` (restored on exit)."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
