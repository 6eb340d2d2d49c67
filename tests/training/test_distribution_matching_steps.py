"""The distribution-matching step functions (DMD2, f-distill, LADD) run on every adapter architecture at
tiny scale, each update touches only its own player's parameters (the teacher never changes), and the
one-pass GAN generator term equals the two-forward reference."""

import copy

import pytest
import torch

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.parametrization import vp_from_betas
from diffusers_fastgen.testing import tiny as T
from diffusers_fastgen.training import distribution_matching_steps as dmd2

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
    student_model = copy.deepcopy(teacher_model).requires_grad_(True)
    fake_model = copy.deepcopy(teacher_model).requires_grad_(True)
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
    student_model = copy.deepcopy(teacher_model).requires_grad_(True)
    fake_model = copy.deepcopy(teacher_model).requires_grad_(True)
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


def _unet_players():
    build, shape, kw = CASES["unet2d"]
    teacher_model = build().requires_grad_(False)
    student_model = copy.deepcopy(teacher_model).requires_grad_(True)
    fake_model = copy.deepcopy(teacher_model).requires_grad_(True)
    with torch.no_grad():  # make the fake score differ from the teacher so the DMD gradient is non-zero
        for p in fake_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher, student, fake = (Denoiser(m, **kw) for m in (teacher_model, student_model, fake_model))
    return (teacher_model, student_model, fake_model), (teacher, student, fake), shape


@pytest.mark.parametrize("divergence,gan_weight", [("reverse_kl", 0.5), ("js", 0.5), ("kl", 0.0)])
def test_one_pass_student_step_equals_two_forward_reference(divergence, gan_weight):
    """The step's single fake forward (graph cut at the tap, critic frozen) gives the same loss and the
    same student gradients as an independent reference: a no-grad fake forward for x0_fake plus a second
    forward cut at the tap for the head's logits, with h(r)-weighted DMD + GAN terms written out."""
    from diffusers_fastgen.guidance import guided_prediction
    from diffusers_fastgen.losses.distribution_matching import dmd_generator_loss, f_divergence_weight, gan_generator_loss
    from diffusers_fastgen.models.discriminator import head_for_features
    from diffusers_fastgen.models.features import run_until_tap
    from diffusers_fastgen.parametrization import add_noise
    from diffusers_fastgen.timesteps import sample_uniform

    (_, student_model, fake_model), (teacher, student, fake), shape = _unet_players()
    cond, uncond = T.tiny_cond("unet2d", 2, seed=1), T.tiny_cond("unet2d", 2, seed=2)
    noise, t = torch.randn(shape, generator=torch.Generator().manual_seed(3)), torch.full((2,), 0.999)
    with torch.no_grad():
        head = head_for_features(run_until_tap(fake, noise, t, cond, "mid_block"))
    critic = list(fake_model.parameters()) + list(head.parameters())

    torch.manual_seed(0)
    loss = dmd2.student_step(student, teacher, fake, noise, t, cond, uncond, guidance_scale=2.0, t_min=0.02,
                             t_max=0.98, head=head, gan_weight=gan_weight, divergence=divergence, critic_params=critic)
    loss.backward()
    grads = [p.grad.clone() for p in student_model.parameters()]
    assert all(p.grad is None for p in critic) and all(p.requires_grad for p in critic)
    student_model.zero_grad(set_to_none=True)

    torch.manual_seed(0)  # the reference draws s and the noise in the same order
    x0 = student(noise, t, cond)
    s = sample_uniform((2,), t_min=0.02, t_max=0.98)
    noisy = add_noise(student.process, x0, torch.randn_like(x0), s)
    with torch.no_grad():
        x0_teacher = guided_prediction(teacher, noisy, s, cond, uncond, 2.0)
        x0_fake = fake(noisy, s, cond)
    logits = head(run_until_tap(fake, noisy if gan_weight else noisy.detach(), s, cond, "mid_block"))
    ref = f_divergence_weight(logits, divergence, s) * dmd_generator_loss(x0, x0_teacher, x0_fake)
    ref = (ref + gan_weight * gan_generator_loss(logits)).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for g, p in zip(grads, student_model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_ladd_steps_train_only_their_player():
    from diffusers_fastgen.training.distribution_matching_steps import make_heads

    (teacher_model, student_model, _), (teacher, student, _), shape = _unet_players()
    cond = T.tiny_cond("unet2d", 2, seed=1)
    taps = ["down_blocks.0", "mid_block"]
    heads = make_heads(teacher, taps, T.tiny_cond("unet2d", 1), shape[1:])
    noise, real, t = torch.randn(shape), torch.randn(shape), torch.ones(2)
    teacher_before = _snapshot(teacher_model)

    loss = dmd2.ladd_discriminator_step(student, teacher, heads, noise, t, cond, real, feature_modules=taps)
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters())
    # (the last bias gets -1 + 1 = 0 while both hinges are active: real and fake pull it equally)
    assert all(p.grad.abs().sum() > 0 for n, p in heads.named_parameters() if n.endswith("weight"))
    assert all(p.grad is None for p in student_model.parameters())
    heads.zero_grad(set_to_none=True)

    loss = dmd2.ladd_student_step(student, teacher, heads, noise, t, cond, feature_modules=taps)
    loss.backward()
    assert all(p.grad is None for p in heads.parameters()) and all(p.requires_grad for p in heads.parameters())
    assert sum(p.grad.abs().sum() for p in student_model.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in teacher_model.parameters())
    assert _changed(teacher_before, teacher_model) == 0


def _lora_players(checkpointing: bool):
    from diffusers_fastgen.models.digits import digits_unet
    from diffusers_fastgen.parametrization import RectifiedFlow
    from diffusers_fastgen.training.distribution_matching_steps import build_players, player_denoisers

    torch.manual_seed(0)
    modules, params = build_players(digits_unet((16, 32), layers_per_block=1), lora_rank=4)
    with torch.no_grad():  # adapters that differ from the base, so the adapter in use matters
        for name, p in modules["base"].named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if checkpointing:
        modules["base"].enable_gradient_checkpointing()
    modules["base"].train()
    return modules, params, player_denoisers(modules, RectifiedFlow(), "flow")


@pytest.mark.parametrize("step", ["dmd2_gan", "ladd"])
def test_lora_gradient_checkpointing_gives_the_same_student_gradients(step):
    """With gradient checkpointing, blocks are recomputed in backward: the student adapter must be the
    active one then (the teacher / fake-score calls switch adapters on the shared base), and frozen
    critics must not be recomputed after their requires_grad was restored."""
    from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
    from diffusers_fastgen.models.discriminator import conv_head
    from diffusers_fastgen.training.distribution_matching_steps import make_heads

    grads = []
    for checkpointing in (False, True):
        modules, params, nets = _lora_players(checkpointing)
        y = torch.tensor([1, 2, 3, 4])
        cond, uncond = digits_cond(y), digits_cond(torch.full_like(y, NULL_CLASS))
        x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.ones(4)
        torch.manual_seed(2)
        if step == "dmd2_gan":
            head = conv_head(32)
            loss = dmd2.student_step(nets["student"], nets["teacher"], nets["fake_score"], x, t, cond, uncond,
                                     guidance_scale=2.0, t_min=0.02, t_max=0.98, head=head, gan_weight=0.5,
                                     critic_params=params["fake_score"] + list(head.parameters()))
        else:
            heads = make_heads(nets["teacher"], ["down_blocks.0", "mid_block"], digits_cond(y[:1]), (1, 8, 8))
            loss = dmd2.ladd_student_step(nets["student"], nets["teacher"], heads, x, t, cond,
                                          feature_modules=["down_blocks.0", "mid_block"])
        loss.backward()
        grads.append([p.grad.clone() for p in params["student"]])
        assert all(p.grad is None for p in params["fake_score"])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)
