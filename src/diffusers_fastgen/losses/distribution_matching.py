"""Distribution matching losses: DMD / DMD2, the fake-score loss, GAN terms, f-distill weights.

Time convention: RF, t = 0 data, x_t = (1 - t) x0 + t eps. All losses are per-sample (B,), fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dmd_generator_loss(x0_student: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's distribution matching loss (Yin et al. arXiv:2311.18828 eq. 7-8; DMD2 arXiv:2405.14867).

    The gradient of KL(p_student || p_data) w.r.t. a student sample x, estimated at a noised copy
    x_t, is  (x0_fake(x_t) - x0_teacher(x_t)) / w  with the per-sample normaliser
    w = mean |x - x0_teacher(x_t)| (eq. 8), floored at 1e-6 (DMD2's code divides by the plain mean; the floor
    only acts when a sample equals the teacher's prediction to 1e-6 on average, where the plain ratio is 0/0
    or a huge step). We return  0.5 || x - sg(x - grad) ||^2 / D,  whose
    gradient w.r.t. x is exactly grad / D (D = elements per sample). x0_teacher may include CFG.

    Shapes: all (B, ...). x0_teacher and x0_fake are stop-gradient (detached here).
    """
    x = x0_student.float()
    real, fake = x0_teacher.detach().float(), x0_fake.detach().float()
    with torch.no_grad():
        weight = (x - real).abs().flatten(1).mean(1).clamp_min(1e-6)  # (B,)
        grad = (fake - real) / weight.view(-1, *([1] * (x.ndim - 1)))
        target = x - grad
    return 0.5 * (x - target).square().flatten(1).mean(1)


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss softplus(-D(fake)) (Goodfellow et al. 2014), mean over logits -> (B,)."""
    return F.softplus(-logits_fake.float()).flatten(1).mean(1)


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """softplus(-D(real)) + softplus(D(fake)), per sample (B,). logits_fake comes from detached samples."""
    return F.softplus(-logits_real.float()).flatten(1).mean(1) + F.softplus(logits_fake.float()).flatten(1).mean(1)


def approx_r1_loss(logits_real: torch.Tensor, logits_real_perturbed: torch.Tensor) -> torch.Tensor:
    """Approximate R1 (APT, Lin et al. arXiv:2501.08316): || D(x_real) - D(x_real + sigma n) ||^2
    penalises the discriminator's sensitivity around real data without a double backward. (B,)."""
    return (logits_real.float() - logits_real_perturbed.float()).square().flatten(1).mean(1)


F_DIVERGENCES = ("reverse_kl", "kl", "js", "squared_hellinger", "jeffreys")


def f_divergence_weight(logits: torch.Tensor, divergence: str, t: torch.Tensor | None = None, *,
                        ratio_range: tuple[float, float] = (0.1, 20.0), num_bins: int = 10,
                        all_reduce=None) -> torch.Tensor:
    """Per-sample weight h(r) = f''(r) r^2 of the DMD gradient for D_f(p_data || p_student)
    (f-distill, Xu et al. arXiv:2502.15681), r = p_data / p_student = exp(D(x_t)) read from a
    discriminator logit trained with `gan_discriminator_loss` (its optimum is D = log r).

    f(r) and h(r):  reverse_kl  -log r           -> 1 (plain DMD)
                    kl          r log r          -> r
                    js          r log r - (r+1) log((r+1)/2) -> r / (r + 1)
                    squared_hellinger (sqrt r - 1)^2 -> sqrt(r) / 2
                    jeffreys    (r - 1) log r    -> r + 1

    As the reference implementation does: r is clipped to `ratio_range` (so no single sample of a KL or
    Jeffreys batch takes nearly all the weight), and h is divided by its mean over the samples in the same
    time bin (`t`, the noise level each sample was scored at, in `num_bins` equal bins of [0, 1]; t None:
    one bin), the bin sums and counts summed over ranks by `all_reduce` (an in-place sum, e.g.
    torch.distributed.all_reduce) when given. Returns (B,), detached."""
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {F_DIVERGENCES}, got {divergence!r}.")
    if not 0 < ratio_range[0] < ratio_range[1]:
        raise ValueError(f"`ratio_range` must be (low, high) with 0 < low < high, got {ratio_range}.")
    if num_bins < 1:
        raise ValueError(f"`num_bins` must be >= 1, got {num_bins}.")
    log_r = logits.detach().float().flatten(1).mean(1)  # (B,)
    r = log_r.clamp(math.log(ratio_range[0]), math.log(ratio_range[1])).exp()
    h = {
        "reverse_kl": torch.ones_like(r),
        "kl": r,
        "js": r / (1 + r),
        "squared_hellinger": 0.5 * r.sqrt(),
        "jeffreys": r + 1,
    }[divergence]
    if t is None:
        bins = torch.zeros(h.shape, dtype=torch.long, device=h.device)
    else:
        bins = (t.detach().float().reshape(-1).clamp(0, 1) * num_bins).long().clamp_max(num_bins - 1)
    sums = torch.zeros(num_bins, device=h.device).index_add_(0, bins, h)
    counts = torch.zeros(num_bins, device=h.device).index_add_(0, bins, torch.ones_like(h))
    if all_reduce is not None:
        all_reduce(sums)
        all_reduce(counts)
    return h / (sums / counts.clamp_min(1)).clamp_min(1e-8)[bins]


def ladd_generator_loss(logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """LADD / ADD generator loss (Sauer et al. arXiv:2403.12015, arXiv:2311.17042):  - sum_k mean D_k(fake),
    summed over the discriminator heads k (one per tapped teacher block). Each logits (B, ...) -> (B,)."""
    return sum(-l.float().flatten(1).mean(1) for l in logits_fake)


def ladd_discriminator_loss(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor]) -> torch.Tensor:
    """Hinge discriminator loss summed over heads (ADD eq. 3, LADD):
    sum_k  mean relu(1 - D_k(real)) + mean relu(1 + D_k(fake)); fake logits from detached samples. (B,)."""
    if len(logits_real) != len(logits_fake):
        raise ValueError(f"one real and one fake logit tensor per head: got {len(logits_real)} and {len(logits_fake)}.")
    return sum(F.relu(1 - r.float()).flatten(1).mean(1) + F.relu(1 + f.float()).flatten(1).mean(1)
               for r, f in zip(logits_real, logits_fake))
