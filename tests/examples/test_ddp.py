"""Two CPU processes (gloo DDP) run the distillation scripts to completion with replicas in sync: on
digits DMD2 (full, LoRA, and with the GAN branch + approximate R1 in both modes), LADD, sCM and MeanFlow (with
the adversarial term);
on moving digits CausalSFT, CausalKD, CausVid and Self-Forcing (whose student runs several forwards
with gradient, one per block, inside one DDP backward)."""

import os
import subprocess
import sys

import pytest
from launch_utils import run_launcher
from script_utils import ROOT


def _launch(script, args, tmp_path, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           os.path.join(ROOT, "examples", f"train_{script}", f"train_{script}.py"), *args]
    # each run takes 8-20 s. A two-process gloo launch can still hang now and then (after training.run_main's
    # fixes; a CI run once hung forever on one, another hung twice in a row on LADD, which passes in 7 s alone): the
    # hung launch is killed whole after 90 s and retried on a fresh port, up to three launches; a third hang fails.
    for attempt in range(3):
        cmd[cmd.index("--main_process_port") + 1] = str(port + 100 * attempt)
        try:
            return run_launcher(cmd, env, tmp_path, timeout=90)
        except subprocess.TimeoutExpired:
            if attempt == 2:
                raise


GAN = ["--gan_generator_weight", "0.01", "--gan_discriminator_weight", "0.1", "--r1_weight", "0.1"]


@pytest.mark.parametrize("script,extra,port", [
    ("dmd2", ["--lora_rank", "0"], 29517),  # full mode; LoRA + GAN below covers the adapters and the head together
    ("dmd2", ["--lora_rank", "2", *GAN], 29520),
    ("ladd", ["--lora_rank", "0"], 29521),
])
def test_two_process_ddp(tiny_teacher, tmp_path, script, extra, port):
    out = str(tmp_path / "ddp")
    # 3 student steps x 2 iterations: every player updates at least twice, so a DDP reducer left waiting
    # by an unsynchronised forward would fail on the next iteration.
    proc = _launch(script, ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "3",
                            "--train_batch_size", "4", "--student_update_freq", "2", "--eval_num_samples", "0",
                            "--report_to", "none", *extra], tmp_path, port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "DDP replicas in sync across 2 processes" in log
    saved = "pytorch_lora_weights.safetensors" if "2" in extra[:2] else "model_index.json"
    assert os.path.isfile(os.path.join(out, saved))


@pytest.mark.parametrize("script,extra,port", [("scm", [], 29522), ("meanflow", ["--adv_weight", "0.5"], 29523)])
def test_two_process_ddp_exact_jvp(tiny_teacher, tmp_path, script, extra, port):
    """The exact JVP runs through the DDP-wrapped student (dual tensors, not functorch's wrappers, which
    DDP's forward rejects); replicas on different data stay equal only if the gradients were all-reduced. The
    MeanFlow run also has the adversarial term: the student runs again (its 1-step jump) inside the same DDP
    backward, and the heads are a second DDP player updated after it."""
    out = str(tmp_path / "ddp")
    proc = _launch(script, ["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "3",
                            "--train_batch_size", "4", "--eval_num_samples", "0", "--report_to", "none",
                            "--jvp_method", "exact", *extra], tmp_path, port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "DDP replicas in sync across 2 processes" in log
    assert os.path.isfile(os.path.join(out, "model_index.json"))


@pytest.mark.parametrize("script,extra,port", [
    ("causal_sft", ["--num_frames_per_block", "2", "--sample_steps", "2", "--cond_dropout", "0.2"], 29524),
    ("causal_kd", ["--num_pairs", "8", "--teacher_steps", "4"], 29525),
    ("causvid", ["--student_update_freq", "2", "--guidance_scale", "2.0"], 29526),
    # the exit step is a random draw per iteration: these seeds draw exit steps > 0 on student updates,
    # where the gradient forward follows no-grad forwards that filled the text cache (a DDP crash once);
    # the second runs the LoRA players (three adapters' worth of unused parameters per forward)
    ("self_forcing", ["--student_update_freq", "2", "--guidance_scale", "2.0", "--seed", "2"], 29528),
    ("self_forcing", ["--student_update_freq", "1", "--seed", "5", "--lora_rank", "2"], 29529),
])
def test_two_process_ddp_video(video_teacher, tmp_path, script, extra, port):
    out = str(tmp_path / "ddp")
    init = ["--init_from", video_teacher] if script == "causal_sft" else ["--teacher", video_teacher,
                                                                           "--num_student_steps", "2"]
    proc = _launch(script, [*init, "--output_dir", out, "--max_train_steps", "3", "--train_batch_size", "4",
                            "--eval_num_videos", "0", "--report_to", "none", *extra], tmp_path, port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "DDP replicas in sync across 2 processes" in log
    assert os.path.isfile(os.path.join(out, "model_index.json"))

