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


def test_f_divergence_weights_clip_the_ratio_like_the_reference():
    """r is clipped to [0.1, 20] before h: a KL batch with one huge logit no longer gives that sample ~all
    the weight (the old clamp of log r at 10 let r reach 2.2e4)."""
    logits = torch.tensor([[12.0], [0.0], [0.0], [-30.0]])  # r = e^12 (-> 20), 1, 1, ~0 (-> 0.1)
    h = torch.tensor([20.0, 1.0, 1.0, 0.1])
    torch.testing.assert_close(f_divergence_weight(logits, "kl"), h / h.mean())
    j = h + 1
    torch.testing.assert_close(f_divergence_weight(logits, "jeffreys"), j / j.mean())
    assert f_divergence_weight(logits, "kl")[0] < 4  # 20 / 5.525, was ~4 of a batch of 4 (all the weight)
    with pytest.raises(ValueError, match="ratio_range"):
        f_divergence_weight(logits, "kl", ratio_range=(1.0, 0.5))


def test_f_divergence_weights_are_normalised_per_time_bin_and_across_ranks():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # several random batches
        logits = torch.randn(64, 1, generator=g) * 2
        t = torch.rand(64, generator=g)
        w = f_divergence_weight(logits, "kl", t)
        r = logits[:, 0].clamp(math.log(0.1), math.log(20)).exp()
        bins = (t * 10).long().clamp_max(9)
        for b in bins.unique():  # each bin's weights average 1, and are r over that bin's mean r
            torch.testing.assert_close(w[bins == b].mean(), torch.tensor(1.0))
            torch.testing.assert_close(w[bins == b], r[bins == b] / r[bins == b].mean())
        # two "ranks" whose bin sums and counts are summed get the weights of the concatenated batch
        other_logits, other_t = torch.randn(64, 1, generator=g) * 2, torch.rand(64, generator=g)
        other = list(_bin_stats(other_logits, other_t))  # the other rank's (sums, counts), in call order

        def all_reduce(x):  # a SUM all-reduce over the two ranks
            x += other.pop(0)

        whole = f_divergence_weight(torch.cat([logits, other_logits]), "kl", torch.cat([t, other_t]))
        torch.testing.assert_close(f_divergence_weight(logits, "kl", t, all_reduce=all_reduce), whole[:64])
        assert not other


def _bin_stats(logits, t, num_bins=10):
    """Independent KL bin statistics: (sum of clipped r, count) per time bin."""
    r = logits[:, 0].clamp(math.log(0.1), math.log(20)).exp()
    bins = (t * num_bins).long().clamp_max(num_bins - 1)
    return (torch.zeros(num_bins).index_add_(0, bins, r), torch.zeros(num_bins).index_add_(0, bins, torch.ones_like(r)))


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
