"""DMD2 step overhead: each iteration kind's time divided by the sum of the network evaluations it
needs, each timed alone on the same nets and batch (1.00 = no overhead).

    python benchmarks/dmd2_overhead.py --batch_size 64 --rounds 30

student step = student fwd+bwd + teacher fwd (CFG: one batched call of 2B) + fake-score fwd
critic step  = student fwd (no grad) + fake-score fwd+bwd
With the GAN branch (head on the fake score's mid_block):
student step = student fwd+bwd + teacher fwd + fake fwd recorded up to the tapped block (fake score and head
               frozen) + its bwd from the tap to the input (input gradients only)
critic step  = student fwd + fake fwd+bwd (denoising + head on its own features) + fake fwd cut at the
               tapped block + its bwd (real data)
Timed: loss construction + backward (the optimizer update is not a network evaluation and is
excluded everywhere). Rounds interleave all measurements; medians and per-round paired ratios are
reported. By default the process first calls training.cpu_memory.retain_freed_memory(), as the training
scripts do on CPU; --allocator glibc_default measures without it.
"""

import argparse
import copy
import statistics
import time

import torch

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.models.discriminator import head_for_features
from diffusers_fastgen.models.features import forward_with_tap_grad, frozen, run_until_tap, tap_features
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.training import distribution_matching_steps as dmd2
from diffusers_fastgen.training.cpu_memory import retain_freed_memory


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--allocator", choices=["glibc_default", "retain"], default="retain",
                        help="retain: training.cpu_memory.retain_freed_memory(), as the training scripts do on CPU")
    args = parser.parse_args()
    if args.allocator == "retain":
        print("retain_freed_memory:", retain_freed_memory())
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH).unet.requires_grad_(False).eval()
    student_net, fake_net = copy.deepcopy(base).requires_grad_(True).train(), copy.deepcopy(base).requires_grad_(True).train()
    rf = RectifiedFlow()
    teacher, student, fake = (Denoiser(m, rf, "flow") for m in (base, student_net, fake_net))
    b = args.batch_size
    labels = torch.arange(b) % 10
    cond, uncond = digits_cond(labels), digits_cond(torch.full_like(labels, NULL_CLASS))
    x, t = torch.randn(b, 1, 8, 8), torch.ones(b)
    t_s = torch.full((b,), 0.5)

    def zero():
        for module in (student_net, fake_net, head):
            module.zero_grad(set_to_none=True)
        x_in.grad = None

    def student_fb():
        student(x, t, cond).square().mean().backward()

    def student_f():
        with torch.no_grad():
            student(x, t, cond)

    def fake_f():
        with torch.no_grad():
            fake(x, t_s, cond)

    def fake_fb():
        fake(x, t_s, cond, target="flow").square().mean().backward()

    def teacher_f(g):
        def run():
            with torch.no_grad():
                if g == 1.0:
                    teacher(x, t_s, cond)
                else:
                    teacher(torch.cat([x, x]), torch.cat([t_s, t_s]), digits_cond(torch.cat([labels, uncond["class_labels"]])))
        return run

    def student_step(g):
        return lambda: dmd2.student_step(student, teacher, fake, x, t, cond, uncond, guidance_scale=g,
                                         t_min=0.02, t_max=0.98).backward()

    def critic_step():
        dmd2.fake_score_step(student, fake, x, t, cond).backward()

    with torch.no_grad():
        head = head_for_features(run_until_tap(fake, x, t_s, cond, "mid_block"))
    x_in = x.clone().requires_grad_(True)

    critic_params = list(fake_net.parameters()) + list(head.parameters())

    def fake_tapgrad_bwd_to_input():  # the GAN generator's share of the fake score: one forward, input grads
        with frozen(critic_params):
            _, feats = forward_with_tap_grad(fake, x_in, t_s, cond, "mid_block")
            out = head(feats)
        out.sum().backward()

    def fake_fb_head():  # denoising loss + head on the same forward's features
        with tap_features(fake_net, "mid_block") as feats:
            out = fake(x, t_s, cond, target="flow")
        (out.square().mean() + head(feats[0]).mean()).backward()

    def fake_cut_fb():  # real branch: forward cut at the tapped block, head, backward
        head(run_until_tap(fake, x, t_s, cond, "mid_block")).mean().backward()

    def student_step_gan():
        dmd2.student_step(student, teacher, fake, x, t, cond, uncond, guidance_scale=1.0, t_min=0.02, t_max=0.98,
                          head=head, gan_weight=0.01, critic_params=critic_params).backward()

    def critic_step_gan():
        dmd2.fake_score_step(student, fake, x, t, cond, real_x0=x, head=head, disc_weight=0.1).backward()

    items = {"student_fb": student_fb, "student_f": student_f, "fake_f": fake_f, "fake_fb": fake_fb,
             "critic_step": critic_step, "fake_tapgrad_bwd_to_input": fake_tapgrad_bwd_to_input, "fake_fb_head": fake_fb_head,
             "fake_cut_fb": fake_cut_fb, "student_step_gan": student_step_gan, "critic_step_gan": critic_step_gan}
    for g in args.guidance_scales:
        items[f"teacher_f@{g}"] = teacher_f(g)
        items[f"student_step@{g}"] = student_step(g)
    for fn in items.values():  # warm-up
        fn()
        zero()
    times = {k: [] for k in items}
    for _ in range(args.rounds):
        for k, fn in items.items():
            times[k].append(timed(fn))
            zero()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"batch {b}, {args.rounds} rounds, {args.threads} thread(s), allocator {args.allocator}; medians in ms")
    for k, v in med.items():
        print(f"  {k:>18}: {v:8.2f}")
    rows = [(f"student | {g}", f"student_step@{g}", ["student_fb", f"teacher_f@{g}", "fake_f"]) for g in args.guidance_scales]
    rows += [("critic (fake score) | –", "critic_step", ["student_f", "fake_fb"])]
    if 1.0 in args.guidance_scales:
        rows += [("student, GAN on | 1.0", "student_step_gan", ["student_fb", "teacher_f@1.0", "fake_tapgrad_bwd_to_input"])]
    rows += [("critic, GAN on | –", "critic_step_gan", ["student_f", "fake_fb_head", "fake_cut_fb"])]
    print("\nratio of medians = median(step) / sum of median(parts); paired ratio = median over rounds of "
          "step / sum of parts measured in the same round (cancels slow drifts of the shared machine)")
    print("\n| iteration | CFG | step (ms) | sum of nets alone (ms) | ratio of medians | paired ratio |\n|---|---|---|---|---|---|")
    for label, step, parts in rows:
        total = sum(med[p] for p in parts)
        paired = statistics.median(times[step][i] / sum(times[p][i] for p in parts) for i in range(args.rounds))
        print(f"| {label} | {med[step]:.2f} | {total:.2f} | {med[step] / total:.3f} | {paired:.3f} |")


if __name__ == "__main__":
    main()
