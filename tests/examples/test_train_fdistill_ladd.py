"""2-step smoke runs of train_fdistill and train_ladd: the student changes, the teacher file does not,
the output folder reloads with from_pretrained (LoRA: stock load_lora_weights) and samples."""

import os

import pytest
import torch
from script_utils import assert_changed, file_digest, load_script, run_script, unet_weights

from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler

COMMON = ["--train_batch_size", "8", "--student_update_freq", "2", "--learning_rate", "1e-3",
          "--report_to", "none", "--ema_schedule", "constant", "--ema_decay", "0.0", "--max_train_steps", "2"]


@pytest.mark.parametrize("script,extra", [("fdistill", ["--divergence", "js", "--num_student_steps", "2"]),
                                          ("fdistill", ["--divergence", "kl", "--gan_generator_weight", "0"]),
                                          ("ladd", ["--num_student_steps", "2"])])
def test_two_steps_student_changes_teacher_does_not(tiny_teacher, tmp_path, script, extra):
    teacher_file = os.path.join(tiny_teacher, "unet", "diffusion_pytorch_model.safetensors")
    digest = file_digest(teacher_file)
    out = str(tmp_path / script)
    run_script(script, ["--teacher", tiny_teacher, "--output_dir", out, "--eval_num_samples", "20", *COMMON, *extra])
    assert file_digest(teacher_file) == digest
    assert_changed(unet_weights(tiny_teacher), unet_weights(out))
    pipe = DigitsPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchFewStepScheduler)
    steps = 2 if "--num_student_steps" in extra else 1
    torch.manual_seed(0)
    images = pipe([1, 2], num_inference_steps=steps, output_type="latent").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert os.path.isfile(os.path.join(out, "benchmark.md"))


def test_ladd_lora_exports_student_adapter_only(tiny_teacher, tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "ladd_lora")
    run_script("ladd", ["--teacher", tiny_teacher, "--output_dir", out, "--eval_num_samples", "0", "--lora_rank", "4",
                        *COMMON])
    base, teacher = unet_weights(out), unet_weights(tiny_teacher)
    for k in teacher:
        torch.testing.assert_close(base[k], teacher[k], rtol=0, atol=0)
    lora = load_file(os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    pipe = DigitsPipeline.from_pretrained(out)
    pipe.load_lora_weights(out)
    plain = DigitsPipeline.from_pretrained(out)
    kw = dict(num_inference_steps=1, output_type="latent")
    a = pipe([3, 4], generator=torch.Generator().manual_seed(0), **kw).images
    b = plain([3, 4], generator=torch.Generator().manual_seed(0), **kw).images
    assert (a - b).abs().max() > 1e-5


@pytest.mark.parametrize("script,argv,match", [
    ("fdistill", ["--divergence", "tv"], "divergence"),
    ("fdistill", ["--gan_discriminator_weight", "0"], "gan_discriminator_weight"),
    ("ladd", ["--student_update_freq", "1"], "student_update_freq"),
    ("ladd", ["--ladd_t_std", "0"], "ladd_t_std"),
])
def test_bad_arguments_fail_before_work(script, argv, match):
    module = load_script(script)
    args_cls = module.FDistillArgs if script == "fdistill" else module.LADDArgs
    from diffusers_fastgen.training import parse_args

    with pytest.raises(ValueError, match=match):
        parse_args(args_cls, argv)
