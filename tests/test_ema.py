import pytest
import torch

from diffusers_fastgen.ema import EMA, ema_decay


def _model(value):
    m = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_constant_decay_closed_form():
    # Parameter fixed at w after step 0 value w0: shadow_n = w + (w0 - w) beta^n.
    m = _model(1.0)
    ema = EMA(m, schedule="constant", decay=0.9)
    with torch.no_grad():
        m.weight.fill_(3.0)
    for _ in range(5):
        ema.update(m)
    expected = 3.0 + (1.0 - 3.0) * 0.9**5
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), expected))


def test_halflife_and_power_formulas():
    # After halflife_kimg * 1000 images the old weight has half the influence.
    beta = ema_decay(10, schedule="halflife", halflife_kimg=0.5, batch_size=50)
    assert beta ** (500 / 50) == pytest.approx(0.5)
    # EDM2 power schedule: beta_n = (1 - 1/n)^(gamma + 1); with gamma = 0 the EMA is the running mean.
    m = _model(0.0)
    ema = EMA(m, schedule="power", gamma=0.0)
    values = [1.0, 2.0, 6.0, 3.0]
    for v in values:
        with torch.no_grad():
            m.weight.fill_(v)
        ema.update(m)
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), sum(values) / len(values)))


def test_start_iter_copies_weights():
    m = _model(0.0)
    ema = EMA(m, schedule="constant", decay=0.99, start_iter=2)
    for v in (5.0, 7.0):
        with torch.no_grad():
            m.weight.fill_(v)
        assert ema.update(m) == 0.0
    torch.testing.assert_close(ema.shadow["weight"], torch.full((1, 2), 7.0))
    with torch.no_grad():
        m.weight.fill_(8.0)
    assert ema.update(m) == 0.99


def test_fp32_shadow_state_dict_copy_to():
    m = _model(1.0).to(torch.bfloat16)
    ema = EMA(m, schedule="constant", decay=0.5)
    assert ema.shadow["weight"].dtype == torch.float32
    with torch.no_grad():
        m.weight.fill_(2.0)
    ema.update(m)
    state = ema.state_dict()
    other = EMA(_model(0.0).to(torch.bfloat16), schedule="constant", decay=0.5)
    other.load_state_dict(state)
    assert other.step == 1
    target = _model(0.0).to(torch.bfloat16)
    other.copy_to(target)
    torch.testing.assert_close(target.weight.float(), torch.full((1, 2), 1.5))


def test_bad_schedule():
    with pytest.raises(ValueError, match="schedule"):
        EMA(_model(0.0), schedule="linear")
    with pytest.raises(ValueError, match="decay"):
        EMA(_model(0.0), decay=1.0)
