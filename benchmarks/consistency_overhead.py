"""Step overhead of the consistency-family steps (sCM, MeanFlow, CM, TCM): each step's time divided by the
network evaluations it needs, each timed alone on the same nets and batch (1.00 = no overhead).

    python benchmarks/consistency_overhead.py --batch_size 64 --rounds 20

Networks: the digits teacher UNet (teacher, frozen) and a trainable copy (student; for MeanFlow with the
interval input of models.interval). Parts timed alone:
  jvp+bwd      exact JVP (dual tensors, jvp.jvp(method="exact")) whose primal output carries the
               graph, then backward through it — how our sCM / MeanFlow steps run the student
  fd_jvp+bwd   finite-difference JVP: student fwd with graph + 2 fwds without, then backward
  teacher fwd  frozen teacher forward (no grad); with CFG one batched 2B call
  fwd, fwd+bwd student forward without grad / with grad + backward
The same student calls are made as in the steps (MeanFlow: u(z, r, t); sCM: F through the TrigFlow
change of variables, models.trigflow). Steps timed: loss construction + backward (the optimizer update is
not a network evaluation and is excluded everywhere). Also printed: FastGen's decomposition of the same
work (JVP without graph + a separate fwd with graph + bwd), and the JVP's cost in forwards.
Rounds interleave all measurements; medians and per-round paired ratios are reported.
"""

import argparse
import copy
import statistics
import time

import torch

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.jvp import jvp
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.models.interval import add_interval_input
from diffusers_fastgen.models.logvar import LogVarHead
from diffusers_fastgen.models.trigflow import trigflow_network
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.training import consistency_steps as steps
from diffusers_fastgen.training.cpu_memory import retain_freed_memory


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sigma_d", type=float, default=0.75)
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH).unet.requires_grad_(False).eval()
    rf, b, sd = RectifiedFlow(), args.batch_size, args.sigma_d
    cm_net = copy.deepcopy(base).requires_grad_(True).train()
    mf_net = add_interval_input(base, dim=64).requires_grad_(True).train()
    with torch.no_grad():
        mf_net.time_embedding.cond_proj.weight.normal_(0, 0.02)  # a trained student's r path is not zero
    teacher, cm_student, mf_student = Denoiser(base, rf, "flow"), Denoiser(cm_net, rf, "flow"), Denoiser(mf_net, rf, "flow")
    logvar = LogVarHead()
    labels = torch.arange(b) % 10
    cond, uncond = digits_cond(labels), digits_cond(torch.full_like(labels, NULL_CLASS))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, torch.randn(b, 1, 8, 8, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    r = t * torch.rand(b, generator=g)
    t_trig = torch.atan(torch.exp(torch.randn(b, generator=g) * 1.4 - 1.0) / sd)
    z_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v = eps - x0
    x_trig = torch.cos(t_trig).view(-1, 1, 1, 1) * x0 + torch.sin(t_trig).view(-1, 1, 1, 1) * sd * eps

    def u_fn(z, t_):
        return mf_student(z, t_, cond, target="flow", r=r)

    F_fn = trigflow_network(cm_student, cond, sigma_d=sd)
    tangents = {"mf": ((z_t, t), (v, torch.ones_like(t))), "scm": ((x_trig / sd, t_trig), (v / sd, torch.ones_like(t)))}
    fns = {"mf": u_fn, "scm": F_fn}

    def jvp_bwd(kind, method="exact"):
        def run():
            out, _ = jvp(fns[kind], *tangents[kind], method=method)
            out.square().mean().backward()
        return run

    def jvp_nograd(kind):
        def run():
            with torch.no_grad():
                jvp(fns[kind], *tangents[kind])
        return run

    def fwd_bwd(kind):
        return lambda: fns[kind](*tangents[kind][0]).square().mean().backward()

    def fwd(kind):
        def run():
            with torch.no_grad():
                fns[kind](*tangents[kind][0])
        return run

    def teacher_f(cfg):
        def run():
            with torch.no_grad():
                if cfg == 1.0:
                    teacher(z_t, t, cond)
                else:
                    teacher(torch.cat([z_t, z_t]), torch.cat([t, t]), digits_cond(torch.cat([labels, uncond["class_labels"]])))
        return run

    def step(fn):
        return lambda: fn()[0].backward()

    items = {
        "mf jvp+bwd": jvp_bwd("mf"), "mf fd_jvp+bwd": jvp_bwd("mf", "finite_difference"), "mf jvp (no grad)": jvp_nograd("mf"),
        "mf fwd+bwd": fwd_bwd("mf"), "mf fwd": fwd("mf"),
        "scm jvp+bwd": jvp_bwd("scm"), "scm fd_jvp+bwd": jvp_bwd("scm", "finite_difference"),
        "scm jvp (no grad)": jvp_nograd("scm"), "scm fwd+bwd": fwd_bwd("scm"), "scm fwd": fwd("scm"),
        "cm fwd": lambda: torch.no_grad()(lambda: cm_student(z_t, r, cond))(), "cm fwd+bwd": lambda: cm_student(z_t, t, cond).square().mean().backward(),
        "teacher fwd": teacher_f(1.0), "teacher fwd cfg2": teacher_f(2.0),
        "MeanFlow distill": step(lambda: steps.meanflow_step(mf_student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond)),
        "MeanFlow distill cfg2": step(lambda: steps.meanflow_step(mf_student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond, guidance_scale=2.0)),
        "MeanFlow data": step(lambda: steps.meanflow_step(mf_student, x0, eps, t, r, cond)),
        "MeanFlow distill FD": step(lambda: steps.meanflow_step(mf_student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond, jvp_method="finite_difference")),
        "sCD": step(lambda: steps.scm_step(cm_student, x0, eps, t_trig, cond, sigma_d=sd, teacher=teacher, uncond=uncond, logvar_head=logvar)),
        "sCD cfg2": step(lambda: steps.scm_step(cm_student, x0, eps, t_trig, cond, sigma_d=sd, teacher=teacher, uncond=uncond, guidance_scale=2.0, logvar_head=logvar)),
        "sCT": step(lambda: steps.scm_step(cm_student, x0, eps, t_trig, cond, sigma_d=sd, logvar_head=logvar)),
        "sCD FD": step(lambda: steps.scm_step(cm_student, x0, eps, t_trig, cond, sigma_d=sd, teacher=teacher, uncond=uncond, logvar_head=logvar, jvp_method="finite_difference")),
        "CD": step(lambda: steps.cm_step(cm_student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond)),
        "ECT (CT)": step(lambda: steps.cm_step(cm_student, x0, eps, t, r, cond)),
        "TCM distill": step(lambda: steps.tcm_step(cm_student, teacher, x0, eps, t, r, cond, t_boundary=0.4, boundary_weight=1.0, teacher=teacher, uncond=uncond)),
    }

    def zero():
        for m in (cm_net, mf_net, logvar):
            m.zero_grad(set_to_none=True)

    for fn in items.values():  # warm-up
        fn()
        zero()
    times = {k: [] for k in items}
    for _ in range(args.rounds):
        for k, fn in items.items():
            times[k].append(timed(fn))
            zero()
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"batch {args.batch_size}, {args.rounds} rounds, {args.threads} thread(s); medians in ms")
    for k, v in med.items():
        print(f"  {k:>22}: {v:8.2f}")
    rows = [("MeanFlow distill", ["mf jvp+bwd", "teacher fwd"]), ("MeanFlow distill cfg2", ["mf jvp+bwd", "teacher fwd cfg2"]),
            ("MeanFlow data", ["mf jvp+bwd"]), ("MeanFlow distill FD", ["mf fd_jvp+bwd", "teacher fwd"]),
            ("sCD", ["scm jvp+bwd", "teacher fwd"]), ("sCD cfg2", ["scm jvp+bwd", "teacher fwd cfg2"]), ("sCT", ["scm jvp+bwd"]),
            ("sCD FD", ["scm fd_jvp+bwd", "teacher fwd"]), ("CD", ["cm fwd", "cm fwd+bwd", "teacher fwd"]),
            ("ECT (CT)", ["cm fwd", "cm fwd+bwd"]), ("TCM distill", ["cm fwd", "cm fwd", "cm fwd+bwd", "teacher fwd"])]
    print("\n| step | parts timed alone | step (ms) | sum of parts (ms) | ratio of medians | paired ratio |\n|---|---|---|---|---|---|")
    for name, parts in rows:
        total = sum(med[p] for p in parts)
        paired = statistics.median(times[name][i] / sum(times[p][i] for p in parts) for i in range(args.rounds))
        print(f"| {name} | {' + '.join(parts)} | {med[name]:.2f} | {total:.2f} | {med[name] / total:.3f} | {paired:.3f} |")
    print("\nFastGen's decomposition of the same student work: JVP without graph + fwd with graph + bwd")
    for kind in ("mf", "scm"):
        split = med[f"{kind} jvp (no grad)"] + med[f"{kind} fwd+bwd"]
        print(f"  {kind}: jvp (no grad) + fwd+bwd = {split:.2f} ms vs our fused jvp+bwd {med[kind + ' jvp+bwd']:.2f} ms "
              f"({med[kind + ' jvp+bwd'] / split:.3f}); JVP alone = {med[kind + ' jvp (no grad)'] / med[kind + ' fwd']:.2f} fwd; "
              f"fused jvp+bwd = {med[kind + ' jvp+bwd'] / med[kind + ' fwd']:.2f} fwd; FD jvp+bwd = "
              f"{med[kind + ' fd_jvp+bwd'] / med[kind + ' fwd']:.2f} fwd")


if __name__ == "__main__":
    main()
