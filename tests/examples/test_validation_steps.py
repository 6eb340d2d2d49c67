"""`--validation_steps N` writes a sample grid of the EMA student every N steps in every script, and the
validation does not change training: the final weights equal those of a run without it, bit for bit."""

import os

import pytest
import torch
from safetensors.torch import load_file
from script_utils import VIDEO_COMMON, run_script


def _final(folder, sub):
    return load_file(os.path.join(folder, sub, "diffusion_pytorch_model.safetensors"))


def _grids(out):
    return sorted(os.listdir(os.path.join(out, "samples"))) if os.path.isdir(os.path.join(out, "samples")) else []


@pytest.mark.parametrize("script,extra", [
    ("dmd2", ["--student_update_freq", "2", "--num_student_steps", "2"]),
    ("dmd2", ["--student_update_freq", "2", "--lora_rank", "2"]),
    ("cm", []),
    ("kd", ["--num_pairs", "16", "--teacher_steps", "4"]),
])
def test_digits_scripts_validate_without_changing_training(tiny_teacher, tmp_path, script, extra):
    common = ["--teacher", tiny_teacher, "--max_train_steps", "2", "--train_batch_size", "4", "--eval_num_samples", "0",
              "--report_to", "none", "--checkpointing_steps", "0", *extra]
    with_val, without = str(tmp_path / "val"), str(tmp_path / "plain")
    run_script(script, [*common, "--output_dir", with_val, "--validation_steps", "1"])
    run_script(script, [*common, "--output_dir", without, "--validation_steps", "0"])
    assert _grids(with_val) == ["step_000001.png", "step_000002.png"]
    assert _grids(without) == []
    name = "pytorch_lora_weights.safetensors" if "--lora_rank" in extra else None
    a = load_file(os.path.join(with_val, name)) if name else _final(with_val, "unet")
    b = load_file(os.path.join(without, name)) if name else _final(without, "unet")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_video_script_validates_without_changing_training(video_teacher, tmp_path):
    common = ["--teacher", video_teacher, "--num_student_steps", "2", "--checkpointing_steps", "0",
              *VIDEO_COMMON[:-2], "--eval_num_videos", "0"]
    with_val, without = str(tmp_path / "val"), str(tmp_path / "plain")
    run_script("self_forcing", [*common, "--output_dir", with_val, "--validation_steps", "2", "--student_update_freq", "1"])
    run_script("self_forcing", [*common, "--output_dir", without, "--validation_steps", "0", "--student_update_freq", "1"])
    assert _grids(with_val) == ["step_000002.png"]
    a, b = _final(with_val, "transformer"), _final(without, "transformer")
    for k in a:
        assert torch.equal(a[k], b[k]), k
