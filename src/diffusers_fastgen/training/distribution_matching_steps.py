"""The players of distribution-matching distillation and one step function per player, shared by
`train_dmd2`, `train_fdistill` and `train_ladd` (and, block-causally, CausVid / Self-Forcing).

Players (Yin et al., DMD2, arXiv:2405.14867):
  teacher     frozen; its (CFG) x0 prediction is the "real" score; in LADD its features feed the
              discriminator heads.
  fake_score  a denoiser trained on the student's samples (the student distribution's score); with
              the GAN branch its features feed a discriminator head trained with it.
  student     the few-step generator.
Full mode: student and fake score are trainable copies of the teacher. LoRA mode: they are peft
adapters on one frozen base, and the teacher is that base with adapters disabled.

Step functions return a scalar loss; the script owns backward/optimizer (`update`).
"""

from __future__ import annotations

import contextlib
import copy

import torch

from ..guidance import guided_prediction
from ..losses import denoising_loss
from ..losses.distribution_matching import (
    approx_r1_loss,
    dmd_generator_loss,
    f_divergence_weight,
    gan_discriminator_loss,
    gan_generator_loss,
    ladd_discriminator_loss,
    ladd_generator_loss,
)
from ..models import Denoiser, unwrap_model
from ..models.discriminator import FeatureHeads, head_for_features
from ..models.features import forward_with_tap_grad, frozen, run_until_tap, tap_features, without_gradient_checkpointing
from ..parametrization import add_noise
from ..timesteps import sample_logit_normal, sample_uniform
from .lora import BASE, DEFAULT_TARGETS, activate_adapter, adapter_parameters, add_lora_adapters
from .players import finish_digits_run, prepare_players, save_digits_student, student_ema  # noqa: F401 (re-exported)


def unsynced(denoiser: Denoiser) -> Denoiser:
    """The same denoiser over the unwrapped model: a forward that is differentiated only for its input
    must not register a DDP gradient sync (the DDP module was already run for the student's loss)."""
    return Denoiser(unwrap_model(denoiser.model), denoiser.process, denoiser.prediction_type, adapter=denoiser.adapter)


def _ready_for_backward(student: Denoiser) -> None:
    """LoRA mode: make the student adapter active again before the caller's backward, so blocks that
    gradient checkpointing recomputes run the adapter they ran in the forward (the teacher / fake-score
    calls in between switched it; those forwards run without checkpointing)."""
    if student.adapter is not None:
        activate_adapter(unwrap_model(student.model), student.adapter)


def student_inputs(student: Denoiser, noise, cond, t_list, real_x0, *, backward_simulation: bool):
    """(x_t, t) at a uniformly chosen point of the student's schedule, no gradient.

    Point 0 is the noise itself. Point i > 0 is reached by the student's own i-step rollout
    (backward simulation, DMD2 Sec. 4.5) or by noising real data (`real_x0`)."""
    b, k = noise.shape[0], len(t_list) - 1
    i = int(torch.randint(0, k, ())) if k > 1 else 0
    t = t_list[i].expand(b).to(noise.device)
    if i == 0:
        return noise, t
    if not backward_simulation:
        return add_noise(student.process, real_x0, torch.randn_like(noise), t), t
    x = noise
    with torch.no_grad():
        for j in range(i):
            x0 = student(x, t_list[j].expand(b).to(noise.device), cond)
            x = add_noise(student.process, x0, torch.randn_like(noise), t_list[j + 1].expand(b).to(noise.device))
    return x, t


def student_step(student, teacher, fake_score, x_t, t, cond, uncond, *, guidance_scale: float, t_min: float,
                 t_max: float, head=None, gan_weight: float = 0.0, feature_module: str = "mid_block",
                 divergence: str = "reverse_kl", critic_params=()):
    """DMD loss of the student's x0 at (x_t, t): teacher (real, with CFG) vs fake score at a fresh noise
    level s ~ U[t_min, t_max]. With a discriminator `head` on the fake score's `feature_module`:
    gan_weight > 0 adds the non-saturating GAN loss (DMD2), and divergence != "reverse_kl" weights each
    sample's DMD gradient by h(r) of an f-divergence, r read from the head's logit (f-distill).

    The fake score then runs once: its graph is recorded up to the tapped block only (x0_fake comes
    from the rest of that same forward, unrecorded), and `critic_params` (fake score + head) are frozen
    so the backward computes input gradients, not weight gradients that would be discarded. The fake
    score is called unwrapped (no DDP gradient sync for a player that is not updated here).

    Network evaluations: student fwd + bwd, teacher fwd (one 2B batch with CFG), fake fwd; with a head:
    + the fake score's bwd from the tapped block to its input."""
    use_head = head is not None and (gan_weight > 0 or divergence != "reverse_kl")
    gan = use_head and gan_weight > 0  # only the GAN term differentiates through the noisy sample
    x0 = student(x_t, t, cond)
    if not use_head:
        loss = dmd_sample_loss(x0, teacher, fake_score, cond, uncond, guidance_scale=guidance_scale,
                               t_min=t_min, t_max=t_max)
        _ready_for_backward(student)
        return loss
    s = sample_uniform((x0.shape[0],), t_min=t_min, t_max=t_max, device=x0.device)
    noisy = add_noise(student.process, x0 if gan else x0.detach(), torch.randn_like(x0), s)
    with torch.no_grad():
        x0_teacher = guided_prediction(teacher, noisy.detach(), s, cond, uncond, guidance_scale)
    with frozen(critic_params), without_gradient_checkpointing(fake_score.model):
        x0_fake, features = forward_with_tap_grad(unsynced(fake_score), noisy, s, cond, feature_module)
        logits = unwrap_model(head)(features)  # (B, 1)
    # (B,), detached; 1 for reverse KL. Normalised per noise-level bin over all ranks (every rank runs this step).
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    weight = f_divergence_weight(logits, divergence, s, all_reduce=torch.distributed.all_reduce if ddp else None)
    loss = weight * dmd_generator_loss(x0, x0_teacher, x0_fake)
    if gan:
        loss = loss + gan_weight * gan_generator_loss(logits)
    _ready_for_backward(student)
    return loss.mean()


def dmd_sample_loss(x0, teacher, fake_score, cond, uncond, *, guidance_scale: float, t_min: float, t_max: float):
    """DMD loss (mean) of generated samples x0 that carry the generator's graph: re-noised at one
    s ~ U[t_min, t_max] per sample, teacher (CFG) vs fake score x0 predictions, no gradient through
    either. Used by student_step and by rollouts that build x0 themselves (Self-Forcing)."""
    s = sample_uniform((x0.shape[0],), t_min=t_min, t_max=t_max, device=x0.device)
    noisy = add_noise(fake_score.process, x0.detach(), torch.randn_like(x0), s)
    with torch.no_grad():
        x0_teacher = guided_prediction(teacher, noisy, s, cond, uncond, guidance_scale)
        x0_fake = fake_score(noisy, s, cond)
    return dmd_generator_loss(x0, x0_teacher, x0_fake).mean()


def fake_score_sample_loss(fake_score, x0, cond):
    """Denoising loss (mean) of the fake score on generated samples x0 (detached), s ~ U[0, 1]."""
    x0 = x0.detach()
    eps = torch.randn_like(x0)
    s = sample_uniform((x0.shape[0],), t_min=0.0, t_max=1.0, device=x0.device)
    prediction = fake_score(add_noise(fake_score.process, x0, eps, s), s, cond, target=fake_score.prediction_type)
    return denoising_loss(prediction, x0, eps, s, process=fake_score.process,
                          prediction_type=fake_score.prediction_type).mean()


def fake_score_step(student, fake_score, x_t, t, cond, *, real_x0=None, head=None, disc_weight: float = 0.0,
                    feature_module: str = "mid_block", r1_weight: float = 0.0, r1_sigma: float = 0.01):
    """Denoising loss of the fake score on fresh student samples (the student is not differentiated);
    with a discriminator `head` plus disc_weight x its loss on the fake score's features: fake features
    come from the denoising forward itself, real ones from noised `real_x0` with a forward cut at the
    tapped block; optional approximate R1 on perturbed real inputs.

    Network evaluations: student fwd (no grad), fake fwd + bwd (head: + fake fwd to the tapped block and
    its bwd, for real data; R1: once more)."""
    with torch.no_grad():
        x0 = student(x_t, t, cond)
    eps = torch.randn_like(x0)
    s = sample_uniform((x0.shape[0],), t_min=0.0, t_max=1.0, device=x0.device)
    noisy = add_noise(fake_score.process, x0, eps, s)
    with tap_features(fake_score.model, feature_module) if head is not None else contextlib.nullcontext() as features:
        prediction = fake_score(noisy, s, cond, target=fake_score.prediction_type)
    loss = denoising_loss(prediction, x0, eps, s, process=fake_score.process, prediction_type=fake_score.prediction_type)
    if head is None:
        return loss.mean()
    # Real branch (and R1's perturbed copy): forwards cut at the tap, unwrapped so that DDP sees one
    # forward per backward; their weight gradients still accumulate and sync with the denoising ones.
    noisy_real = add_noise(fake_score.process, real_x0, torch.randn_like(real_x0), s)
    inputs = [noisy_real] + ([noisy_real + r1_sigma * torch.randn_like(noisy_real)] if r1_weight > 0 else [])
    critic = unsynced(fake_score)
    real_features = [run_until_tap(critic, x, s, cond, feature_module) for x in inputs]
    logits = head(torch.cat([features[0], *real_features])).chunk(1 + len(inputs))  # one head call: fake, real(, R1)
    loss = loss + disc_weight * gan_discriminator_loss(logits[1], logits[0])
    if r1_weight > 0:
        loss = loss + r1_weight * approx_r1_loss(logits[1], logits[2])
    return loss.mean()


def ladd_student_step(student, teacher, heads, x_t, t, cond, *, feature_modules, t_mean: float = -1.0,
                      t_std: float = 1.0):
    """LADD generator step (Sauer et al. arXiv:2403.12015): the student's x0 at (x_t, t) is re-noised at
    s ~ logit-normal(t_mean, t_std) (t_mean > 0 biases it to high noise), the frozen teacher's features at the tapped
    blocks feed one head each (`heads`: a FeatureHeads), and the student minimises the adversarial
    loss. Gradients reach x0 through the teacher and the heads, whose weights stay frozen here
    (input gradients only; both run unwrapped, outside DDP's sync).

    Network evaluations: student fwd + bwd, teacher fwd cut at the last tap + its bwd to the input."""
    x0 = student(x_t, t, cond)
    s = sample_logit_normal((x0.shape[0],), mean=t_mean, std=t_std, device=x0.device)
    noisy = add_noise(student.process, x0, torch.randn_like(x0), s)
    heads = unwrap_model(heads)
    with frozen(heads.parameters()), without_gradient_checkpointing(teacher.model):
        logits = heads(run_until_tap(unsynced(teacher), noisy, s, cond, list(feature_modules)))
    _ready_for_backward(student)
    return ladd_generator_loss(logits).mean()


def ladd_discriminator_step(student, teacher, heads, x_t, t, cond, real_x0, *, feature_modules,
                            t_mean: float = -1.0, t_std: float = 1.0):
    """LADD discriminator step: hinge loss of the heads on the teacher's features of re-noised real data
    and of re-noised (detached) student samples, at the same s for both. The teacher runs without
    gradient (cut at the last tap): only the heads are trained.

    Network evaluations: student fwd, teacher fwd cut at the last tap on a 2B batch (real + fake)."""
    with torch.no_grad():
        x0 = student(x_t, t, cond)
        b = x0.shape[0]
        s = sample_logit_normal((b,), mean=t_mean, std=t_std, device=x0.device).repeat(2)
        both = add_noise(teacher.process, torch.cat([real_x0, x0]), torch.randn_like(torch.cat([x0, x0])), s)
        features = run_until_tap(teacher, both, s, _cat_cond(cond, cond), list(feature_modules))
    logits = heads(features)  # each (2B, 1): real, then fake
    return ladd_discriminator_loss([l[:b] for l in logits], [l[b:] for l in logits]).mean()


def _cat_cond(a, b):
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat_cond(a[k], b[k]) for k in a}
    return a


def build_players(teacher_unet, *, lora_rank: int = 0, trainable=("student", "fake_score"), lora_alpha: float | None = None,
                  lora_target_modules=None):
    """(modules to prepare, {player: parameters}). `teacher_unet` is frozen in place.

    Full mode: {"teacher", *trainable} with each trainable player a copy of the teacher.
    LoRA mode: {"base"} with one adapter per trainable player; the teacher is the base."""
    base = teacher_unet.requires_grad_(False)
    if lora_rank:  # the adapters train in fp32 whatever the (frozen) base's dtype
        add_lora_adapters(base, list(trainable), rank=lora_rank, alpha=lora_alpha,
                          target_modules=lora_target_modules or DEFAULT_TARGETS)
        params = {name: adapter_parameters(base, name) for name in trainable}
        for p in (p for ps in params.values() for p in ps):
            p.data = p.data.float()
        return {"base": base}, params
    base.eval()
    modules = {"teacher": base}
    for name in trainable:  # trained copies in fp32 (the teacher may be bf16 / fp16)
        modules[name] = copy.deepcopy(base).float().requires_grad_(True)
    return modules, {name: list(modules[name].parameters()) for name in trainable}


def freeze_modules(model, names, *, arg: str = "frozen_modules") -> list:
    """Freeze every module whose name is, or ends with, one of `names` (e.g. "attn2.to_k": the cross-attention
    keys of every block); returns the parameters still trained. A name matching no module is a ValueError
    naming `arg`."""
    found = {name: [m for n, m in model.named_modules() if n == name or n.endswith("." + name)] for name in names}
    missing = [name for name, hits in found.items() if not hits]
    if missing:
        raise ValueError(f"`{arg}` {missing} match no module of {type(model).__name__}.")
    for hits in found.values():
        for m in hits:
            m.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def player_denoisers(modules, process, prediction_type, names=("student", "fake_score")) -> dict:
    """{"teacher": Denoiser, name: Denoiser, ...} over the (prepared) modules of `build_players`."""
    if "base" in modules:
        unet = modules["base"]
        out = {"teacher": Denoiser(unet, process, prediction_type, adapter=BASE)}
        out.update({n: Denoiser(unet, process, prediction_type, adapter=n) for n in names})
        return out
    out = {"teacher": Denoiser(modules["teacher"], process, prediction_type)}
    out.update({n: Denoiser(modules[n], process, prediction_type) for n in names})
    return out


def make_heads(denoiser, feature_modules, cond, sample_shape) -> FeatureHeads:
    """One discriminator head per tapped block, sized by one dry forward cut at the last tap."""
    with torch.no_grad():
        features = run_until_tap(denoiser, torch.zeros(1, *sample_shape), torch.full((1,), 0.5), cond,
                                 list(feature_modules))
    return FeatureHeads([head_for_features(f) for f in features])
