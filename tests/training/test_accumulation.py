"""Gradient accumulation: N micro-batches of B give the update of one batch of N * B (float64), for each of
two alternating players, and the EMA counts the samples of an optimizer step."""

import pytest
import torch
from accelerate.state import AcceleratorState

from diffusers_fastgen.training import Accumulator, OptimizerArgs, RunArgs, make_optimizer, setup_accelerator, update
from diffusers_fastgen.training.args import EMAArgs
from diffusers_fastgen.training.players import student_ema


def _players(tmp_path, n):
    AcceleratorState._reset_state(True)
    accelerator = setup_accelerator(RunArgs(output_dir=str(tmp_path), report_to="none", gradient_accumulation_steps=n),
                                    "test")
    torch.manual_seed(0)
    out = {}
    for name in ("fake_score", "student"):
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        opt, sched = make_optimizer(model.parameters(), OptimizerArgs(learning_rate=1e-2, max_grad_norm=0.5))
        out[name] = accelerator.prepare(model, opt, sched)
    return accelerator, out


def _loss(model, x):
    return (model(x) - x.sin().sum(1, keepdim=True)).square().mean()


@pytest.mark.parametrize("n", [2, 4])
def test_n_micro_batches_equal_one_batch_for_alternating_players(tmp_path, n):
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(8 * n, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    # reference: one batch of N * B per update, players alternating fake, student, fake, ...
    accelerator, ref = _players(tmp_path, 1)
    for x in data:
        for name in ("fake_score", "student"):
            model, opt, sched = ref[name]
            assert update(accelerator, _loss(model, x), model.parameters(), opt, sched, 0.5, player=name,
                          accumulator=Accumulator(1))
    # accumulated: N micro-batches of B for one player, then N for the other
    accelerator, acc = _players(tmp_path, n)
    accumulator = Accumulator(n)
    for x in data:
        for name in ("fake_score", "student"):
            model, opt, sched = acc[name]
            applied = [update(accelerator, _loss(model, xb), model.parameters(), opt, sched, 0.5, player=name,
                              accumulator=accumulator) for xb in x.chunk(n)]
            assert applied == [False] * (n - 1) + [True]
    for name in ref:
        for a, b in zip(ref[name][0].parameters(), acc[name][0].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert abs(ref[name][2].get_last_lr()[0] - acc[name][2].get_last_lr()[0]) == 0  # same scheduler steps


def test_update_without_an_accumulator_refuses_accumulation(tmp_path):
    accelerator, players = _players(tmp_path, 2)
    model, opt, sched = players["student"]
    with pytest.raises(ValueError, match="Accumulator"):
        update(accelerator, _loss(model, torch.randn(4, 3, dtype=torch.float64)), model.parameters(), opt, sched, 1.0)


def test_ema_counts_the_samples_of_an_optimizer_step(tmp_path):
    accelerator, players = _players(tmp_path, 4)
    ema = student_ema(accelerator, {"student": players["student"][0]},
                      EMAArgs(ema_schedule="halflife", ema_halflife_kimg=1.0), batch_size=8)
    assert ema.kwargs["batch_size"] == 32  # 8 per micro-batch x 4 micro-batches x 1 process
