"""Accelerate setup shared by the scripts: mixed precision, accumulation, seeding, trackers, optimizer."""

from __future__ import annotations

import logging
import os
import resource
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler

from .args import OptimizerArgs, RunArgs, to_flat_dict
from .cpu_memory import retain_freed_memory
from .nonfinite import NonFiniteError, NonFiniteGuard

logger = logging.getLogger("diffusers_fastgen")

# Multi-process launches keep their Accelerator (and with it the DDP modules it prepared) until `run_main` leaves
# through os._exit: if main()'s locals were freed on return, a DDP Reducer's last reference to the gloo process
# group would run ~ProcessGroupGloo, which joins a gloo worker thread waiting for the GIL the freeing thread holds
# (a hang at the end of a finished run; seen with gdb on an orphaned rank 1 in CI).
_KEEP_UNTIL_EXIT: list = []


def setup_accelerator(run: RunArgs, project_name: str, config=None, *, find_unused_parameters: bool = False) -> Accelerator:
    """Accelerator for `run`. Without CUDA it is created with cpu=True, which is what makes
    `accelerate launch --multi_gpu --num_processes 2` run two gloo DDP processes on a CPU box; on CPU,
    freed tensor memory is kept for reuse (`cpu_memory.retain_freed_memory`).
    `find_unused_parameters`: for DDP when a step uses only part of a prepared module (one of several
    LoRA adapters on a shared base)."""

    report_to = None if run.report_to == "none" else run.report_to
    accelerator = Accelerator(
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=run.output_dir, logging_dir=os.path.join(run.output_dir, "logs")),
        cpu=not torch.cuda.is_available(),
    )
    if accelerator.num_processes > 1:
        _KEEP_UNTIL_EXIT.append(accelerator)
    if accelerator.device.type == "cpu" and retain_freed_memory():
        logger.info("CPU run: glibc keeps freed tensor memory for reuse (training.cpu_memory)")
    set_seed(run.seed, device_specific=True)
    if accelerator.is_main_process:
        os.makedirs(run.output_dir, exist_ok=True)
    if report_to is not None:
        hparams = {k: v for k, v in to_flat_dict(config).items() if isinstance(v, (int, float, str, bool))} if config else {}
        accelerator.init_trackers(project_name, config=hparams)
    return accelerator


def make_optimizer(params, opt: OptimizerArgs, *, num_training_steps: int | None = None, num_processes: int = 1):
    """AdamW and the learning-rate schedule `opt.lr_scheduler` from diffusers' `get_scheduler` (warm-up
    `opt.lr_warmup_steps`; the decaying ones end at `num_training_steps`, this player's optimizer steps).
    Returns (optimizer, lr_scheduler). `params`: tensors, or torch param-group dicts ({"params": [...],
    "lr": ...}) for players with their own learning rate. `num_processes`: accelerate steps a prepared
    scheduler once per process per optimizer step, so both step counts are scaled by it, as in the diffusers
    training examples."""

    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters were given to the optimizer.")
    if opt.lr_scheduler not in ("constant", "constant_with_warmup") and not num_training_steps:
        raise ValueError(f"`lr_scheduler` {opt.lr_scheduler!r} decays over the run: pass num_training_steps.")
    optimizer = torch.optim.AdamW(params, lr=opt.learning_rate, betas=(opt.adam_beta1, opt.adam_beta2),
                                  weight_decay=opt.adam_weight_decay, eps=opt.adam_epsilon)
    scheduler = get_scheduler(opt.lr_scheduler, optimizer, num_warmup_steps=opt.lr_warmup_steps * num_processes,
                              num_training_steps=(num_training_steps or 0) * num_processes)
    return optimizer, scheduler


def check_replicas_in_sync(accelerator: Accelerator, params) -> float:
    """Gather a float64 checksum of `params` from every process and fail loudly if DDP replicas
    diverged (they must be bit-identical after synchronised updates). Returns the checksum."""
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    gathered = accelerator.gather(checksum)
    if not bool(torch.isfinite(gathered).all()):  # NaN != NaN: say what is wrong, not "diverged"
        raise NonFiniteError(f"the trained weights are non-finite (parameter checksums {gathered.tolist()}); "
                             "nothing is saved.")
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"DDP replicas diverged: parameter checksums {gathered.tolist()}.")
    if accelerator.num_processes > 1:
        logger.info("DDP replicas in sync across %d processes (checksum %.12e)", accelerator.num_processes,
                    float(gathered[0]))
    return float(gathered[0])


class Accumulator:
    """Gradient accumulation that survives alternating players: each player's optimizer steps on every
    `steps`-th call of `update` for that player (accelerate's `accumulate()` keeps one global count, which
    alternating fake-score / student updates would interleave). The loss of each micro-batch is divided
    by `steps` in `accelerator.backward`, so N micro-batches of B give the gradient of one batch of N * B.
    Under DDP every micro-batch's gradient is all-reduced (averaging is linear, so the sum is the same)."""

    def __init__(self, steps: int = 1):
        if steps < 1:
            raise ValueError(f"`gradient_accumulation_steps` must be >= 1, got {steps}.")
        self.steps, self.counts = steps, {}

    def is_last(self, player: str) -> bool:
        """Count one micro-batch of `player`; True when it completes an optimizer step."""
        self.counts[player] = self.counts.get(player, 0) + 1
        return self.counts[player] % self.steps == 0


def update(accelerator: Accelerator, loss, params, optimizer, lr_scheduler, max_grad_norm: float, *,
           guard: NonFiniteGuard | None = None, accumulator: Accumulator | None = None, player: str = "student",
           step: int | None = None) -> bool:
    """backward, then (on the last micro-batch of `accumulator`) clip, step, zero_grad for one player.
    The step is applied only if the loss and the gradient norm are finite (`guard`: stop, the default, or
    skip a bounded number). Returns whether an optimizer step was applied (False: skipped, or a micro-batch
    that is not the last). `player` and `step` name the update in messages."""
    if (accumulator.steps if accumulator is not None else 1) != accelerator.gradient_accumulation_steps:
        raise ValueError(f"gradient_accumulation_steps={accelerator.gradient_accumulation_steps} needs "
                         "`accumulator=Accumulator(gradient_accumulation_steps)` (it counts each player's micro-batches).")
    accelerator.backward(loss)  # divides by gradient_accumulation_steps
    if accumulator is not None and not accumulator.is_last(player):
        return False
    params = list(params)
    # max_norm inf: the total norm without clipping, for the finiteness check.
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if grad_norm is None:  # DeepSpeed clips inside its engine and returns no norm; its loss is still checked
        grad_norm = torch.zeros(())
    try:
        applied = (guard or NonFiniteGuard()).allows(accelerator, loss, grad_norm, player=player, step=step)
        if applied:
            optimizer.step()
            lr_scheduler.step()
    finally:  # a stopped or skipped update leaves no gradient behind
        optimizer.zero_grad(set_to_none=True)
    return applied


def training_state_mb(modules, optimizers) -> float:
    """Bytes held by every module's weights (shared ones once), their gradients and the optimizer
    states, in MB."""
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    total = sum(p.numel() * p.element_size() * (2 if p.requires_grad else 1) for p in params)
    for opt in optimizers:
        total += sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
                     if torch.is_tensor(v))
    return total / 2**20


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux ru_maxrss is in KiB)."""

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_main(main) -> None:
    """A training script's entry point: `main()`, then, in a multi-process launch (WORLD_SIZE > 1), flush the
    logs and streams and leave with `os._exit(0)` instead of interpreter finalization.

    Why: `destroy_process_group` leaves gloo's worker threads running, and at interpreter finalization a
    worker that takes the GIL either is killed (CPython before 3.14, gh-87135: the process aborts with
    "terminate called without an active exception") or blocks while the main thread, holding the GIL, joins
    it in ~ProcessGroupGloo (the process hangs; seen with gdb) — after the run has finished and saved. A plain accelerate
    DDP script on two CPU processes beside one busy process failed 6 of 40 launches that way, 0 of 40 through
    this exit (benchmarks/ddp_exit.py, docs/results.md). Everything the scripts write is closed by then
    (end_training finishes the trackers; files are written atomically). The same deadlock can strike earlier, when
    main()'s locals are freed on return and a DDP Reducer drops the last reference to the process group, so
    `setup_accelerator` keeps multi-process accelerators (and their DDP modules) alive until this exit.
    An exception from `main` propagates as usual."""
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
