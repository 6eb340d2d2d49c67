import math

import pytest
import torch

from diffusers_fastgen.parametrization import (
    EDM,
    PREDICTION_TYPES,
    RectifiedFlow,
    TrigFlow,
    add_noise,
    change_process,
    convert_prediction,
    eps_from_flow,
    prediction_from_x0_eps,
    vp_from_betas,
    x0_eps_from_prediction,
    x0_from_flow,
)

VP = vp_from_betas()
PROCESSES = {
    "rf": (RectifiedFlow(), (0.02, 0.98)),
    "edm": (EDM(), (0.01, 80.0)),
    "trigflow": (TrigFlow(sigma_data=0.5), (0.02, 1.55)),
    "vp": (VP, (0.001, 0.999)),
}


def _batch(process_range, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    lo, hi = process_range
    t = torch.linspace(lo, hi, 6, dtype=dtype)
    return x0, eps, t


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("source", PREDICTION_TYPES)
@pytest.mark.parametrize("target", PREDICTION_TYPES)
def test_conversions_round_trip(name, source, target):
    # float64 so the check measures the algebra (1e-6), not float32 rounding at EDM's sigma = 80.
    process, rng = PROCESSES[name]
    x0, eps, t = _batch(rng, dtype=torch.float64)
    x_t = add_noise(process, x0, eps, t)
    pred = prediction_from_x0_eps(process, x0, eps, t, source)
    converted = convert_prediction(process, pred, x_t, t, source, target)
    expected = prediction_from_x0_eps(process, x0, eps, t, target)
    torch.testing.assert_close(converted, expected, atol=1e-6, rtol=1e-6)
    back = convert_prediction(process, converted, x_t, t, target, source)
    torch.testing.assert_close(back, pred, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["rf", "vp", "trigflow"])
def test_conversions_float32_within_1e5(name):
    process, rng = PROCESSES[name]
    x0, eps, t = _batch(rng)
    x_t = add_noise(process, x0, eps, t)
    for source in PREDICTION_TYPES:
        pred = prediction_from_x0_eps(process, x0, eps, t, source)
        x0_hat = convert_prediction(process, pred, x_t, t, source, "x0")
        torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-5)


def test_rf_closed_forms():
    x0, eps, t = _batch((0.05, 0.95))
    rf = RectifiedFlow()
    x_t = add_noise(rf, x0, eps, t)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps)
    flow = prediction_from_x0_eps(rf, x0, eps, t, "flow")
    torch.testing.assert_close(flow, eps - x0)
    torch.testing.assert_close(x0_from_flow(x_t, flow, t), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eps_from_flow(x_t, flow, t), eps, atol=1e-6, rtol=1e-6)


def test_vp_matches_alphas_cumprod_and_derivative():
    abar = VP.alphas_cumprod
    timesteps = torch.tensor([0, 1, 250, 999])
    t = timesteps / 999
    torch.testing.assert_close(VP.alpha(t) ** 2, abar[timesteps], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(VP.alpha(t) ** 2 + VP.sigma(t) ** 2, torch.ones(4))
    # Derivative against a finite difference inside one interpolation segment.
    t = torch.tensor([300.5, 700.5], dtype=torch.float64) / 999  # segment midpoints
    h = 0.4 / 999
    fd = (VP.alpha(t.double() + h).double() - VP.alpha(t.double() - h).double()) / (2 * h)
    torch.testing.assert_close(VP.d_alpha(t), fd, rtol=1e-6, atol=1e-9)


def test_trigflow_closed_form_and_map_to_rf():
    tf, rf = TrigFlow(sigma_data=0.5), RectifiedFlow()
    x0, eps, t = _batch((0.1, 1.5))
    x_trig = add_noise(tf, x0, eps, t)
    x_rf, t_rf, scale = change_process(x_trig, t, tf, rf)
    # Closed form (sCM appendix): t_rf = s tan t / (1 + s tan t), scale = 1 / (cos t + s sin t).
    s = 0.5
    torch.testing.assert_close(t_rf, s * torch.tan(t) / (1 + s * torch.tan(t)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scale, 1 / (torch.cos(t) + s * torch.sin(t)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_rf, add_noise(rf, x0, eps, t_rf), rtol=1e-5, atol=1e-5)
    # And back.
    x_back, t_back, _ = change_process(x_rf, t_rf, rf, tf)
    torch.testing.assert_close(t_back, t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_back, x_trig, rtol=1e-5, atol=1e-5)


def test_vp_to_rf_and_edm():
    x0, eps, t = _batch((0.05, 0.95))
    x_vp = add_noise(VP, x0, eps, t)
    x_rf, t_rf, _ = change_process(x_vp, t, VP, RectifiedFlow())
    torch.testing.assert_close(x_rf, add_noise(RectifiedFlow(), x0, eps, t_rf), rtol=1e-4, atol=1e-5)
    x_edm, sigma, _ = change_process(x_vp, t, VP, EDM())
    torch.testing.assert_close(sigma, VP.sigma(t) / VP.alpha(t), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_edm, x0 + sigma.view(-1, 1, 1, 1) * eps, rtol=1e-4, atol=1e-4)
    # VP's inverse noise ratio on its own path is the identity.
    x_same, t_same, _ = change_process(x_vp, t, VP, VP)
    torch.testing.assert_close(t_same, t, rtol=1e-4, atol=1e-5)


def test_native_timesteps():
    t = torch.tensor([0.25, 1.0])
    torch.testing.assert_close(RectifiedFlow().timestep_from_t(t), torch.tensor([250.0, 1000.0]))
    torch.testing.assert_close(VP.timestep_from_t(t), torch.tensor([249.75, 999.0]))
    torch.testing.assert_close(EDM().timestep_from_t(torch.tensor([math.e**4])), torch.tensor([1.0]))
    for p in (RectifiedFlow(), VP, EDM(), TrigFlow()):
        torch.testing.assert_close(p.t_from_timestep(p.timestep_from_t(t)), t)


def test_bad_prediction_type_names_the_argument():
    x = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="target"):
        convert_prediction(RectifiedFlow(), x, x, 0.5, "flow", "score")
    with pytest.raises(ValueError, match="prediction_type"):
        x0_eps_from_prediction(RectifiedFlow(), x, x, 0.5, "velocity")
