"""sCM's tangent on Gaussian data in TrigFlow, where the consistency function is known.

x0 ~ N(0, s^2 I), x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I): v_t = cos^2 t s^2 + sin^2 t sigma_d^2,
the PF-ODE keeps x / sqrt(v_t) fixed (velocity x cos t sin t (sigma_d^2 - s^2) / v_t), the exact
consistency function is f*(x, t) = s x / sqrt(v_t) and, from f = cos t x - sin t sigma_d F(x / sigma_d, t),
F*(y, t) = y (cos t - s / sqrt(v_t)) / sin t.
"""

import pytest
import torch

from diffusers_fastgen.losses.scm import scm_loss

S, SD = 0.8, 0.5


def v(t):
    return torch.cos(t) ** 2 * S**2 + torch.sin(t) ** 2 * SD**2


def velocity(x, t):
    return (torch.cos(t) * torch.sin(t) * (SD**2 - S**2) / v(t)).view(-1, 1) * x


def F_star(y, t):
    return ((torch.cos(t) - S / v(t).sqrt()) / torch.sin(t)).view(-1, 1) * y


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, generator=g, dtype=torch.float64), torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=torch.float64)


@pytest.mark.parametrize("method,eps", [("exact", 0.0), ("finite_difference", 1e-6)])
def test_exact_consistency_function_has_zero_tangent(method, eps):
    x, t = _batch()
    loss, aux = scm_loss(F_star, x, t, velocity(x, t), sigma_d=SD, jvp_method=method, eps=eps or 3e-5)
    torch.testing.assert_close(aux["g"], torch.zeros_like(x), rtol=0, atol=1e-9)
    torch.testing.assert_close(loss, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_tangent_is_cos_t_times_total_derivative_of_f(method):
    """For a wrong F, g = cos(t) d/dt f(x(t), t) along the exact ODE (checked by a central difference)."""
    x, t = _batch()

    def F(y, tt):
        return 1.3 * F_star(y, tt) + 0.2 * torch.sin(3 * tt).view(-1, 1) * y**2

    def f(xx, tt):
        return torch.cos(tt).view(-1, 1) * xx - (torch.sin(tt) * SD).view(-1, 1) * F(xx / SD, tt)

    h = 1e-5
    def x_at(tt):  # the exact trajectory through (x, t)
        return (v(tt) / v(t)).sqrt().view(-1, 1) * x
    g_ref = torch.cos(t).view(-1, 1) * (f(x_at(t + h), t + h) - f(x_at(t - h), t - h)) / (2 * h)
    _, aux = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, jvp_method=method, eps=1e-6)
    torch.testing.assert_close(aux["g"], g_ref, rtol=1e-6, atol=1e-8)
    # warm-up 0 keeps only the first term, -cos^2 t (sigma_d F - dx/dt)
    _, aux0 = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, warmup=0.0)
    first = -(torch.cos(t) ** 2).view(-1, 1) * (SD * F(x / SD, t) - velocity(x, t))
    torch.testing.assert_close(aux0["g"], first)


def test_normalisation_and_adaptive_weight():
    x, t = _batch()

    def F(y, tt):
        return F_star(y, tt) + 0.5

    loss, aux = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, tangent_c=0.1)
    g = aux["g"]
    rms = g.square().mean(dim=1, keepdim=True).sqrt()  # the reference's RMS normalisation (default)
    torch.testing.assert_close(aux["mse"], (g / (rms + 0.1)).square().mean(1))  # F - F^- = 0 in value
    prior = 1 / (SD * torch.tan(t))  # the reference's prior weight 1 / (sigma_d tan t) (default)
    torch.testing.assert_close(loss, prior * aux["mse"])
    _, aux_l2 = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, tangent_c=0.1, tangent_norm="l2")
    torch.testing.assert_close(aux_l2["mse"], (g / (g.norm(dim=1, keepdim=True) + 0.1)).square().mean(1))
    unweighted, _ = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, tangent_c=0.1, prior_weight=False)
    torch.testing.assert_close(unweighted, aux["mse"])
    logvar = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    weighted, _ = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, tangent_c=0.1, logvar=logvar)
    torch.testing.assert_close(weighted, prior * aux["mse"] * torch.exp(-logvar) + logvar)
    with pytest.raises(ValueError, match="tangent_norm"):
        scm_loss(F, x, t, velocity(x, t), sigma_d=SD, tangent_norm="l1")
    with pytest.raises(ValueError, match="warmup"):
        scm_loss(F, x, t, velocity(x, t), sigma_d=SD, warmup=1.5)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_finite_difference_step_is_a_secant_kept_inside_t_range(eps):
    """A large `eps` takes the secant over t +- eps cos t sin t along the tangent (written out here); with
    `t_range` a sample whose stencil would leave the range takes the step that just fits, and the network is
    never evaluated outside it."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.02, 0.3, 0.8, 1.3, 1.5], dtype=torch.float64)
    seen = []

    def F(y, tt):
        seen.append(tt.detach().clone())
        return 1.3 * F_star(y, tt) + 0.2 * torch.sin(3 * tt).view(-1, 1) * y**2

    def secant(h):  # per-sample half-widths h (in units of the scaled tangent)
        a = (torch.cos(t) * torch.sin(t)).view(-1, 1) * velocity(x, t) / SD
        b = torch.cos(t) * torch.sin(t)
        hv = h.view(-1, 1)
        return (F(x / SD + hv * a, t + h * b) - F(x / SD - hv * a, t - h * b)) / (2 * hv)

    def g_from(dF):
        cos, sin = torch.cos(t).view(-1, 1), torch.sin(t).view(-1, 1)
        return -cos**2 * (SD * F(x / SD, t) - velocity(x, t)) - (cos * sin * x + SD * dF)

    _, aux = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, jvp_method="finite_difference", eps=eps)
    torch.testing.assert_close(aux["g"], g_from(secant(torch.full_like(t, eps))), rtol=1e-9, atol=1e-12)
    exact = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, jvp_method="exact")[1]["g"]
    assert (aux["g"] - exact).abs().max() > 1e-4  # the secant is not the derivative at this step

    low, high = 0.019, 1.503
    seen.clear()
    _, aux = scm_loss(F, x, t, velocity(x, t), sigma_d=SD, jvp_method="finite_difference", eps=eps, t_range=(low, high))
    evaluated = torch.cat(seen)
    assert evaluated.min() >= low - 1e-12 and evaluated.max() <= high + 1e-12
    half = eps * torch.cos(t) * torch.sin(t)
    fit = torch.minimum(t - low, high - t) / half  # the first and last samples do not fit at the full step
    assert fit[0] < 1 and fit[-1] < 1 and (fit[1:-1] >= 1).all()
    torch.testing.assert_close(aux["g"], g_from(secant(eps * fit.clamp(max=1.0))), rtol=1e-9, atol=1e-12)
