import math

import pytest
import torch

from diffusers_fastgen.losses import denoising_loss, kd_loss
from diffusers_fastgen.losses.distribution_matching import (
    approx_r1_loss,
    dmd_generator_loss,
    f_divergence_weight,
    gan_discriminator_loss,
    gan_generator_loss,
)
from diffusers_fastgen.parametrization import RectifiedFlow, vp_from_betas


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_dmd_gradient_is_normalised_score_difference():
    x = _t(3, 1, 4, 4).requires_grad_(True)
    real, fake = _t(3, 1, 4, 4, seed=1), _t(3, 1, 4, 4, seed=2)
    dmd_generator_loss(x, real, fake).sum().backward()
    w = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / w / 16  # d/dx of 0.5 * mean over 16 elements
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-7)


def test_dmd_gradient_zero_when_fake_equals_teacher():
    x = _t(4, 2, 3, 3).requires_grad_(True)
    real = _t(4, 2, 3, 3, seed=5)
    loss = dmd_generator_loss(x, real, real.clone())
    loss.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(loss) == 0


def test_gan_losses_closed_forms():
    logits = torch.tensor([[0.0], [2.0]])
    torch.testing.assert_close(gan_generator_loss(logits), torch.tensor([math.log(2), math.log1p(math.exp(-2))]))
    d = gan_discriminator_loss(torch.tensor([[1.0]]), torch.tensor([[-1.0]]))
    torch.testing.assert_close(d, torch.tensor([2 * math.log1p(math.exp(-1))]))
    torch.testing.assert_close(approx_r1_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.5, 1.0]])),
                               torch.tensor([(0.25 + 1.0) / 2]))


def test_f_divergence_weights():
    logits = torch.log(torch.tensor([[1.0], [3.0]]))  # r = 1, 3
    torch.testing.assert_close(f_divergence_weight(logits, "reverse_kl"), torch.ones(2))
    torch.testing.assert_close(f_divergence_weight(logits, "kl"), torch.tensor([0.5, 1.5]))
    js = torch.tensor([0.5, 0.75])
    torch.testing.assert_close(f_divergence_weight(logits, "js"), js / js.mean())
    with pytest.raises(ValueError, match="divergence"):
        f_divergence_weight(logits, "tv")


def test_denoising_loss_targets():
    x0, eps, t = _t(2, 1, 2, 2), _t(2, 1, 2, 2, seed=1), torch.tensor([0.2, 0.7])
    # RF flow target eps - x0: a perfect prediction has zero loss, an offset of 1 has loss 1.
    rf = RectifiedFlow()
    torch.testing.assert_close(denoising_loss(eps - x0, x0, eps, t, process=rf, prediction_type="flow"), torch.zeros(2))
    torch.testing.assert_close(denoising_loss(eps - x0 + 1, x0, eps, t, process=rf, prediction_type="flow"), torch.ones(2))
    vp = vp_from_betas()
    torch.testing.assert_close(denoising_loss(eps, x0, eps, t, process=vp, prediction_type="eps"), torch.zeros(2))
    w = torch.tensor([2.0, 3.0])
    torch.testing.assert_close(denoising_loss(eps + 1, x0, eps, t, process=vp, prediction_type="eps", weight=w), w)


def test_kd_loss_stops_gradient_to_target():
    s, target = _t(2, 3).requires_grad_(True), _t(2, 3, seed=1).requires_grad_(True)
    kd_loss(s, target).sum().backward()
    assert target.grad is None
    torch.testing.assert_close(s.grad, 2 * (s - target).detach() / 3)


def test_ladd_hinge_losses_closed_forms():
    from diffusers_fastgen.losses.distribution_matching import ladd_discriminator_loss, ladd_generator_loss

    real = [torch.tensor([[0.5], [2.0]]), torch.tensor([[-1.0, 1.0], [0.0, 0.0]])]
    fake = [torch.tensor([[-2.0], [0.5]]), torch.tensor([[0.0, -3.0], [1.0, 1.0]])]
    # head 1: relu(1 - r) + relu(1 + f) = [0.5 + 0, 0 + 1.5]; head 2 (means over 2 logits): [(2+0)/2 + (1+0)/2, 1 + 2]
    torch.testing.assert_close(ladd_discriminator_loss(real, fake), torch.tensor([0.5 + 1.5, 1.5 + 3.0]))
    torch.testing.assert_close(ladd_generator_loss(fake), torch.tensor([2.0 + 1.5, -0.5 - 1.0]))
    with pytest.raises(ValueError, match="one real and one fake"):
        ladd_discriminator_loss(real, fake[:1])
