"""What a run does with non-finite numbers: a NaN or inf loss or gradient stops the run at that update
(or skips it, up to a bounded count the user asked for), and non-finite weights are never written, so
a checkpoint rotation can never replace the last finite checkpoint with a broken one."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("diffusers_fastgen")


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight that must be finite is NaN or inf."""


class NonFiniteGuard:
    """Decides, once per optimizer update, whether the update may be applied.

    max_skips: how many non-finite updates may be skipped (the batch dropped, the optimizer not stepped)
    before the run stops; 0 stops at the first. Under DDP every rank takes the same decision (the flag is
    summed across ranks), so no rank is left waiting in a collective."""

    def __init__(self, max_skips: int = 0):
        if max_skips < 0:
            raise ValueError(f"`max_skips` must be >= 0, got {max_skips}.")
        self.max_skips, self.skipped = max_skips, 0

    def allows(self, accelerator, loss: torch.Tensor, grad_norm: torch.Tensor, *, player: str, step: int | None) -> bool:
        # One host sync per update: the price of deciding before the optimizer steps (GradScaler pays it too).
        bad = ~(torch.isfinite(loss.detach()).all() & torch.isfinite(torch.as_tensor(grad_norm)).all())
        bad = bad.float().reshape(1).to(accelerator.device)
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, reduction="sum")
        if not bool(bad.item()):
            return True
        where = f"the {player} update at step {step}" if step is not None else f"a {player} update"
        what = f"loss {float(loss.detach().float().mean()):.4g}, gradient norm {float(grad_norm):.4g}"
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise NonFiniteError(
                f"non-finite loss or gradient in {where} ({what}); the run stops here and nothing non-finite is "
                f"saved (skipped so far: {self.skipped - 1}, allowed: --max_nonfinite_skips {self.max_skips}). "
                "Check the learning rate, the guidance scale and the teacher's weights.")
        logger.warning("skipped %s: non-finite (%s); %d of %d allowed skips used", where, what, self.skipped,
                       self.max_skips)
        return False


def check_finite(tensors, what: str) -> None:
    """Raise NonFiniteError naming the first non-finite tensor of `tensors` ({name: tensor} or a module)."""
    items = tensors.state_dict().items() if isinstance(tensors, torch.nn.Module) else tensors.items()
    for name, value in items:
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{what} holds non-finite values (first: {name!r}); it is not saved.")
