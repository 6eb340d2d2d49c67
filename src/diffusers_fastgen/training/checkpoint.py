"""Checkpoints through accelerate's save_state / load_state, written atomically.

Layout: <output_dir>/checkpoints/checkpoint-<step>/ holding accelerate's state (models as
safetensors, optimizers, schedulers, RNG) plus `ema.safetensors` files and `training_state.json`.
A checkpoint is first written to `checkpoint-<step>.tmp` and renamed when complete, so a run killed
mid-save never leaves a broken checkpoint for `--resume_from_checkpoint latest` to pick up.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .nonfinite import check_finite

logger = logging.getLogger("diffusers_fastgen")
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


def verify_checkpoint(path: str) -> None:
    """ValueError naming the file when a checkpoint is incomplete or damaged: training_state.json must
    parse, every safetensors file must have a whole header and data, every torch.save file (optimizer,
    scheduler, RNG states: zip archives) must pass its CRC check. Reads no pickle."""
    state = os.path.join(path, "training_state.json")
    try:
        with open(state, encoding="utf-8") as fh:
            json.load(fh)["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"checkpoint {path!r}: {state} is missing or damaged ({err}).") from None
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, "pt") as fh:  # header and data offsets checked against the file size
                    for key in fh.keys():
                        fh.get_slice(key)
                expected = _safetensors_size(file)
                if os.path.getsize(file) < expected:
                    raise ValueError(f"{os.path.getsize(file)} bytes, the header needs {expected}")
            elif name.endswith((".bin", ".pkl", ".pt")):
                with zipfile.ZipFile(file) as zf:
                    bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"corrupt member {bad}")
        except Exception as err:  # noqa: BLE001 - every reader's error means the same: damaged
            raise ValueError(f"checkpoint {path!r}: {file} is damaged ({type(err).__name__}: {err}).") from None


def _safetensors_size(file: str) -> int:
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """'latest' -> the newest checkpoint that passes `verify_checkpoint` (a damaged newer one is skipped
    with a warning naming the file; None, said in the log, if there is none); an explicit path must be a
    complete, undamaged checkpoint (ValueError naming the file otherwise)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            try:
                verify_checkpoint(path)
                return path
            except ValueError as err:
                logger.warning("not resuming from %s: %s Trying the one before it.", path, err)
        logger.warning("--resume_from_checkpoint latest: no usable checkpoint under %s; starting from scratch.",
                       checkpoints_dir(output_dir))
        return None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "training_state.json")):
        raise ValueError(f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint "
                         "(no training_state.json); pass a checkpoint folder or 'latest'.")
    verify_checkpoint(resume_from_checkpoint)
    return resume_from_checkpoint


def _set_aside_newer(output_dir: str, step: int) -> None:
    """A run saves increasing steps, so checkpoints newer than the one being saved belong to a run that was
    abandoned by resuming from an older checkpoint. Move them (ours) into checkpoints/abandoned/ so that
    'latest' and rotation see only the run that goes on; nothing is deleted."""
    for p in list_checkpoints(output_dir):
        if int(_NAME.match(os.path.basename(p)).group(1)) > step:
            target = os.path.join(checkpoints_dir(output_dir), "abandoned", f"{os.path.basename(p)}-{time.time_ns()}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(p, target)
            logger.warning("saving step %d: the newer %s belongs to an abandoned run; moved to %s", step, p, target)


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
        _set_aside_newer(output_dir, step - 1)  # newer ones and an older save of this very step
        os.replace(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                doomed = old + ".deleting"  # renamed first: a kill mid-delete never leaves a listed, partial checkpoint
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        for name in os.listdir(checkpoints_dir(output_dir)):  # leftovers of a rotation killed mid-delete
            if name.endswith(".deleting") and _NAME.match(name[:-len(".deleting")]):
                shutil.rmtree(os.path.join(checkpoints_dir(output_dir), name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, *, emas: dict | None = None) -> dict:
    """Restore accelerate state and EMA shadows; returns training_state.json ({'step': ...}).

    A checkpoint whose weights do not fit this run's models (saved in full mode and resumed with
    --lora_rank, or another architecture) is a ValueError in one sentence, not a list of keys. The
    RNG states must load (accelerate only logs when they do not, and the resume is then not exact).
    """
    verify_checkpoint(path)
    with open(os.path.join(path, "training_state.json"), encoding="utf-8") as fh:
        state = json.load(fh)
    rng = os.path.join(path, f"random_states_{accelerator.process_index}.pkl")
    if not os.path.isfile(rng):
        raise ValueError(f"checkpoint {path!r} has no RNG state {os.path.basename(rng)} for process "
                         f"{accelerator.process_index}: was it saved with another number of processes?")
    try:
        accelerator.load_state(path)
    except RuntimeError as err:
        if "state_dict" in str(err) or "Missing key" in str(err) or "Unexpected key" in str(err) or "size mismatch" in str(err):
            raise ValueError(f"checkpoint {path!r} does not fit this run's models (was it saved with another "
                             "--lora_rank, full vs LoRA, or another model config?); resume it with the settings "
                             "it was saved with, or start a new --output_dir.") from None
        raise
    for name, ema in (emas or {}).items():
        file = os.path.join(path, f"ema_{name}.safetensors")
        if not os.path.isfile(file):
            raise ValueError(f"checkpoint {path!r} has no {os.path.basename(file)}: it was saved by another script.")
        with safe_open(file, "pt") as fh:
            step = int(fh.metadata()["step"])
        ema.load_state_dict({"step": step, "shadow": load_file(file)})
    return state
