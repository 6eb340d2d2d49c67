
"""Consistency targets on Gaussian data (EDM / VE time, x_t = x0 + t eps, x0 ~ N(0, s^2 I)).

The exact denoiser is D*(x, t) = s^2 / (s^2 + t^2) x; the PF-ODE keeps x / sqrt(s^2 + t^2) fixed, so the
exact consistency function is f*(x, t) = s x / sqrt(s^2 + t^2).
"""

import math

import pytest
import torch

from diffusers_fastgen.losses.consistency import consistency_loss, consistency_pair, ddim_step, pseudo_huber, tcm_loss
from diffusers_fastgen.parametrization import EDM
from diffusers_fastgen.timesteps import sample_t_r_ect

S = 0.5
edm = EDM(sigma_data=S)


def f_star(x, t):
    return (S / (S**2 + t**2).sqrt()).view(-1, 1) * x


def d_star(x, t):
    return (S**2 / (S**2 + t**2)).view(-1, 1) * x


def test_pseudo_huber_closed_form():
    a, b = torch.tensor([[3.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)
    torch.testing.assert_close(pseudo_huber(a, b, c=4.0), torch.tensor([1.0, 0.0]))  # sqrt(9 + 16) - 4
    torch.testing.assert_close(pseudo_huber(a, b), torch.tensor([math.sqrt(9 + (0.00054 * math.sqrt(2)) ** 2)
                                                                 - 0.00054 * math.sqrt(2), 0.0]))


def test_exact_ode_pair_has_zero_loss_and_weight():
    x_t = torch.randn(4, 3, dtype=torch.float64)
    t, r = torch.tensor([2.0, 1.0, 0.5, 0.1], dtype=torch.float64), torch.tensor([1.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    x_r = ((S**2 + r**2).sqrt() / (S**2 + t**2).sqrt()).view(-1, 1) * x_t  # exact ODE
    torch.testing.assert_close(consistency_loss(f_star(x_t, t), f_star(x_r, r), t, r, huber_c=1e-3),
                               torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    off = f_star(x_r, r) + torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(consistency_loss(f_star(x_t, t), off, t, r, huber_c=4.0), 1.0 / (t - r))
    # r < t is the samplers' guarantee (the loss does not sync the device to check it).
    t_s, r_s = sample_t_r_ect((4096,), iteration=0, total_iterations=10, generator=torch.Generator().manual_seed(0))
    assert bool((r_s < t_s).all())


def test_distillation_step_converges_to_the_ode():
    """One DDIM step with the exact denoiser is a first-order ODE step: error O((t - r)^2)."""
    x_t = torch.randn(6, 3, dtype=torch.float64)
    t = torch.full((6,), 1.0, dtype=torch.float64)
    errors = []
    for gap in (0.1, 0.05, 0.025):
        r = t - gap
        exact = ((S**2 + r**2).sqrt() / (S**2 + t**2).sqrt()).view(-1, 1) * x_t
        errors.append(float((ddim_step(edm, x_t, d_star(x_t, t), t, r) - exact).abs().max()))
    assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5  # second order per step


def test_training_target_mean_is_the_ddim_step_target():
    """Same-noise pairs: given x_t, E[f*(x_r, r)] = f*(DDIM step with the exact denoiser) (f* is linear and
    E[x0 | x_t] = D*, E[eps | x_t] = (x_t - D*) / t)."""
    n = 40000
    t, r = torch.full((n,), 1.2, dtype=torch.float64), torch.full((n,), 0.9, dtype=torch.float64)
    x_t = torch.tensor([[0.7, -1.1]], dtype=torch.float64).expand(n, 2)
    g = torch.Generator().manual_seed(0)
    post_var = S**2 * 1.2**2 / (S**2 + 1.2**2)
    x0 = d_star(x_t, t) + math.sqrt(post_var) * torch.randn(n, 2, generator=g, dtype=torch.float64)  # x0 | x_t
    eps = (x_t - x0) / 1.2
    a, b = consistency_pair(edm, x0, eps, t, r)
    torch.testing.assert_close(a, x_t)
    target = f_star(b, r).mean(0)
    expected = f_star(ddim_step(edm, x_t[:1], d_star(x_t[:1], t[:1]), t[:1], r[:1]), r[:1])[0]
    torch.testing.assert_close(target, expected, rtol=0, atol=0.01)


def test_tcm_loss_takes_the_stage1_target_below_the_boundary():
    """Pairs with r < t' regress on the frozen stage-1 output (weight w_b), the others on the network's own."""
    f_t = torch.zeros(3, 4, dtype=torch.float64)
    f_r = torch.full((3, 4), 1.0, dtype=torch.float64)
    f_r_stage1 = torch.full((3, 4), 2.0, dtype=torch.float64)
    t = torch.tensor([0.5, 0.6, 0.9], dtype=torch.float64)
    r = torch.tensor([0.3, 0.45, 0.7], dtype=torch.float64)  # t' = 0.4: only the first pair crosses it
    loss = tcm_loss(f_t, f_r, f_r_stage1, t, r, t_boundary=0.4, boundary_weight=3.0, huber_c=0.0)
    expected = torch.tensor([3.0 * 4.0 / 0.2, 2.0 / 0.15, 2.0 / 0.2], dtype=torch.float64)  # ||.|| = 2 sqrt(c^2)
    torch.testing.assert_close(loss, expected)


def test_tcm_batch_loss_averages_boundary_and_ordinary_pairs_separately():
    """TCM's reduction: mean over ordinary pairs + w x mean over boundary pairs (each over its own count); the pooled
    one (the first version) weights boundary pairs by w inside one batch mean; an absent group adds 0."""
    from diffusers_fastgen.losses.consistency import tcm_batch_loss

    per = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64)
    below = torch.tensor([False, False, False, True, True])
    torch.testing.assert_close(tcm_batch_loss(per, below, boundary_weight=0.1),
                               torch.tensor((1 + 2 + 3) / 3 + 0.1 * (4 + 10) / 2, dtype=torch.float64))
    torch.testing.assert_close(tcm_batch_loss(per, below, boundary_weight=0.1, reduction="pooled"),
                               torch.tensor((1 + 2 + 3 + 0.1 * 14) / 5, dtype=torch.float64))
    torch.testing.assert_close(tcm_batch_loss(per, torch.zeros(5, dtype=torch.bool), boundary_weight=0.1), per.mean())
    with pytest.raises(ValueError, match="reduction"):
        tcm_batch_loss(per, below, boundary_weight=0.1, reduction="sum")


def test_ect_weight_is_taken_in_the_noise_ratio():
    """ECT weights d(f_t, f_r) by 1 / (sigma_t - sigma_r) in the EDM noise ratio (the reference), not by the
    process-time gap: on RF sigma = t / (1 - t); on a VP schedule the lowest times keep a finite weight."""
    from diffusers_fastgen.losses.consistency import noise_ratio_gap
    from diffusers_fastgen.parametrization import RectifiedFlow, vp_from_betas

    t, r = torch.tensor([0.5, 0.9, 0.2]), torch.tensor([0.25, 0.8, 0.1])
    gap = noise_ratio_gap(RectifiedFlow(), t, r)
    torch.testing.assert_close(gap, t / (1 - t) - r / (1 - r))
    off = torch.full((3, 4), 2.0)
    plain = consistency_loss(off, torch.zeros(3, 4), t, r, huber_c=0.0)  # / (t - r)
    torch.testing.assert_close(consistency_loss(off, torch.zeros(3, 4), t, r, huber_c=0.0, gap=gap), plain * (t - r) / gap)
    vp = vp_from_betas()
    t, r = torch.tensor([3e-5, 0.5]), torch.tensor([0.0, 0.4])
    gap = noise_ratio_gap(vp, t, r)
    ratio = lambda x: vp.sigma(x.double()) / vp.alpha(x.double())  # noqa: E731
    torch.testing.assert_close(gap, (ratio(t) - ratio(r)).float())
    assert float(1 / gap[0]) < 1e4 < float(1 / (t[0] - r[0]))  # the VP-time gap would weigh it 3e4
