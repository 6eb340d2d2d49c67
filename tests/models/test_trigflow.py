"""The TrigFlow view of an RF model (models.trigflow) and sCM's sampler on the RF path."""

import math

import pytest
import torch

from diffusers_fastgen.jvp import jvp
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import digits_cond, digits_unet
from diffusers_fastgen.models.trigflow import trigflow_network
from diffusers_fastgen.parametrization import RectifiedFlow, TrigFlow, trigflow_x0
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.sampling import sample_multistep
from diffusers_fastgen.schedulers import scm_rf_scheduler
from diffusers_fastgen.testing import tiny as T

SD = 0.75


def _digits_denoiser():
    torch.manual_seed(0)
    unet = digits_unet((16, 32), layers_per_block=1).eval()
    return unet, Denoiser(unet, RectifiedFlow(), "flow")


def test_consistency_function_is_the_rf_x0_at_the_equal_noise_ratio_point():
    """f = cos t x_t - sin t sigma_d F equals the RF model's x0 at t_rf = k / (1 + k), k = sigma_d tan t,
    x_rf = x_t / (cos t + sigma_d sin t) (closed form, written out here independently)."""
    _, den = _digits_denoiser()
    cond = digits_cond(torch.tensor([1, 4, 7]))
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([0.2, 0.9, 1.5])
    F = trigflow_network(den, cond, sigma_d=SD)(x_t / SD, t)
    k = SD * torch.tan(t)
    x_rf = x_t / (torch.cos(t) + SD * torch.sin(t)).view(-1, 1, 1, 1)
    ref = den(x_rf, k / (1 + k), cond, target="x0")
    torch.testing.assert_close(trigflow_x0(x_t, SD * F, t), ref, atol=2e-5, rtol=1e-5)
    # ... and sigma_d F is the TrigFlow velocity -sin t x0 + sigma_d cos t eps of that (x0, eps).
    eps = (x_t - torch.cos(t).view(-1, 1, 1, 1) * ref) / (SD * torch.sin(t)).view(-1, 1, 1, 1)
    torch.testing.assert_close(SD * F, -torch.sin(t).view(-1, 1, 1, 1) * ref + SD * torch.cos(t).view(-1, 1, 1, 1) * eps,
                               atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["digits", "wan"])
def test_exact_jvp_through_the_change_of_variables_equals_finite_difference(kind):
    """float64. Along x the central difference is exact to rounding (< 1e-7). Along t, diffusers embeds the
    timestep in float32, so the difference is limited by that rounding for small eps and by the embedding's
    high frequencies for large eps (eps = 1e-4: ~5e-4 measured). Wan runs parts of its blocks in float32
(rel. error 4.7e-3 at eps = 1e-5 along x), so its x check uses eps = 1e-3."""
    if kind == "digits":
        unet, _ = _digits_denoiser()
        den = Denoiser(unet.double(), RectifiedFlow(), "flow")
        cond, x = digits_cond(torch.tensor([2, 3])), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    else:
        model = T.tiny_wan_transformer().double()
        den, cond = Denoiser(model), {k: v.double() for k, v in T.tiny_cond("wan", 2).items()}
        x = torch.randn(2, model.config.in_channels, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    F_fn = trigflow_network(den, cond, sigma_d=SD)
    x_eps, x_tol = (1e-5, 1e-7) if kind == "digits" else (1e-3, 1e-3)  # Wan computes parts in float32
    for tangent, eps, tol in (((torch.randn_like(x), torch.zeros_like(t)), x_eps, x_tol),
                              ((torch.zeros_like(x), torch.ones_like(t)), 1e-4, 2e-3)):
        with torch.no_grad():
            _, exact = jvp(F_fn, (x, t), tangent, method="exact")
            _, fd = jvp(F_fn, (x, t), tangent, method="finite_difference", eps=eps)
        assert ((exact - fd).norm() / exact.norm()).item() < tol


def test_scm_rf_scheduler_is_the_trigflow_multistep_sampler():
    """DigitsPipeline + scm_rf_scheduler (an RF model) == sCM's TrigFlow sampler (pi/2, 1.1) run with
    sampling.sample_multistep on the TrigFlow path, same noise."""
    unet, den = _digits_denoiser()
    labels = torch.tensor([0, 3, 8])
    pipe = DigitsPipeline(unet=unet, scheduler=scm_rf_scheduler(SD, 1.1))
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    F_fn = trigflow_network(den, digits_cond(labels), sigma_d=SD)

    def trig_x0(x, t):
        return trigflow_x0(x, SD * F_fn(x / SD, t), t)

    for steps, t_list in ((1, [math.pi / 2, 0.0]), (2, [math.pi / 2, 1.1, 0.0])):
        ours = sample_multistep(trig_x0, SD * latents, torch.tensor(t_list), process=TrigFlow(sigma_data=SD),
                                generator=torch.Generator().manual_seed(1))
        theirs = pipe(labels, num_inference_steps=steps, latents=latents, generator=torch.Generator().manual_seed(1),
                      output_type="latent").images
        torch.testing.assert_close(theirs, ours, atol=5e-5, rtol=1e-5)
