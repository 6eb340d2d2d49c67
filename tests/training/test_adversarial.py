"""The consistency scripts' adversarial term (`training.adversarial`): both losses equal LADD's losses written out
by hand on the student's own samples (1- and 2-step schedules, several draws), the generator loss moves only the
student and the heads' loss only the heads, and bad arguments are refused by name."""

import copy

import pytest
import torch
import torch.nn.functional as F

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.features import run_until_tap
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.testing import tiny as T
from diffusers_fastgen.training import AdversarialArgs, OptimizerArgs
from diffusers_fastgen.training.adversarial import add_adversarial_heads, adversarial_losses

TAPS = ["down_blocks.0", "mid_block"]


def _players():
    torch.manual_seed(0)
    teacher_model = T.tiny_unet2d().requires_grad_(False)
    student_model = copy.deepcopy(teacher_model).requires_grad_(True)
    with torch.no_grad():  # a student that differs from its teacher
        for p in student_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher, student = (Denoiser(m, RectifiedFlow(), "flow") for m in (teacher_model, student_model))
    modules, params, optimizers = {"teacher": teacher_model, "student": student_model}, {}, {}
    adv = AdversarialArgs(adv_weight=0.5, adv_feature_modules=TAPS)
    add_adversarial_heads(modules, params, optimizers, adv, teacher, T.tiny_cond("unet2d", 1), (1, 8, 8),
                          OptimizerArgs(), {"num_training_steps": 10})
    return teacher_model, student_model, teacher, student, modules["heads"], adv


def _reference(student, teacher, heads, noise, cond, real, adv, num_steps, seed):
    """LADD's two losses by hand, drawing the random numbers in the same order as the code under test."""
    torch.manual_seed(seed)
    x, t = noise, torch.ones(noise.shape[0])
    if num_steps == 2 and int(torch.randint(0, 2, ())) == 1:  # the second point: the student's own first jump
        with torch.no_grad():
            x0 = student(noise, torch.ones(noise.shape[0]), cond)
            x, t = 0.5 * x0 + 0.5 * torch.randn_like(noise), torch.full((noise.shape[0],), 0.5)
    x0 = student(x, t, cond)
    s = torch.sigmoid(adv.adv_t_mean + adv.adv_t_std * torch.randn(noise.shape[0]))  # logit-normal
    fake_in = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * torch.randn_like(x0)
    real_in = (1 - s.view(-1, 1, 1, 1)) * real + s.view(-1, 1, 1, 1) * torch.randn_like(real)
    fake_features = run_until_tap(teacher, fake_in, s, cond, TAPS)
    generator = sum(-l.flatten(1).mean(1) for l in heads(fake_features)).mean()
    real_logits = heads(run_until_tap(teacher, real_in, s, cond, TAPS))
    fake_logits = heads([f.detach() for f in fake_features])  # the heads learn from fakes, the student does not
    hinge = sum(F.relu(1 - r).flatten(1).mean(1) + F.relu(1 + f).flatten(1).mean(1)
                for r, f in zip(real_logits, fake_logits)).mean()
    return generator, hinge


@pytest.mark.parametrize("num_steps", [1, 2])
def test_losses_equal_ladd_by_hand_and_move_only_their_player(num_steps):
    teacher_model, student_model, teacher, student, heads, adv = _players()
    cond = T.tiny_cond("unet2d", 3, seed=1)
    t_list = torch.linspace(1, 0, num_steps + 1)
    teacher_before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    for seed in range(4):  # several draws: the schedule point (2 steps: seed 1 draws the rollout's point), s, re-noising
        gen = torch.Generator().manual_seed(100 + seed)
        noise, real = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
        torch.manual_seed(seed)
        generator, heads_loss = adversarial_losses(student, teacher, heads, noise, cond, t_list, real, adv)
        generator.backward()
        student_grads = [p.grad.clone() for p in student_model.parameters()]
        assert all(p.grad is None for p in heads.parameters()) and all(p.requires_grad for p in heads.parameters())
        assert all(p.grad is None for p in teacher_model.parameters())
        heads_loss.backward()  # reaches the heads only: the fake features were detached
        assert all(torch.equal(g, p.grad) for g, p in zip(student_grads, student_model.parameters()))
        assert sum(p.grad.abs().sum() for n, p in heads.named_parameters() if n.endswith("weight")) > 0
        head_grads = [p.grad.clone() for p in heads.parameters()]
        student_model.zero_grad(set_to_none=True)
        heads.zero_grad(set_to_none=True)

        ref_generator, ref_hinge = _reference(student, teacher, heads, noise, cond, real, adv, num_steps, seed)
        torch.testing.assert_close(generator, ref_generator, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads_loss, ref_hinge, rtol=1e-5, atol=1e-6)
        ref_student = torch.autograd.grad(ref_generator, list(student_model.parameters()), retain_graph=True)
        for g, r in zip(student_grads, ref_student):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
        for g, r in zip(head_grads, torch.autograd.grad(ref_hinge, list(heads.parameters()))):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert all(torch.equal(v, teacher_model.state_dict()[k]) for k, v in teacher_before.items())


def test_weight_zero_adds_nothing():
    torch.manual_seed(0)
    teacher = Denoiser(T.tiny_unet2d(), RectifiedFlow(), "flow")
    modules, params, optimizers = {}, {}, {}
    add_adversarial_heads(modules, params, optimizers, AdversarialArgs(), teacher, T.tiny_cond("unet2d", 1), (1, 8, 8),
                          OptimizerArgs(), {"num_training_steps": 10})
    assert modules == params == optimizers == {}


@pytest.mark.parametrize("field,value", [("adv_weight", -0.1), ("adv_weight", float("nan")), ("adv_weight", float("inf")),
                                         ("adv_t_std", 0.0), ("adv_t_mean", float("nan")), ("adv_num_steps", 0),
                                         ("adv_head_learning_rate", 0.0), ("adv_feature_modules", [])])
def test_bad_arguments_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdversarialArgs(**{field: value})
