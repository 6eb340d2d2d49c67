"""The distribution-matching step functions (DMD2, f-distill, LADD) run on every adapter architecture at
tiny scale, each update touches only its own player's parameters (the teacher never changes), and the
one-pass GAN generator term equals the two-forward reference."""

import copy

import pytest
import torch

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.parametrization import vp_from_betas
from diffusers_fastgen.testing import tiny as T

from diffusers_fastgen.training import distribution_matching as dmd2

CASES = {
    "unet2d": (lambda: T.tiny_unet2d(), (2, 1, 8, 8), dict(process=vp_from_betas(), prediction_type="epsilon")),
    "sd": (lambda: T.tiny_unet2d_condition(), (2, 4, 8, 8), dict(process=vp_from_betas(), prediction_type="epsilon")),
    "sd3": (lambda: T.tiny_sd3_transformer(), (2, 4, 8, 8), {}),
    "flux": (lambda: T.tiny_flux_transformer(), (2, 4, 8, 8), {}),
    "wan": (lambda: T.tiny_wan_transformer(), (2, 16, 2, 8, 8), {}),
}


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, model):
    return sum(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", list(CASES))
def test_dmd2_steps_touch_only_their_player(kind):
    build, shape, kw = CASES[kind]
    teacher_model = build().requires_grad_(False)
    student_model, fake_model = copy.deepcopy(teacher_model).requires_grad_(True), copy.deepcopy(teacher_model).requires_grad_(True)
    teacher, student, fake = (Denoiser(m, **kw) for m in (teacher_model, student_model, fake_model))
    cond, uncond = T.tiny_cond(kind, 2, seed=1), T.tiny_cond(kind, 2, seed=2)
    opt_s = torch.optim.SGD(student_model.parameters(), lr=0.1)
    opt_f = torch.optim.SGD(fake_model.parameters(), lr=0.1)
    snaps = {n: _snapshot(m) for n, m in (("teacher", teacher_model), ("student", student_model), ("fake", fake_model))}
    torch.manual_seed(0)
    noise = torch.randn(shape)
    t = torch.full((2,), 0.999)

    # Fake-score step: only the fake score moves.
    loss = dmd2.fake_score_step(student, fake, noise, t, cond)
    loss.backward()
    assert all(p.grad is None for p in student_model.parameters())
    opt_f.step()
    opt_f.zero_grad(set_to_none=True)
    assert _changed(snaps["fake"], fake_model) > 0
    assert _changed(snaps["student"], student_model) == 0 and _changed(snaps["teacher"], teacher_model) == 0

    # Student step (with CFG in the teacher): only the student moves.
    snaps["fake"] = _snapshot(fake_model)
    loss = dmd2.student_step(student, teacher, fake, noise, t, cond, uncond, guidance_scale=2.0, t_min=0.02, t_max=0.98)
    assert torch.isfinite(loss) and loss > 0  # fake moved away from the teacher, so the DMD gradient is non-zero
    loss.backward()
    assert all(p.grad is None for p in fake_model.parameters())
    opt_s.step()
    assert _changed(snaps["student"], student_model) > 0
    assert _changed(snaps["fake"], fake_model) == 0 and _changed(snaps["teacher"], teacher_model) == 0


@pytest.mark.parametrize("kind,module", [("unet2d", "mid_block"), ("wan", "blocks.0")])
def test_dmd2_gan_branch_steps(kind, module):
    """With the GAN branch the critic step trains fake score + head, the student step trains the student."""
    from diffusers_fastgen.models.discriminator import head_for_features
    from diffusers_fastgen.models.features import run_until_tap

    build, shape, kw = CASES[kind]
    teacher_model = build().requires_grad_(False)
    student_model, fake_model = copy.deepcopy(teacher_model).requires_grad_(True), copy.deepcopy(teacher_model).requires_grad_(True)
    teacher, student, fake = (Denoiser(m, **kw) for m in (teacher_model, student_model, fake_model))
    cond, uncond = T.tiny_cond(kind, 2, seed=1), T.tiny_cond(kind, 2, seed=2)
    torch.manual_seed(0)
    noise, real = torch.randn(shape), torch.randn(shape)
    t = torch.full((2,), 0.999)
    with torch.no_grad():
        head = head_for_features(run_until_tap(fake, noise, t, cond, module))
    head_before = _snapshot(head)
    loss = dmd2.fake_score_step(student, fake, noise, t, cond, real_x0=real, head=head, disc_weight=1.0,
                                feature_module=module, r1_weight=1.0)
    loss.backward()
    assert all(p.grad is None for p in student_model.parameters())
    assert all(p.grad is not None for p in head.parameters())
    student_before = _snapshot(student_model)
    fake_model.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    loss = dmd2.student_step(student, teacher, fake, noise, t, cond, uncond, guidance_scale=1.0, t_min=0.02,
                             t_max=0.98, head=head, gan_weight=1.0, feature_module=module)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_model.parameters())
    torch.optim.SGD(student_model.parameters(), lr=0.1).step()
    assert _changed(student_before, student_model) > 0 and _changed(head_before, head) == 0
