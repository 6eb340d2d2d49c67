"""--resume_from_checkpoint latest continues exactly: same step, optimizer, EMA and final weights."""

import os

import pytest
import torch
from accelerate.state import AcceleratorState

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.training import (
    OptimizerArgs,
    RunArgs,
    list_checkpoints,
    load_checkpoint,
    make_optimizer,
    resolve_checkpoint,
    save_checkpoint,
    setup_accelerator,
)


def _train(output_dir, *, total_steps, stop_after=None, resume=None, checkpointing_steps=2, limit=2):
    """A minimal loop using the shared glue exactly as the scripts do."""
    AcceleratorState._reset_state(True)
    run = RunArgs(output_dir=str(output_dir), max_train_steps=total_steps, report_to="none",
                  checkpointing_steps=checkpointing_steps, checkpoints_total_limit=limit,
                  resume_from_checkpoint=resume)
    accelerator = setup_accelerator(run, "test")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    optimizer, lr_scheduler = make_optimizer(model.parameters(), OptimizerArgs(learning_rate=1e-2, lr_warmup_steps=3))
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMA(model, schedule="constant", decay=0.9)
    step = 0
    path = resolve_checkpoint(run.output_dir, run.resume_from_checkpoint)
    if path is not None:
        step = load_checkpoint(accelerator, path, emas={"model": ema})["step"]
    while step < total_steps:
        g = torch.Generator().manual_seed(step)  # data as a function of the step, like a resumed sampler
        x = torch.randn(16, 4, generator=g)
        noise = torch.randn(16, 1)  # global RNG: restored from the checkpoint
        loss = (model(x) - x.sum(1, keepdim=True) - 0.1 * noise).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.update(model)
        step += 1
        if step % run.checkpointing_steps == 0:
            save_checkpoint(accelerator, run.output_dir, step, emas={"model": ema}, total_limit=limit)
        if stop_after is not None and step == stop_after:
            break
    return step, {k: v.clone() for k, v in model.state_dict().items()}, dict(ema.shadow), optimizer


def test_resume_latest_matches_uninterrupted_run(tmp_path):
    _, w_ref, ema_ref, opt_ref = _train(tmp_path / "ref", total_steps=6)
    # Interrupted run: stops after step 4 (checkpoints 2 and 4 written) ...
    step, _, _, _ = _train(tmp_path / "run", total_steps=6, stop_after=4)
    assert step == 4
    # ... and a save of step 6 was killed half-way: only the .tmp folder exists.
    os.makedirs(tmp_path / "run" / "checkpoints" / "checkpoint-6.tmp")
    assert resolve_checkpoint(str(tmp_path / "run"), "latest").endswith("checkpoint-4")
    step, w, ema, opt = _train(tmp_path / "run", total_steps=6, resume="latest")
    assert step == 6
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=0)
        torch.testing.assert_close(ema[k.replace("module.", "")] if k not in ema else ema[k], ema_ref[k], rtol=0, atol=0)
    s_ref, s = opt_ref.state_dict()["state"], opt.state_dict()["state"]
    for i in s_ref:
        torch.testing.assert_close(s[i]["exp_avg_sq"], s_ref[i]["exp_avg_sq"], rtol=0, atol=0)
    # Pruning kept the 2 newest complete checkpoints.
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run"))]
    assert names == ["checkpoint-4", "checkpoint-6"]


def test_resume_errors(tmp_path):
    assert resolve_checkpoint(str(tmp_path), "latest") is None  # nothing yet: start from scratch
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_checkpoint(str(tmp_path), str(tmp_path / "nope"))
