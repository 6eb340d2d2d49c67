"""How far MeanFlow's target is from the truth at initialisation (student = teacher), per JVP method.

    python benchmarks/meanflow_target_error.py

For (t, r) pairs, batch 64 (classes 0..9), z_t on the teacher's own ODE (32 Euler steps from noise), the
true average velocity is (z_t - z_r) / (t - r) with z_r from 64 Euler steps of the teacher. Printed:
the mean squared error of the initial prediction u = v (the student starts as the teacher for every r)
and of the MeanFlow target v - (t - r) du/dt with du/dt from the exact JVP and from central differences
of several steps (no stencil clamping, as in losses.meanflow without t_max).
"""

import torch

from diffusers_fastgen.evaluation import DIGITS_TEACHER_PATH
from diffusers_fastgen.losses.meanflow import meanflow_target
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import digits_cond
from diffusers_fastgen.models.interval import add_interval_input
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.sampling import teacher_ode_states

PAIRS = [(1.0, 0.0), (1.0, 0.5), (0.5, 0.0), (0.6, 0.4)]
METHODS = [("exact", 3e-5), ("finite_difference", 3e-5), ("finite_difference", 1e-3), ("finite_difference", 1e-2),
           ("finite_difference", 3e-2), ("finite_difference", 1e-1)]


def main():
    torch.set_num_threads(1)
    pipe = DigitsPipeline.from_pretrained(DIGITS_TEACHER_PATH)
    teacher = Denoiser(pipe.unet.eval(), RectifiedFlow(), "flow")
    student = Denoiser(add_interval_input(pipe.unet, dim=64).eval(), RectifiedFlow(), "flow")
    b = 64
    cond = digits_cond(torch.arange(b) % 10)
    g = torch.Generator().manual_seed(0)

    def velocity(x, t):
        return teacher(x, t, cond, target="flow")

    head = " | ".join(f"{m} {e:g}" for m, e in METHODS)
    print(f"| (t, r) | error of u = v | {head} |\n|" + "---|" * (len(METHODS) + 2))
    for t0, r0 in PAIRS:
        with torch.no_grad():
            z = torch.randn(b, 1, 8, 8, generator=g)
            if t0 < 1:
                z = teacher_ode_states(velocity, z, torch.tensor([1.0, t0, 0.0]), steps_per_segment=32)[1]
            t, r = torch.full((b,), t0), torch.full((b,), r0)
            v = velocity(z, t)
            grid = torch.tensor([t0, r0, 0.0]) if r0 > 0 else torch.tensor([t0, 0.0])
            u_true = (z - teacher_ode_states(velocity, z, grid, steps_per_segment=64)[1]) / (t0 - r0)
            errors = []
            for method, eps in METHODS:
                u, target = meanflow_target(lambda zz, rr, tt: student(zz, tt, cond, target="flow", r=rr), z, r, t, v,
                                            jvp_method=method, eps=eps)
                errors.append((target - u_true).pow(2).mean().item())
            init = (u - u_true).pow(2).mean().item()
        print(f"| ({t0}, {r0}) | {init:.4f} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
