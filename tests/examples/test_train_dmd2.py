import os

import pytest
import torch
from safetensors.torch import load_file
from script_utils import assert_changed, file_digest, run_script, unet_weights

from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler


def test_dmd2_two_steps(tiny_teacher, tmp_path):
    teacher_file = os.path.join(tiny_teacher, "unet", "diffusion_pytorch_model.safetensors")
    digest = file_digest(teacher_file)
    out = str(tmp_path / "dmd2")
    run_script("dmd2", ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "2",
                        "--train_batch_size", "8", "--student_update_freq", "2", "--num_student_steps", "2",
                        "--learning_rate", "1e-3", "--eval_num_samples", "20", "--report_to", "none",
                        "--ema_schedule", "constant", "--ema_decay", "0.0"])
    assert file_digest(teacher_file) == digest
    assert_changed(unet_weights(tiny_teacher), unet_weights(out))
    pipe = DigitsPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchFewStepScheduler)
    torch.manual_seed(0)
    assert pipe([1, 2], num_inference_steps=2, output_type="latent").images.shape == (2, 1, 8, 8)
    assert os.path.isfile(os.path.join(out, "samples.png")) and os.path.isfile(os.path.join(out, "benchmark.md"))


def test_dmd2_lora_round_trip_and_frozen_base(tiny_teacher, tmp_path):
    out = str(tmp_path / "lora")
    run_script("dmd2", ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "2",
                        "--train_batch_size", "8", "--student_update_freq", "2", "--lora_rank", "4",
                        "--learning_rate", "1e-2", "--eval_num_samples", "0", "--report_to", "none",
                        "--ema_schedule", "constant", "--ema_decay", "0.0"])
    # The folder holds the unchanged base (teacher) weights and the student LoRA.
    base, teacher = unet_weights(out), unet_weights(tiny_teacher)
    for k in teacher:
        torch.testing.assert_close(base[k], teacher[k], rtol=0, atol=0)
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in k for k in lora) and not any("fake_score" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the student adapter trained
    # Stock load_lora_weights reproduces the student: differs from the teacher, and is deterministic.
    plain = DigitsPipeline.from_pretrained(out)
    student = DigitsPipeline.from_pretrained(out)
    student.load_lora_weights(out)
    kw = dict(num_inference_steps=1, output_type="latent")
    a = student([1, 5], generator=torch.Generator().manual_seed(0), **kw).images
    b = plain([1, 5], generator=torch.Generator().manual_seed(0), **kw).images
    assert (a - b).abs().max() > 1e-4
    again = DigitsPipeline.from_pretrained(out)
    again.load_lora_weights(out)
    torch.testing.assert_close(again([1, 5], generator=torch.Generator().manual_seed(0), **kw).images, a)


@pytest.mark.parametrize("extra", [[], ["--adv_weight", "0.5", "--adv_num_steps", "2"]])
def test_dmd2_resume_latest_equals_uninterrupted(tiny_teacher, tmp_path, extra):
    """With LADD's heads on the teacher (--adv_weight) the heads and their optimizer come back from the
    checkpoint too: a stale head would move the student differently after the resume."""
    common = ["--teacher", tiny_teacher, "--train_batch_size", "8", "--student_update_freq", "2",
              "--num_student_steps", "2", "--learning_rate", "1e-3", "--eval_num_samples", "0",
              "--report_to", "none", "--checkpointing_steps", "2", "--seed", "5", *extra]
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    run_script("dmd2", common + ["--output_dir", ref, "--max_train_steps", "4"])
    run_script("dmd2", common + ["--output_dir", run, "--max_train_steps", "2"])  # "killed" after step 2
    run_script("dmd2", common + ["--output_dir", run, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    a, b = unet_weights(ref), unet_weights(run)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)


def test_dmd2_gan_with_gradient_checkpointing_and_bf16_autocast(tiny_teacher, tmp_path):
    """The real-scale paths on CPU: bf16 autocast + gradient checkpointing with the GAN branch (one-pass
    fake forward cut at the tap) and R1; the student trains and the folder reloads."""
    out = str(tmp_path / "gan_bf16")
    run_script("dmd2", ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "2",
                        "--train_batch_size", "8", "--student_update_freq", "2", "--learning_rate", "1e-3",
                        "--eval_num_samples", "0", "--report_to", "none", "--ema_schedule", "constant",
                        "--ema_decay", "0.0", "--gradient_checkpointing", "true", "--mixed_precision", "bf16",
                        "--gan_generator_weight", "0.1", "--gan_discriminator_weight", "0.1", "--r1_weight", "0.1"])
    assert_changed(unet_weights(tiny_teacher), unet_weights(out))
    images = DigitsPipeline.from_pretrained(out)([3], num_inference_steps=1, output_type="latent").images
    assert torch.isfinite(images).all()


def test_dmd2_with_gradient_accumulation_counts_optimizer_steps(tiny_teacher, tmp_path):
    """2 micro-batches per update, fake score and student alternating: 2 student steps take 8 micro-batches
    (4 updates: fake, student, fake, student); the checkpoint and the EMA count optimizer steps."""
    import json

    from script_utils import load_script

    module = load_script("dmd2")
    calls = []
    for name in ("fake_score_step", "student_step"):
        original = getattr(module, name)
        setattr(module, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    out = str(tmp_path / "acc")
    module.main(["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "4",
                 "--student_update_freq", "2", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
                 "--eval_num_samples", "0", "--report_to", "none"])
    AcceleratorState._reset_state(True)
    assert calls == ["fake_score_step"] * 2 + ["student_step"] * 2 + ["fake_score_step"] * 2 + ["student_step"] * 2
    with open(os.path.join(out, "checkpoints", "checkpoint-2", "training_state.json")) as fh:
        assert json.load(fh)["step"] == 2
