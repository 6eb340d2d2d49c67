"""MeanFlow targets on Gaussian data, where the average velocity is known in closed form.

x ~ N(0, s^2 I), z_t = (1 - t) x + t eps. Then sigma_t^2 = (1 - t)^2 s^2 + t^2, the velocity field is
v*(z, t) = a(t) z with a(t) = (t - (1 - t) s^2) / sigma_t^2 = d/dt log sigma_t, the ODE keeps z / sigma_t
fixed, so z_r = (sigma_r / sigma_t) z_t and u*(z, r, t) = z (1 - sigma_r / sigma_t) / (t - r).
"""

import pytest
import torch

from diffusers_fastgen.losses.meanflow import meanflow_loss, meanflow_target

S = 0.7  # data standard deviation


def sigma(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def v_star(z, t):
    return ((t - (1 - t) * S**2) / sigma(t) ** 2).view(-1, 1) * z


def u_star(z, r, t):
    return ((1 - sigma(r) / sigma(t)) / (t - r)).view(-1, 1) * z


def _batch(n=5, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 0.2 + 0.75 * torch.rand(n, generator=g, dtype=torch.float64)
    r = t * torch.rand(n, generator=g, dtype=torch.float64) * 0.9
    return torch.randn(n, d, generator=g, dtype=torch.float64), r, t


@pytest.mark.parametrize("method,eps", [("exact", 3e-5), ("finite_difference", 1e-6)])
def test_target_equals_closed_form_average_velocity(method, eps):
    """With the exact u and v, the MeanFlow identity holds: u_tgt = u*."""
    z, r, t = _batch()
    u, u_tgt = meanflow_target(u_star, z, r, t, v_star(z, t), jvp_method=method, eps=eps)
    torch.testing.assert_close(u, u_star(z, r, t))
    torch.testing.assert_close(u_tgt, u_star(z, r, t), rtol=1e-7, atol=1e-8)
    loss, aux = meanflow_loss(u_star, z, r, t, v_star(z, t), jvp_method=method, eps=eps)
    assert loss.shape == (5,) and float(aux["mse"].max()) < 1e-14


def test_data_velocity_target_is_unbiased():
    """Training from data uses v = eps - x; averaged over the posterior of (x, eps) given z_t the target is u*."""
    n, d = 40000, 2
    t, r = torch.full((n,), 0.6, dtype=torch.float64), torch.full((n,), 0.15, dtype=torch.float64)
    z = torch.tensor([[0.8, -1.3]], dtype=torch.float64).expand(n, d)
    g = torch.Generator().manual_seed(1)
    var_t = sigma(t[0]) ** 2
    mean_x, std_x = (1 - t[0]) * S**2 / var_t * z, (S**2 * t[0] ** 2 / var_t).sqrt()
    x = mean_x + std_x * torch.randn(n, d, generator=g, dtype=torch.float64)  # x | z_t
    eps = (z - (1 - t[0]) * x) / t[0]
    _, u_tgt = meanflow_target(u_star, z, r, t, eps - x)
    torch.testing.assert_close(u_tgt.mean(0), u_star(z[:1], r[:1], t[:1])[0], rtol=0, atol=0.02)
    assert float(u_tgt.std(0).min()) > 0.1  # the single-sample target is noisy; only its mean is exact


def test_adaptive_weight():
    z, r, t = _batch(n=3, d=4, seed=2)
    off = torch.tensor([0.0, 0.1, 1.0], dtype=torch.float64).view(-1, 1)

    def u_fn(zz, rr, tt):
        return u_star(zz, rr, tt) + off

    for p in (0.0, 0.5, 1.0):
        loss, aux = meanflow_loss(u_fn, z, r, t, v_star(z, t), adaptive_p=p, adaptive_c=1e-3)
        mse = off.view(-1) ** 2  # the offset is constant in (z, t), so the target stays u*
        torch.testing.assert_close(aux["mse"], mse, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(loss, mse / (mse + 1e-3) ** p, rtol=1e-6, atol=1e-12)


def test_finite_difference_stencil_is_one_sided_at_r_zero_and_t_max_and_warmup():
    """The finite-difference stencil along (v, 1) is central inside [max(r, 0), t_max], forward from t where
    t - eps would cross below r or 0, backward to t where t + eps would pass t_max (the reference's rule), and
    the network is never evaluated outside that interval; warmup = 0 gives v itself.

    Closed form, seeded, float64: along the trajectory s -> (z + s v, t + s) this u is the cubic
    f(s) = 0.5 (z + s v)^2 + (t + s)^2 (z + s v), and each quotient is checked against f evaluated by hand.
    (The old centred-at-min(t, t_max - eps) stencil, and a central stencil crossing below r, both fail this.)"""
    g = torch.Generator().manual_seed(0)
    eps = 0.2
    # central (t = 0.5, r = 0.1), forward (t - r < eps), forward (t < eps, r = 0), backward (t = t_max = 1),
    # and r = t (the derivative term vanishes; must stay finite)
    t = torch.tensor([0.5, 0.5, 0.1, 1.0, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.4, 0.0, 0.0, 0.3], dtype=torch.float64)
    z = torch.randn(5, 3, dtype=torch.float64, generator=g)
    v = torch.randn(5, 3, dtype=torch.float64, generator=g)
    seen = []

    def u_fn(z_, r_, t_):
        seen.append(t_.clone())
        return 0.5 * z_ ** 2 + (t_ ** 2).view(-1, 1) * z_

    def f(i, step):  # u at step `step` along the trajectory of sample i
        zz, tt = z[i] + step * v[i], t[i] + step
        return 0.5 * zz ** 2 + tt ** 2 * zz

    _, tgt = meanflow_target(u_fn, z, r, t, v, jvp_method="finite_difference", eps=eps, t_max=1.0)
    quotients = [(f(0, eps) - f(0, -eps)) / (2 * eps), (f(1, eps) - f(1, 0)) / eps, (f(2, eps) - f(2, 0)) / eps,
                 (f(3, 0) - f(3, -eps)) / eps]
    for i, q in enumerate(quotients):
        torch.testing.assert_close(tgt[i], v[i] - (t[i] - r[i]) * q, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tgt[4], v[4])  # r = t: plain v, finite
    stencil = torch.stack(seen[1:])  # the two stencil evaluations (the first call is the prediction)
    assert bool((stencil >= r.clamp(min=0) - 1e-12).all()) and bool((stencil <= 1.0 + 1e-12).all())
    _, tgt0 = meanflow_target(u_fn, z, r, t, v, jvp_method="finite_difference", eps=eps, t_max=1.0, warmup=0.0)
    torch.testing.assert_close(tgt0, v)
