import os

import torch
from script_utils import assert_changed, file_digest, run_script, unet_weights

from diffusers_fastgen.pipelines import DigitsPipeline


def test_kd_two_steps(tiny_teacher, tmp_path):
    teacher_file = os.path.join(tiny_teacher, "unet", "diffusion_pytorch_model.safetensors")
    digest = file_digest(teacher_file)
    out = str(tmp_path / "kd")
    run_script("kd", ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "2",
                      "--train_batch_size", "8", "--num_pairs", "24", "--teacher_steps", "4",
                      "--eval_num_samples", "20", "--report_to", "none", "--learning_rate", "1e-3"])
    assert file_digest(teacher_file) == digest  # teacher untouched
    assert_changed(unet_weights(tiny_teacher), unet_weights(out))  # student moved away from its teacher init
    pipe = DigitsPipeline.from_pretrained(out)
    # The saved recipe is the training schedule: 2 steps at [1, 0.5, 0].
    pipe.scheduler.set_timesteps(2)
    torch.testing.assert_close(pipe.scheduler.sigmas.float(), torch.tensor([1.0, 0.5, 0.0]))
    assert pipe([4], num_inference_steps=1, output_type="latent").images.shape == (1, 1, 8, 8)
    assert os.path.isfile(os.path.join(out, "samples_1step.png")) and os.path.isfile(os.path.join(out, "benchmark.md"))
    (pairs,) = os.listdir(os.path.join(out, "teacher_pairs"))
    assert os.path.isfile(os.path.join(out, "teacher_pairs", pairs, "recipe.json"))
