"""An adversarial term for the consistency-family scripts and DMD2: LADD's discriminator (heads on the frozen teacher's
features, Sauer et al. arXiv:2403.12015) next to the consistency (or DMD) loss, as in SANA-Sprint's sCM + LADD
hybrid (Chen et al. arXiv:2503.09641: L = L_consistency + weight * L_adv).

The generator's samples are the student's own: its x0 at the points its few-step sampler visits (pure noise
for one step; for N steps also the states its own rollout reaches), so the term acts where sampling happens.
Every student update both players move: the student by consistency + weight * LADD generator loss, the heads by
LADD's hinge loss on re-noised real and (detached) student samples at the same noise level.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..losses.distribution_matching import ladd_discriminator_loss, ladd_generator_loss
from ..models import Denoiser, unwrap_model
from ..models.features import frozen, run_until_tap, without_gradient_checkpointing
from ..parametrization import add_noise
from ..timesteps import sample_logit_normal
from .accelerate_setup import make_optimizer, update
from .args import AdversarialArgs
from .distribution_matching_steps import _ready_for_backward, make_heads, student_inputs, unsynced


def add_adversarial_heads(modules: dict, params: dict, optimizers: dict, adv: AdversarialArgs, teacher: Denoiser,
                          probe_cond, sample_shape, optimizer_args, schedule: dict) -> None:
    """With `adv.adv_weight` > 0: one head per tapped teacher block in `modules["heads"]`, their parameters
    in `params["heads"]` and an AdamW at `adv.adv_head_learning_rate` in `optimizers["heads"]` (before
    `prepare_players`, so that checkpoints hold them). A no-op at weight 0."""
    if adv.adv_weight <= 0:
        return
    try:
        modules["heads"] = make_heads(teacher, adv.adv_feature_modules, probe_cond, sample_shape)
    except ValueError as err:  # a block the teacher does not have
        raise ValueError(f"`adv_feature_modules` {adv.adv_feature_modules}: {err}") from None
    params["heads"] = list(modules["heads"].parameters())
    head_args = replace(optimizer_args, learning_rate=adv.adv_head_learning_rate)
    optimizers["heads"] = make_optimizer(params["heads"], head_args, **schedule)


def adversarial_losses(student: Denoiser, teacher: Denoiser, heads, noise, cond, t_list, real_x0, adv: AdversarialArgs, *,
                       jump=None):
    """(generator loss, heads loss), both scalars, for one batch.

    The student's x0 at a point of its schedule `t_list` (from `noise`, by its own rollout for later
    points) is re-noised at s ~ logit-normal(adv_t_mean, adv_t_std); the teacher's features of it feed the
    heads, frozen, for the generator loss (gradients reach the student through the teacher). The heads'
    hinge loss compares the same fake features (detached) with the teacher's features of `real_x0`
    re-noised at the same s.

    Network evaluations: student fwd (+ bwd by the caller; + the rollout's fwds for later points), teacher
    fwd cut at the last tap on the fake batch + its bwd to the input, and on the real batch without graph.

    `jump(x_t, t, cond) -> x0`: how the student reaches x0 in one step, if not by `student(x_t, t, cond)` (a
    MeanFlow student jumps with its average velocity over (0, t); only from noise: a 2-point `t_list`)."""
    if jump is not None and len(t_list) != 2:
        raise ValueError(f"a `jump` student gets its samples from noise only (a 2-point t_list), got {len(t_list)} points.")
    x_t, t = student_inputs(student, noise, cond, t_list, real_x0, backward_simulation=True)
    x0 = (jump or student)(x_t, t, cond)
    s = sample_logit_normal((x0.shape[0],), mean=adv.adv_t_mean, std=adv.adv_t_std, device=x0.device)
    taps = list(adv.adv_feature_modules)
    bare_teacher, bare_heads = unsynced(teacher), unwrap_model(heads)
    with frozen(bare_heads.parameters()), without_gradient_checkpointing(teacher.model):
        fake = run_until_tap(bare_teacher, add_noise(teacher.process, x0, torch.randn_like(x0), s), s, cond, taps)
        generator = ladd_generator_loss(bare_heads(fake)).mean()
    with torch.no_grad():
        real = run_until_tap(bare_teacher, add_noise(teacher.process, real_x0, torch.randn_like(real_x0), s), s, cond,
                             taps)
    b = x0.shape[0]
    logits = heads([torch.cat([r, f.detach()]) for r, f in zip(real, fake)])  # one call per head on (real, fake)
    heads_loss = ladd_discriminator_loss([l[:b] for l in logits], [l[b:] for l in logits]).mean()
    _ready_for_backward(student)  # LoRA: the teacher's calls switched the active adapter
    return generator, heads_loss


class AdversarialTerm:
    """The term as a script uses it, a no-op at `adv_weight` 0: `add_to` adds weight x the generator loss to the
    consistency loss (and keeps the heads' loss), `update_heads` steps the heads after the student's backward
    (which reads the heads' weights). Built over the prepared `modules` / `optimizers`."""

    def __init__(self, adv: AdversarialArgs, teacher: Denoiser, modules: dict, params: dict, optimizers: dict,
                 t_list, max_grad_norm: float, *, jump=None):
        self.adv, self.teacher, self.t_list, self.max_grad_norm, self.jump = adv, teacher, t_list, max_grad_norm, jump
        self.on = adv.adv_weight > 0
        if self.on:
            self.heads, self.params, self.optimizer = modules["heads"], params["heads"], optimizers["heads"]
        self._heads_loss = None

    def add_to(self, loss, logs: dict, student: Denoiser, cond, real_x0):
        """The generator's noise is drawn here (from the global generator), so a run without the term draws
        exactly the random numbers it drew before the term existed."""
        if not self.on:
            return loss
        generator, self._heads_loss = adversarial_losses(student, self.teacher, self.heads, torch.randn_like(real_x0),
                                                         cond, self.t_list, real_x0, self.adv, jump=self.jump)
        logs.update(adversarial_loss=generator.detach(), heads_loss=self._heads_loss.detach())
        return loss + self.adv.adv_weight * generator

    def update_heads(self, accelerator, *, guard, accumulator, step: int) -> None:
        if self.on:
            update(accelerator, self._heads_loss, self.params, *self.optimizer, self.max_grad_norm, guard=guard,
                   accumulator=accumulator, player="heads", step=step)
            self._heads_loss = None
