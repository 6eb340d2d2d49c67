"""Learning-rate schedules come from diffusers' get_scheduler and count optimizer steps."""

import math

import pytest
import torch

from diffusers_fastgen.training import OptimizerArgs, make_optimizer


def _lrs(opt_args, steps, **kw):
    optimizer, scheduler = make_optimizer([torch.nn.Parameter(torch.zeros(2))], opt_args, **kw)
    out = []
    for _ in range(steps):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_then_constant_and_cosine_to_zero():
    lrs = _lrs(OptimizerArgs(learning_rate=1.0, lr_warmup_steps=4), 8, num_training_steps=8)
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    cos = _lrs(OptimizerArgs(learning_rate=1.0, lr_scheduler="cosine"), 10, num_training_steps=10)
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])
    lin = _lrs(OptimizerArgs(learning_rate=2.0, lr_scheduler="linear", lr_warmup_steps=2), 6, num_training_steps=6)
    assert lin == pytest.approx([0.0, 1.0, 2.0, 1.5, 1.0, 0.5])


def test_a_decaying_schedule_needs_the_step_count_and_names_are_checked():
    with pytest.raises(ValueError, match="num_training_steps"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], OptimizerArgs(lr_scheduler="cosine"))
    with pytest.raises(ValueError, match="lr_scheduler"):
        OptimizerArgs(lr_scheduler="cosin")
