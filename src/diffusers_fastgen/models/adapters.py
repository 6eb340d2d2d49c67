"""Which of several peft adapters on one base model runs (LoRA distillation: student, fake_score, and the
frozen base as the teacher)."""

from __future__ import annotations

import contextlib

from peft.tuners.tuners_utils import BaseTunerLayer

BASE = "__base__"  # pseudo adapter name: run the frozen base (the teacher)


def active_adapter(model) -> str | None:
    """The adapter `model` runs now: its name, BASE when adapters are disabled, None without peft layers."""
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            if module.disable_adapters:
                return BASE
            names = module.active_adapters
            return names[0] if len(names) == 1 else tuple(names)
    return None


def activate_adapter(model, name: str) -> None:
    """Make `name` the active adapter (or BASE: adapters off) without changing requires_grad, so the set
    of trainable parameters DDP/FSDP registered stays fixed (peft's set_adapter would toggle it)."""
    if active_adapter(model) == name:
        return
    flags = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    if name == BASE:
        model.disable_adapters()
    else:
        model.enable_adapters()
        model.set_adapter(name)
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])


@contextlib.contextmanager
def use_adapter(model, name: str | None):
    """Run `name` (or BASE) inside the block and put back the adapter that was active before, also on an
    error. name=None: leave the model as it is."""
    previous = active_adapter(model) if name is not None else None
    if name is None or previous is None or previous == name:
        if name is not None:
            activate_adapter(model, name)
        yield
        return
    activate_adapter(model, name)
    try:
        yield
    finally:
        if isinstance(previous, tuple):
            model.enable_adapters()
            model.set_adapter(list(previous))
        else:
            activate_adapter(model, previous)
