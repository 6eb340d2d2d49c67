"""Each stock-scheduler recipe reproduces diffusers_fastgen.sampling step for step (1e-6)."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_fastgen.parametrization import (
    VP,
    RectifiedFlow,
    TrigFlow,
    convert_prediction,
)
from diffusers_fastgen.sampling import sample_meanflow, sample_multistep
from diffusers_fastgen.schedulers import (
    flow_map_scheduler,
    flow_match_sde_scheduler,
    lcm_scheduler,
    scm_scheduler,
    scm_set_timesteps_kwargs,
    t_list_from_scheduler,
)

SHAPE = (2, 3, 4, 4)
X0_TARGET = torch.linspace(-1, 1, 96).reshape(SHAPE)


def toy_x0(x, t):
    """A smooth, t-dependent x0 predictor (any function works; it only has to be the same on both sides)."""
    t = t.reshape(-1, 1, 1, 1).float()
    return torch.tanh(0.3 * x) * t + (1 - t) * X0_TARGET


def _run_stock(scheduler, model, x, generator, timesteps=None):
    """The loop a diffusers pipeline runs; returns every intermediate sample."""
    trajectory = []
    for timestep in scheduler.timesteps if timesteps is None else timesteps:
        out = model(x, timestep)
        kwargs = {} if generator is None else {"generator": generator}
        x = scheduler.step(out, timestep, x, return_dict=False, **kwargs)[0]
        trajectory.append(x)
    return trajectory


def _run_ours(process, x, t_list, stochastic, generator, denoise=toy_x0):
    """Our sampler; the state entering step i (i >= 1) and the output form the same trajectory."""
    states = []
    out = sample_multistep(denoise, x, t_list, process=process, stochastic=stochastic, generator=generator,
                           callback=lambda i, t, x_i, x0: states.append(x_i) if i > 0 else None)
    return states + [out]


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (2, 5.0), (4, 3.0)])
def test_flow_map_is_deterministic_rf_multistep(num_steps, shift):
    scheduler = flow_map_scheduler(shift=shift)
    t_list = t_list_from_scheduler(scheduler, num_steps)
    rf = RectifiedFlow()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def flow_model(x_t, timestep):
        t = torch.full((x_t.shape[0],), float(timestep) / 1000)
        return convert_prediction(rf, toy_x0(x_t, t), x_t, t, "x0", "flow")

    stock = _run_stock(scheduler, flow_model, x, None)
    ours = _run_ours(rf, x, t_list, False, None)
    for a, b in zip(stock, ours):
        torch.testing.assert_close(a.float(), b, atol=1e-6, rtol=1e-6)
    # Single call equals the stepwise result too.
    full = sample_multistep(toy_x0, x, t_list, process=rf, stochastic=False)
    torch.testing.assert_close(full, stock[-1].float(), atol=1e-6, rtol=1e-6)
    if num_steps == 2:
        torch.testing.assert_close(t_list, torch.tensor([1.0, shift / (1 + shift), 0.0]))


@pytest.mark.parametrize("num_steps,shift", [(1, 1.0), (2, 5.0), (4, 3.0)])
def test_flow_match_sde_is_stochastic_rf_multistep(num_steps, shift):
    scheduler = flow_match_sde_scheduler(shift=shift)
    t_list = t_list_from_scheduler(scheduler, num_steps)
    rf = RectifiedFlow()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def flow_model(x_t, timestep):
        t = torch.full((x_t.shape[0],), float(timestep) / 1000)
        return convert_prediction(rf, toy_x0(x_t, t), x_t, t, "x0", "flow")

    stock = _run_stock(scheduler, flow_model, x, torch.Generator().manual_seed(7))
    ours = _run_ours(rf, x, t_list, True, torch.Generator().manual_seed(7))
    for a, b in zip(stock, ours):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_lcm_is_vp_multistep_consistency(num_steps):
    teacher = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = lcm_scheduler(teacher, original_inference_steps=50)
    t_list = t_list_from_scheduler(scheduler, num_steps)
    vp = VP(alphas_cumprod=teacher.alphas_cumprod)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def eps_model(x_t, timestep):
        t = torch.full((x_t.shape[0],), float(timestep) / 999)
        return convert_prediction(vp, toy_x0(x_t, t), x_t, t, "x0", "eps")

    stock = _run_stock(scheduler, eps_model, x, torch.Generator().manual_seed(3))
    ours = _run_ours(vp, x, t_list, True, torch.Generator().manual_seed(3))
    for a, b in zip(stock, ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_scm_is_trigflow_multistep(num_steps):
    scheduler = scm_scheduler(sigma_data=0.5)
    t_list = t_list_from_scheduler(scheduler, num_steps)
    tf = TrigFlow(sigma_data=0.5)
    x = 0.5 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def velocity_model(x_t, timestep):
        t = torch.full((x_t.shape[0],), float(timestep))
        return convert_prediction(tf, toy_x0(x_t, t / 1.6), x_t, t, "x0", "flow")

    def denoise(x_t, t):
        return toy_x0(x_t, t / 1.6)

    scheduler.set_timesteps(num_steps, **scm_set_timesteps_kwargs(num_steps))
    stock = _run_stock(scheduler, velocity_model, x, torch.Generator().manual_seed(5), timesteps=scheduler.timesteps[:-1])
    ours = _run_ours(tf, x, t_list, True, torch.Generator().manual_seed(5), denoise=denoise)
    for a, b in zip(stock, ours):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_flow_map_is_meanflow_sampler(num_steps):
    scheduler = flow_map_scheduler(shift=2.0)
    t_list = t_list_from_scheduler(scheduler, num_steps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))

    def u(z, r, t):
        return torch.sin(z) * (t - r).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1)

    def stock_model(z, timestep, r_timestep):
        t = torch.full((z.shape[0],), float(timestep) / 1000)
        r = torch.full((z.shape[0],), float(r_timestep) / 1000)
        return u(z, r, t)

    scheduler.set_timesteps(num_steps)
    z = x
    for i, timestep in enumerate(scheduler.timesteps):
        r_timestep = scheduler.sigmas[i + 1] * 1000
        z = scheduler.step(stock_model(z, timestep, r_timestep), timestep, z, return_dict=False)[0]
    ours = sample_meanflow(u, x, t_list)
    torch.testing.assert_close(z.float(), ours, atol=1e-6, rtol=1e-6)
