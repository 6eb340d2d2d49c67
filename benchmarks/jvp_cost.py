"""Cost of a JVP through the digits UNet, in forwards (what sCM / MeanFlow pay per step).

    python benchmarks/jvp_cost.py --batch_size 64 --rounds 20

The digits teacher with the interval input of MeanFlow students (models.interval), batch B, one
thread, interleaved rounds, medians. Measured: forward (no grad), forward + backward, exact JVP
(forward-mode AD on dual tensors, jvp.jvp(method="exact") under forward_ad_compatible), exact JVP + backward through its
primal output (the MeanFlow / sCM training step without the loss), and the finite-difference JVP
(3 forwards, one with grad) + backward.
"""

import argparse
import statistics
import time

import torch

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.jvp import jvp
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import digits_cond
from diffusers_fastgen.models.interval import add_interval_input
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.training.cpu_memory import retain_freed_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    torch.manual_seed(0)
    unet = add_interval_input(DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH).unet, dim=64).train()
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.normal_(0, 0.02)
    den, b = Denoiser(unet, RectifiedFlow(), "flow"), args.batch_size
    cond = digits_cond(torch.arange(b) % 10)
    z, v = torch.randn(b, 1, 8, 8), torch.randn(b, 1, 8, 8)
    t, r = torch.rand(b) * 0.9 + 0.05, torch.rand(b) * 0.05

    def u_fn(zz, tt):
        return den(zz, tt, cond, target="flow", r=r)

    def forward():
        with torch.no_grad():
            u_fn(z, t)

    def forward_backward():
        u_fn(z, t).square().mean().backward()

    def exact_jvp():
        with torch.no_grad():
            jvp(u_fn, (z, t), (v, torch.ones_like(t)))

    def exact_jvp_backward():
        u, du = jvp(u_fn, (z, t), (v, torch.ones_like(t)))
        (u - (v - du).detach()).square().mean().backward()

    def fd_jvp_backward():
        u, du = jvp(u_fn, (z, t), (v, torch.ones_like(t)), method="finite_difference")
        (u - (v - du).detach()).square().mean().backward()

    items = {"forward": forward, "forward+backward": forward_backward, "exact JVP (no grad)": exact_jvp,
             "exact JVP + backward": exact_jvp_backward, "finite-difference JVP + backward": fd_jvp_backward}
    for fn in items.values():
        fn()
        unet.zero_grad(set_to_none=True)
    times = {k: [] for k in items}
    for _ in range(args.rounds):
        for k, fn in items.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
            unet.zero_grad(set_to_none=True)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print(f"digits UNet + interval input, batch {b}, {args.rounds} rounds, 1 thread; medians\n")
    print("| measurement | ms | in forwards | relative to forward+backward |\n|---|---|---|---|")
    for k, ms in med.items():
        print(f"| {k} | {ms:.2f} | {ms / med['forward']:.2f} | {ms / med['forward+backward']:.2f} |")


if __name__ == "__main__":
    main()
