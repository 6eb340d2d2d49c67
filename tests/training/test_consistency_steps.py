"""cm_step's target where ECT's mapping puts r at 0: the data itself (consistency training) or the teacher's ODE end
point (distillation), not the student's own estimate at t = 0 (which a VP eps-predictor only approximates)."""

import torch

from diffusers_fastgen.losses.consistency import consistency_loss
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.parametrization import add_noise, vp_from_betas
from diffusers_fastgen.testing.tiny import tiny_unet2d
from diffusers_fastgen.training.consistency_steps import cm_step, noise_ratio_gap


def test_r_zero_rows_take_the_data_as_their_target():
    torch.manual_seed(0)
    student = Denoiser(tiny_unet2d(num_class_embeds=None, in_channels=1), vp_from_betas(), "epsilon")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0.9, 0.6, 0.4, 0.3, 0.2, 0.1])
    r = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.1, 0.0])
    loss, _ = cm_step(student, x0, eps, t, r, {})
    with torch.no_grad():
        x_t, x_r = add_noise(student.process, x0, eps, t), add_noise(student.process, x0, eps, r)
        own = student(x_r, r, {})
        target = torch.where((r == 0).view(-1, 1, 1, 1), x0, own)
        f_t = student(x_t, t, {})
        gap = noise_ratio_gap(student.process, t, r)
        expected = consistency_loss(f_t, target, t, r, gap=gap).mean()
        old = consistency_loss(f_t, own, t, r, gap=gap).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert (own[r == 0] - x0[r == 0]).abs().max() > 1e-3 and abs(float(old - expected)) > 1e-6
