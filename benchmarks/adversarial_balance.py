"""How strong `--adv_weight` is against each consistency loss: gradient norms at a training checkpoint.

    python benchmarks/adversarial_balance.py --run /tmp/runs/cd_adv01 --checkpoint checkpoint-1500
    python benchmarks/adversarial_balance.py --run /tmp/runs/scd_adv01 --checkpoint checkpoint-800

For a digits run of train_cm (CD) or train_scm (sCD) trained with `--adv_weight`, the checkpoint's student,
heads (and sCD's log-variance head) are loaded and, on `--batches` batches of the run's size (the run's
time proposal, fresh noise, sampling seeds 0, 1, ...), the gradients over the student's parameters of the
consistency loss and of LADD's generator loss (weight 1) are taken separately. Rows: both norms, the ratio
|grad adv| / |grad consistency| (x adv_weight = the term's share of the update) and their cosine. The same
weight is a different strength for each loss: the ratio says how.
"""

import argparse
import os

import torch
import yaml
from eval_checkpoint import student_pipeline  # benchmarks/: the run's student pipeline from its config
from safetensors.torch import load_file

from diffusers_fastgen.evaluation.digits_data import load_digits_arrays
from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import NULL_CLASS, digits_cond
from diffusers_fastgen.models.logvar import LogVarHead
from diffusers_fastgen.parametrization import process_from_scheduler
from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import t_list_from_scheduler
from diffusers_fastgen.timesteps import (
    noise_ratio_range,
    sample_t_r_ect,
    sample_trigflow_time,
    times_from_noise_ratios,
    trigflow_time_range,
)
from diffusers_fastgen.training.adversarial import adversarial_losses
from diffusers_fastgen.training.args import AdversarialArgs
from diffusers_fastgen.training.consistency_steps import cm_step, scm_step
from diffusers_fastgen.training.distribution_matching_steps import make_heads


def _by_keys(folder: str) -> dict:
    """The checkpoint's saved modules by what they are: student UNet, heads, log-variance head."""
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith("model") and name.endswith(".safetensors"):
            state = load_file(os.path.join(folder, name))
            kind = "heads" if next(iter(state)).startswith("heads.") else "logvar" if "freqs" in state else "student"
            found[kind] = state
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--run", required=True, help="a digits train_cm / train_scm output folder run with --adv_weight")
    parser.add_argument("--checkpoint", required=True, help="e.g. checkpoint-800 (inside <run>/checkpoints)")
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args()
    if args.batches < 1:
        raise ValueError(f"`--batches` must be >= 1, got {args.batches}.")
    torch.set_num_threads(1)
    with open(os.path.join(args.run, "train_config.yaml")) as fh:
        config = yaml.safe_load(fh)
    if not config.get("adv_weight"):
        raise ValueError(f"{args.run} was not trained with --adv_weight (no heads to measure).")
    if config.get("source") != "teacher" or config.get("pretrained_model_name_or_path"):
        raise ValueError(f"{args.run}: need a distillation run (--source teacher) of the digits teacher.")
    is_scm = "sigma_d" in config
    if not is_scm and "num_stages" not in config:
        raise ValueError(f"{args.run} is not a train_cm or train_scm run.")
    saved = _by_keys(os.path.join(args.run, "checkpoints", args.checkpoint))

    teacher_pipe = DigitsPipeline.from_pretrained(config["teacher"])
    process, prediction_type = process_from_scheduler(teacher_pipe.scheduler)
    teacher = Denoiser(teacher_pipe.unet.requires_grad_(False), process, prediction_type)
    student_pipe = student_pipeline(config)  # the run's student architecture and saved sampler
    unet = student_pipe.unet
    unet.load_state_dict(saved["student"])
    student, params = Denoiser(unet, process, prediction_type), list(unet.parameters())
    adv = AdversarialArgs(adv_weight=config["adv_weight"], adv_feature_modules=config["adv_feature_modules"],
                          adv_t_mean=config["adv_t_mean"], adv_t_std=config["adv_t_std"])
    heads = make_heads(teacher, adv.adv_feature_modules, digits_cond(torch.zeros(1, dtype=torch.long)), (1, 8, 8))
    heads.load_state_dict(saved["heads"])
    logvar = None
    if "logvar" in saved:  # sCD's adaptive weighting
        logvar = LogVarHead()
        logvar.load_state_dict(saved["logvar"])
    t_list = t_list_from_scheduler(student_pipe.scheduler, config["adv_num_steps"])
    images, labels = (torch.from_numpy(a) for a in load_digits_arrays("train"))
    b = config["train_batch_size"]

    def grad(loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])

    print(f"| {args.run} {args.checkpoint} (adv_weight {adv.adv_weight}) | batch | consistency loss | norm grad consistency "
          "| norm grad adv | ratio | x adv_weight | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for seed in range(args.batches):
        torch.manual_seed(seed)
        idx = torch.randint(0, len(images), (b,))
        x0, y = images[idx], labels[idx]
        cond, uncond = digits_cond(y), digits_cond(torch.full_like(y, NULL_CLASS))
        eps = torch.randn_like(x0)
        if is_scm:
            t = sample_trigflow_time((b,), sigma_d=config["sigma_d"], mean=config["t_mean"], std=config["t_std"],
                                     ratio_range=noise_ratio_range(process))
            loss, _ = scm_step(student, x0, eps, t, cond, sigma_d=config["sigma_d"], teacher=teacher, uncond=uncond,
                               guidance_scale=config["guidance_scale"], tangent_c=config["tangent_c"], logvar_head=logvar,
                               jvp_method=config["jvp_method"], tangent_norm=config["tangent_norm"],
                               prior_weight=config["prior_weighting"], fd_eps=config.get("fd_eps", 3e-5),
                               t_range=trigflow_time_range(process, config["sigma_d"]))
        else:  # the last stage of ECT's curriculum (the end of the run)
            total = config["max_train_steps"]
            sigma, sigma_r = sample_t_r_ect((b,), iteration=total - 1, total_iterations=total,
                                            num_stages=config["num_stages"], mean=config["t_mean"], std=config["t_std"],
                                            mapping=config["ect_mapping"], dtype=torch.float64)
            t, r = times_from_noise_ratios(process, sigma, sigma_r / sigma)
            loss, _ = cm_step(student, x0, eps, t, r, cond, teacher=teacher, uncond=uncond,
                              guidance_scale=config["guidance_scale"], huber_c=config["huber_c"])
        g_main = grad(loss)
        generator, _ = adversarial_losses(student, teacher, heads, torch.randn_like(x0), cond, t_list, x0, adv)
        g_adv = grad(generator)
        ratio = float(g_adv.norm() / g_main.norm())
        ratios.append(ratio)
        cosine = float(torch.nn.functional.cosine_similarity(g_main, g_adv, dim=0))
        print(f"| | {seed} | {loss.item():.4f} | {g_main.norm():.3f} | {g_adv.norm():.3f} | {ratio:.2f} | "
              f"{ratio * adv.adv_weight:.3f} | {cosine:.2f} |")
    print(f"median ratio {sorted(ratios)[len(ratios) // 2]:.2f}")


if __name__ == "__main__":
    main()
