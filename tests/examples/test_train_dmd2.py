import os

import torch

from diffusers_fastgen.pipelines import DigitsPipeline
from diffusers_fastgen.schedulers import FlowMatchFewStepScheduler

from script_utils import assert_changed, file_digest, run_script, unet_weights


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
