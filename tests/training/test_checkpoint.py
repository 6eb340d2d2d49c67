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


def test_latest_with_no_checkpoint_says_so(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(str(tmp_path), "latest") is None
    assert "no usable checkpoint" in caplog.text and "starting from scratch" in caplog.text


@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin", "ema_model.safetensors", "model.safetensors",
                                    "training_state.json"])
def test_a_damaged_latest_falls_back_to_the_older_good_one(tmp_path, caplog, victim):
    _train(tmp_path, total_steps=4)  # checkpoints 2 and 4
    newest = tmp_path / "checkpoints" / "checkpoint-4"
    file = newest / victim
    assert file.is_file(), sorted(os.listdir(newest))
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-2")
    assert victim in caplog.text  # the warning names the file
    with pytest.raises(ValueError, match=victim):  # an explicit damaged path is an error naming the file
        resolve_checkpoint(str(tmp_path), str(newest))


def test_resuming_an_older_checkpoint_sets_the_abandoned_newer_ones_aside(tmp_path):
    _train(tmp_path, total_steps=8, checkpointing_steps=2, limit=None)  # checkpoints 2, 4, 6, 8
    older = str(tmp_path / "checkpoints" / "checkpoint-4")
    _train(tmp_path, total_steps=6, resume=older, checkpointing_steps=1, limit=2)  # new run saves 5, 6
    names = [os.path.basename(p) for p in list_checkpoints(str(tmp_path))]
    assert names == ["checkpoint-5", "checkpoint-6"]  # once, rotation deleted the fresh 5 and 6 and kept the old 8
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-6")
    aside = sorted(os.listdir(tmp_path / "checkpoints" / "abandoned"))
    assert [n.rsplit("-", 1)[0] for n in aside] == ["checkpoint-6", "checkpoint-8"]  # moved, not deleted


def test_a_rotation_killed_mid_delete_leaves_no_listed_partial_checkpoint(tmp_path, monkeypatch):
    import shutil as shutil_module

    _train(tmp_path, total_steps=4, checkpointing_steps=2, limit=None)
    real = shutil_module.rmtree

    def killed(path, *a, **k):  # the rotation's delete dies after removing one file
        if not os.path.isdir(path) or path.endswith(".tmp"):
            return real(path, *a, **k)
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
        raise KeyboardInterrupt

    from diffusers_fastgen.training import checkpoint as ckpt

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, total_steps=6, resume="latest", checkpointing_steps=2, limit=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real)
    for path in list_checkpoints(str(tmp_path)):
        ckpt.verify_checkpoint(path)  # every listed checkpoint is whole
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-6")


def test_a_checkpoint_of_another_model_is_one_sentence(tmp_path):
    _train(tmp_path / "a", total_steps=2)
    AcceleratorState._reset_state(True)
    run = RunArgs(output_dir=str(tmp_path / "b"), report_to="none")
    accelerator = setup_accelerator(run, "test")
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))  # other width
    optimizer, lr_scheduler = make_optimizer(model.parameters(), OptimizerArgs())
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    with pytest.raises(ValueError, match="does not fit this run's models") as info:
        load_checkpoint(accelerator, str(tmp_path / "a" / "checkpoints" / "checkpoint-2"))
    assert len(str(info.value)) < 400
