"""Fault injection on the digits scripts: a NaN at a chosen step stops the run with a message naming the
step and the player; the finite checkpoints before it stay, nothing non-finite is written; a teacher
with NaN weights stops at the first update; a user's pairs folder is never deleted."""

import json
import os
import shutil

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from script_utils import load_script, run_script

from diffusers_fastgen.training import NonFiniteError, list_checkpoints


def _run_with_nan_at(name, step_fn, nan_at, argv):
    """Run script `name` with its `step_fn` returning NaN on call `nan_at` (1-based)."""
    module = load_script(name)
    original, calls = getattr(module, step_fn), []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == nan_at else loss

    setattr(module, step_fn, poisoned)
    AcceleratorState._reset_state(True)
    try:
        module.main(argv)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("nan_at", [3, 4])
def test_dmd2_stops_at_the_nan_step_and_keeps_the_finite_checkpoints(tiny_teacher, tmp_path, nan_at):
    out = str(tmp_path / "dmd2")
    argv = ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "6", "--train_batch_size", "4",
            "--student_update_freq", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
            "--eval_num_samples", "0", "--report_to", "none"]
    with pytest.raises(NonFiniteError, match=f"student update at step {nan_at}"):
        _run_with_nan_at("dmd2", "student_step", nan_at, argv)
    kept = [os.path.basename(p) for p in list_checkpoints(out)]
    assert kept == [f"checkpoint-{nan_at - 2}", f"checkpoint-{nan_at - 1}"]
    for path in list_checkpoints(out):
        for file in os.listdir(path):
            if file.endswith(".safetensors"):
                assert all(torch.isfinite(t).all() for t in load_file(os.path.join(path, file)).values())
    assert not os.path.exists(os.path.join(out, "model_index.json"))  # no pipeline saved


def test_dmd2_skips_a_bounded_number_of_nan_updates_when_asked(tiny_teacher, tmp_path):
    out = str(tmp_path / "dmd2")
    _run_with_nan_at("dmd2", "student_step", 2, [
        "--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "3", "--train_batch_size", "4",
        "--student_update_freq", "1", "--checkpointing_steps", "0", "--max_nonfinite_skips", "1",
        "--eval_num_samples", "0", "--report_to", "none"])
    weights = load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    # The run summary counts the skip and the steps actually applied.
    with open(os.path.join(out, "run_summary.json")) as f:
        summary = json.load(f)
    assert (summary["script"], summary["steps"], summary["started_at_step"]) == ("train_dmd2", 3, 0)
    assert summary["skipped_nonfinite_updates"] == 1 and summary["output_dir"] == out
    assert summary["training_seconds"] <= summary["wall_seconds"]


def test_kd_with_a_nan_teacher_saves_nothing(tiny_teacher, tmp_path):
    teacher = str(tmp_path / "nan_teacher")
    shutil.copytree(tiny_teacher, teacher)
    file = os.path.join(teacher, "unet", "diffusion_pytorch_model.safetensors")
    weights = load_file(file)
    name = next(k for k in weights if k.endswith("conv_out.weight"))
    weights[name][0, 0, 0, 0] = float("nan")
    save_file(weights, file)
    out = str(tmp_path / "kd")
    with pytest.raises(NonFiniteError, match="student update at step 1"):
        run_script("kd", ["--teacher", teacher, "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "8",
                          "--num_pairs", "16", "--teacher_steps", "4", "--eval_num_samples", "0", "--report_to", "none"])
    assert not os.path.exists(os.path.join(out, "model_index.json"))


@pytest.mark.parametrize("argv,match", [
    (["--learning_rate", "inf"], "learning_rate"),
    (["--learning_rate", "nan"], "learning_rate"),
    (["--teacher_guidance_scale", "nan"], "teacher_guidance_scale"),
])
def test_non_finite_arguments_are_rejected_before_any_work(tiny_teacher, tmp_path, argv, match):
    out = tmp_path / "kd"
    with pytest.raises(ValueError, match=match):
        run_script("kd", ["--teacher", tiny_teacher, "--output_dir", str(out), *argv])
    assert not out.exists()


def test_kd_never_deletes_a_user_pairs_folder(tiny_teacher, tmp_path):
    user = tmp_path / "my_data"
    user.mkdir()
    (user / "precious.txt").write_text("keep me")
    (user / "recipe.json").write_text("{\"not\": \"ours\"}")
    out = str(tmp_path / "kd")
    argv = ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "1", "--train_batch_size", "8",
            "--num_pairs", "16", "--teacher_steps", "4", "--eval_num_samples", "0", "--report_to", "none",
            "--pairs_dir", str(user)]
    run_script("kd", argv)
    assert (user / "precious.txt").read_text() == "keep me" and (user / "recipe.json").read_text() == "{\"not\": \"ours\"}"
    owned = [n for n in os.listdir(user) if n.startswith("pairs-")]
    assert len(owned) == 1 and os.path.isfile(user / owned[0] / "recipe.json")
    stamp = os.path.getmtime(user / owned[0] / "recipe.json")
    run_script("kd", argv)  # same recipe: reused, not rewritten
    assert os.path.getmtime(user / owned[0] / "recipe.json") == stamp
    run_script("kd", [*argv, "--num_pairs", "24"])  # another recipe: a second owned folder beside the first
    assert len([n for n in os.listdir(user) if n.startswith("pairs-")]) == 2
    assert (user / "precious.txt").read_text() == "keep me"


def test_a_teacher_folder_of_the_wrong_pipeline_names_its_class(tiny_teacher, video_teacher, tmp_path):
    with pytest.raises(ValueError, match="holds a CausalWanPipeline; this script needs a DigitsPipeline"):
        run_script("dmd2", ["--teacher", video_teacher, "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="holds a DigitsPipeline; this script needs a CausalWanPipeline"):
        run_script("self_forcing", ["--teacher", tiny_teacher, "--output_dir", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="no model_index.json"):
        run_script("kd", ["--teacher", str(tmp_path), "--output_dir", str(tmp_path / "c")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
