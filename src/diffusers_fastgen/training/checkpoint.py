"""Checkpoints through accelerate's save_state / load_state, written atomically.

Layout: <output_dir>/checkpoints/checkpoint-<step>/ holding accelerate's state (models as
safetensors, optimizers, schedulers, RNG) plus `ema.safetensors` files and `training_state.json`.
A checkpoint is first written to `checkpoint-<step>.tmp` and renamed when complete, so a run killed
mid-save never leaves a broken checkpoint for `--resume_from_checkpoint latest` to pick up.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from safetensors.torch import load_file, save_file

from .nonfinite import check_finite

_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (.tmp leftovers of an interrupted save are ignored)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if _NAME.match(n) and os.path.isdir(os.path.join(root, n))]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(_NAME.match(n).group(1)))]


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """'latest' -> newest complete checkpoint (None if there is none yet); a path must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "training_state.json")):
        raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint "
                         "(no training_state.json); pass a checkpoint folder or 'latest'.")
    return resume_from_checkpoint


def save_checkpoint(accelerator, output_dir: str, step: int, *, emas: dict | None = None,
                    total_limit: int | None = None, extra_state: dict | None = None) -> str:
    """Save accelerate state + EMA shadows + {step, extra_state}; prune to `total_limit`. Collective.

    Refuses (NonFiniteError, before writing anything) when a prepared model or an EMA shadow holds a
    non-finite value, so pruning never replaces the last finite checkpoint with a broken one."""
    for i, model in enumerate(accelerator._models):
        check_finite(model, f"prepared model {i} ({type(accelerator.unwrap_model(model)).__name__}) at step {step}")
    for name, ema in (emas or {}).items():
        check_finite(ema.shadow, f"the EMA of {name!r} at step {step}")
    final = os.path.join(checkpoints_dir(output_dir), f"checkpoint-{step}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        for name, ema in (emas or {}).items():
            save_file({k: v.contiguous() for k, v in ema.shadow.items()}, os.path.join(tmp, f"ema_{name}.safetensors"),
                      metadata={"step": str(ema.step)})
        with open(os.path.join(tmp, "training_state.json"), "w", encoding="utf-8") as fh:
            json.dump({"step": step, **(extra_state or {})}, fh)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, *, emas: dict | None = None) -> dict:
    """Restore accelerate state and EMA shadows; returns training_state.json ({'step': ...})."""
    accelerator.load_state(path)
    for name, ema in (emas or {}).items():
        file = os.path.join(path, f"ema_{name}.safetensors")
        from safetensors import safe_open

        with safe_open(file, "pt") as fh:
            step = int(fh.metadata()["step"])
        ema.load_state_dict({"step": step, "shadow": load_file(file)})
    with open(os.path.join(path, "training_state.json"), encoding="utf-8") as fh:
        return json.load(fh)
