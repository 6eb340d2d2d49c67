"""The second time input r (MeanFlow / flow-map students) on a stock UNet2DConditionModel."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_fastgen.losses.meanflow import meanflow_target
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import digits_cond, digits_unet
from diffusers_fastgen.models.interval import add_interval_input
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.testing import tiny as T


def _setup():
    torch.manual_seed(0)
    teacher = digits_unet((16, 32), layers_per_block=1)
    return teacher, add_interval_input(teacher, dim=32), torch.randn(3, 1, 8, 8), torch.tensor([0.9, 0.5, 0.3])


def test_starts_as_the_teacher_for_every_r_then_depends_on_r(tmp_path):
    teacher, student, x, t = _setup()
    cond, rf = digits_cond(torch.tensor([1, 2, 3])), RectifiedFlow()
    ref = Denoiser(teacher, rf, "flow")(x, t, cond, target="flow")
    den = Denoiser(student, rf, "flow")
    for r in (t, torch.zeros(3), t / 2):
        torch.testing.assert_close(den(x, t, cond, target="flow", r=r), ref, rtol=0, atol=0)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.05)
    a, b = den(x, t, cond, target="flow", r=t), den(x, t, cond, target="flow", r=torch.zeros(3))
    assert (a - b).abs().max() > 1e-4
    # A stock diffusers model: saves and reloads without custom code, same outputs.
    student.save_pretrained(tmp_path / "unet")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert reloaded.config.time_cond_proj_dim == 32
    torch.testing.assert_close(Denoiser(reloaded, rf, "flow")(x, t, cond, target="flow", r=torch.zeros(3)), b)


def test_meanflow_jvp_through_both_times_exact_equals_finite_difference():
    _, student, x, t = _setup()
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.05)
    den, cond, r = Denoiser(student, RectifiedFlow(), "flow"), digits_cond(torch.tensor([4, 5, 6])), t * 0.4
    v = torch.randn_like(x)

    def u_fn(z, rr, tt):
        return den(z, tt, cond, target="flow", r=rr)

    _, exact = meanflow_target(u_fn, x, r, t, v, jvp_method="exact")
    _, fd = meanflow_target(u_fn, x, r, t, v, jvp_method="finite_difference")
    rel = ((exact - fd).norm() / (exact - v).norm()).item()  # relative error of the JVP term (t - r) du/dt
    assert rel < 1e-3, rel


def test_r_needs_an_interval_model():
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        Denoiser(T.tiny_unet2d(), RectifiedFlow(), "flow")(torch.randn(1, 1, 8, 8), 0.5, {}, r=0.1)
    teacher, student, _, _ = _setup()
    with pytest.raises(ValueError, match="already"):
        add_interval_input(student)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        add_interval_input(T.tiny_unet2d())


def test_the_guidance_interval_embedding_is_what_the_stock_pipeline_feeds():
    """guidance_interval_embedding(t, r) equals StableDiffusionPipeline's own guidance-scale embedding of
    w = interval_guidance_scale(N) - 1 for the N-step DDIM (trailing) jumps of 1000 / N timesteps."""
    from diffusers import StableDiffusionPipeline

    from diffusers_fastgen.models.interval import guidance_interval_embedding, interval_guidance_scale

    for n in (1, 2, 4):
        for dim in (8, 256):
            t = torch.tensor([999.0, 499.0, 250.0])
            mine = guidance_interval_embedding(t, t - 1000 / n, dim)
            w = torch.full((3,), interval_guidance_scale(n) - 1)
            stock = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
            torch.testing.assert_close(mine, stock, atol=1e-6, rtol=1e-5)
    slow = guidance_interval_embedding(torch.tensor([1000.0]), torch.tensor([0.0]), 256)
    assert torch.isclose(slow[0, 0], torch.sin(torch.tensor(10.0)))  # the fastest feature: 10 rad per unit
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            interval_guidance_scale(bad)
    with pytest.raises(ValueError, match="dim"):
        guidance_interval_embedding(t, t, 3)
    with pytest.raises(ValueError, match="interval"):
        Denoiser(digits_unet(), RectifiedFlow(), "flow", interval="lcm")
