"""A non-finite loss or gradient stops the update (or skips it when asked), and non-finite weights are
never written: checkpoints, rotation and the replica check."""

import math
import os

import pytest
import torch
from accelerate.state import AcceleratorState

from diffusers_fastgen.ema import EMA
from diffusers_fastgen.training import (
    NonFiniteError,
    NonFiniteGuard,
    OptimizerArgs,
    RunArgs,
    check_replicas_in_sync,
    list_checkpoints,
    make_optimizer,
    save_checkpoint,
    setup_accelerator,
    update,
)


def _player(tmp_path, max_grad_norm=1.0):
    AcceleratorState._reset_state(True)
    accelerator = setup_accelerator(RunArgs(output_dir=str(tmp_path), report_to="none"), "test")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer, lr_scheduler = make_optimizer(model.parameters(), OptimizerArgs(learning_rate=0.1))
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    return accelerator, model, optimizer, lr_scheduler


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_non_finite_loss_stops_before_the_optimizer_steps(tmp_path, bad, max_grad_norm):
    accelerator, model, optimizer, lr_scheduler = _player(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.ones(2, 3)).mean() * bad
    with pytest.raises(NonFiniteError, match=r"fake_score update at step 7"):
        update(accelerator, loss, model.parameters(), optimizer, lr_scheduler, max_grad_norm,
               player="fake_score", step=7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_the_guard_skips_a_bounded_number_of_updates(tmp_path):
    accelerator, model, optimizer, lr_scheduler = _player(tmp_path)
    guard = NonFiniteGuard(max_skips=2)
    before = model.weight.detach().clone()
    for _ in range(2):
        loss = model(torch.ones(2, 3)).mean() * math.nan
        assert update(accelerator, loss, model.parameters(), optimizer, lr_scheduler, 1.0, guard=guard, step=1) is False
    assert torch.equal(model.weight, before) and guard.skipped == 2
    # a finite update still applies after the skips
    assert update(accelerator, model(torch.ones(2, 3)).mean(), model.parameters(), optimizer, lr_scheduler, 1.0,
                  guard=guard, step=1) is True
    assert not torch.equal(model.weight, before)
    with pytest.raises(NonFiniteError, match="max_nonfinite_skips 2"):
        update(accelerator, model(torch.ones(2, 3)).mean() * math.inf, model.parameters(), optimizer, lr_scheduler,
               1.0, guard=guard, step=2)
    with pytest.raises(ValueError, match="max_skips"):
        NonFiniteGuard(-1)


def test_a_finite_loss_with_a_non_finite_gradient_is_caught(tmp_path):
    accelerator, model, optimizer, lr_scheduler = _player(tmp_path)
    x = torch.tensor([[0.0, 1.0, 2.0]])
    loss = torch.sqrt(model(x).abs() * 0).sum()  # value 0, gradient 0 * inf = nan
    assert torch.isfinite(loss)
    with pytest.raises(NonFiniteError, match="student update at step 3"):
        update(accelerator, loss, model.parameters(), optimizer, lr_scheduler, 0.0, step=3)


def test_checkpoints_with_non_finite_weights_are_refused_and_the_finite_ones_kept(tmp_path):
    accelerator, model, optimizer, lr_scheduler = _player(tmp_path)
    ema = EMA(model, schedule="constant", decay=0.5)
    for step in (1, 2):
        save_checkpoint(accelerator, str(tmp_path), step, emas={"model": ema}, total_limit=2)
    with torch.no_grad():
        model.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="step 3"):
        save_checkpoint(accelerator, str(tmp_path), 3, emas={"model": ema}, total_limit=2)
    with torch.no_grad():
        model.weight[0, 0] = 0.0
    ema.shadow["bias"][0] = math.inf  # the EMA alone broken: refused too
    with pytest.raises(NonFiniteError, match="EMA"):
        save_checkpoint(accelerator, str(tmp_path), 4, emas={"model": ema}, total_limit=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-1", "checkpoint-2"]
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.join(tmp_path, "checkpoints")))


def test_replica_check_names_non_finite_weights_not_divergence(tmp_path):
    accelerator, model, *_ = _player(tmp_path)
    check_replicas_in_sync(accelerator, list(model.parameters()))
    with torch.no_grad():
        model.bias.fill_(math.nan)
    with pytest.raises(NonFiniteError, match="non-finite"):
        check_replicas_in_sync(accelerator, list(model.parameters()))
