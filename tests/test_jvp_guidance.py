import pytest
import torch

from diffusers_fastgen.guidance import apply_cfg, guided_prediction
from diffusers_fastgen.jvp import jvp
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.parametrization import vp_from_betas
from diffusers_fastgen.testing import tiny as T


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_jvp_closed_form():
    # f(x, t) = sin(x) * t^2: J.(v, w) = cos(x) v t^2 + 2 t w sin(x).
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    v, w = torch.randn(3, 4, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    expected = torch.cos(x) * v * t**2 + 2 * t * w * torch.sin(x)
    for method in ("exact", "finite_difference"):
        out, tangent = jvp(lambda a, b: torch.sin(a) * b**2, (x, t), (v, w), method=method, eps=1e-5)
        torch.testing.assert_close(out, torch.sin(x) * t**2)
        torch.testing.assert_close(tangent, expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["wan", "unet2d"])
def test_exact_and_finite_difference_jvp_agree_on_diffusers_models(kind):
    if kind == "wan":
        den, shape = Denoiser(T.tiny_wan_transformer()), (2, 16, 2, 8, 8)
    else:
        den, shape = Denoiser(T.tiny_unet2d(), vp_from_betas(), "epsilon"), (2, 1, 8, 8)
    cond = T.tiny_cond(kind, 2)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t, dt = torch.tensor([0.4, 0.6]), torch.ones(2)  # the full (x, t) tangent of sCM / MeanFlow
    eps = 3e-5

    def f(x_t, time):
        return den(x_t, time, cond, target="x0")

    out_e, jvp_e = jvp(f, (x, t), (v, dt), method="exact")
    out_f, jvp_f = jvp(f, (x, t), (v, dt), method="finite_difference", eps=eps)
    torch.testing.assert_close(out_e, out_f, atol=1e-5, rtol=1e-5)
    assert _rel(jvp_f, jvp_e) < 1e-3
    # The exact JVP's primal keeps the graph to the parameters (losses backprop through it).
    out_e.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in den.model.parameters())


def test_jvp_bad_method():
    with pytest.raises(ValueError, match="method"):
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),), method="forward")


def test_cfg_closed_form_and_batched_call():
    cond_pred, uncond_pred = torch.full((2, 3), 2.0), torch.full((2, 3), 0.5)
    torch.testing.assert_close(apply_cfg(cond_pred, uncond_pred, 3.0), torch.full((2, 3), 5.0))
    den = Denoiser(T.tiny_sd3_transformer())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.9])
    c, u = T.tiny_cond("sd3", 2, seed=1), T.tiny_cond("sd3", 2, seed=2)
    with torch.no_grad():
        guided = guided_prediction(den, x, t, c, u, 4.0, target="flow")
        ref = den(x, t, u, target="flow") + 4.0 * (den(x, t, c, target="flow") - den(x, t, u, target="flow"))
        torch.testing.assert_close(guided, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided_prediction(den, x, t, c, u, 1.0), den(x, t, c))


def test_forward_ad_compatible_patches_nothing_global():
    """The contiguous group_norm is a torch-function mode of this thread inside the block:
    torch.nn.functional itself is never replaced, and the UNet2D forward-mode JVP (which needs it) works."""
    import torch.nn.functional as F

    from diffusers_fastgen.jvp import forward_ad_compatible

    original = F.group_norm
    with forward_ad_compatible():
        assert torch.nn.functional.group_norm is original
    assert torch.nn.functional.group_norm is original
    den = Denoiser(T.tiny_unet2d(), vp_from_betas(), "epsilon")
    x = torch.randn(2, 1, 8, 8)
    out, tangent = jvp(lambda a: den(a, torch.tensor([0.3, 0.6]), T.tiny_cond("unet2d", 2)), (x,), (torch.ones_like(x),))
    assert torch.isfinite(tangent).all() and tangent.abs().sum() > 0
