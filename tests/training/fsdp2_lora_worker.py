"""Worker for test_fsdp2.py (run by torchrun, 2 gloo ranks): torch's FSDP2 `fully_shard` on the
shared-base LoRA layout of DMD2 — one frozen digits UNet carrying "student" and "fake_score" adapters,
teacher = adapters off. Each rank runs one fake-score step and one student step (optionally with the
GAN head) on its half of the batch; the sharded result must equal an unsharded replica per rank whose
gradients are averaged by hand (DDP semantics), and the base must stay untouched."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from diffusers_fastgen.models import Denoiser
from diffusers_fastgen.models.digits import digits_cond, digits_unet
from diffusers_fastgen.models.discriminator import conv_head
from diffusers_fastgen.parametrization import RectifiedFlow
from diffusers_fastgen.training.distribution_matching_steps import fake_score_step, student_step
from diffusers_fastgen.training.lora import BASE, adapter_parameters, add_lora_adapters


def players(unet):
    rf = RectifiedFlow()
    return (Denoiser(unet, rf, "flow", adapter=BASE), Denoiser(unet, rf, "flow", adapter="student"),
            Denoiser(unet, rf, "flow", adapter="fake_score"))


def run_steps(unet, head, x_t, t, cond, real, *, gan: bool, seed: int, average=None):
    """One fake-score SGD step, then one student SGD step; `average(params)` all-reduces grads (replica)."""
    teacher, student, fake = players(unet)
    fake_params = adapter_parameters(unet, "fake_score") + (list(head.parameters()) if gan else [])
    student_params = adapter_parameters(unet, "student")
    torch.manual_seed(seed)
    fake_score_step(student, fake, x_t, t, cond, real_x0=real, head=head if gan else None, disc_weight=0.5).backward()
    if average:
        average(fake_params)
    torch.optim.SGD(fake_params, lr=0.5).step()
    torch.manual_seed(seed + 1)
    student_step(student, teacher, fake, x_t, t, cond, digits_cond(torch.full_like(cond["class_labels"], 10)),
                 guidance_scale=2.0, t_min=0.02, t_max=0.98, head=head if gan else None, gan_weight=0.5,
                 critic_params=fake_params).backward()
    if average:
        average(student_params)
    torch.optim.SGD(student_params, lr=0.5).step()


def full_state(module):
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in module.state_dict().items()}


def main(out_path: str, gan: bool):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    unet = digits_unet((16, 32), layers_per_block=1)
    add_lora_adapters(unet, ["student", "fake_score"], rank=4)
    with torch.no_grad():  # adapters start non-zero so that every LoRA matrix receives a gradient
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    head = conv_head(32)
    replica, replica_head = copy.deepcopy(unet), copy.deepcopy(head)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    base_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" in k}

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block)
    fully_shard(unet)
    fully_shard(head)
    sharded = [p for p in unet.parameters() if isinstance(p, DTensor) and p.to_local().numel() < p.numel()]

    g = torch.Generator().manual_seed(1)
    x_all, real_all, labels_all = torch.randn(8, 1, 8, 8, generator=g), torch.randn(8, 1, 8, 8, generator=g), torch.arange(8) % 10
    local = slice(rank * 4, rank * 4 + 4)
    x_t, real, cond, t = x_all[local], real_all[local], digits_cond(labels_all[local]), torch.ones(4)
    run_steps(unet, head, x_t, t, cond, real, gan=gan, seed=10 + rank)

    def average(params):
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world

    run_steps(replica, replica_head, x_t, t, cond, real, gan=gan, seed=10 + rank, average=average)
    got, want = full_state(unet), replica.state_dict()
    max_err = max(float((got[k] - want[k]).abs().max()) for k in want)
    head_now = full_state(head)
    head_err = max(float((v - replica_head.state_dict()[k]).abs().max()) for k, v in head_now.items())
    head_change = max(float((v - head_before[k]).abs().max()) for k, v in head_now.items())
    base_err = max(float((got[k] - v).abs().max()) for k, v in base_before.items())
    lora_change = {a: max(float((got[k] - v).abs().max()) for k, v in lora_before.items() if f".{a}." in k)
                   for a in ("student", "fake_score")}
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump({"world": world, "sharded_params": len(sharded), "max_err": max_err, "head_err": head_err,
                       "head_change": head_change,
                       "base_err": base_err, "lora_change": lora_change}, fh)
    dist.destroy_process_group()

if __name__ == "__main__":
    main(sys.argv[1], gan=sys.argv[2] == "gan")
