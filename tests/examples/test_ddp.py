"""Two CPU processes (gloo DDP) run the digits DMD2 script to completion with replicas in sync."""

import os
import subprocess
import sys

import pytest

from script_utils import ROOT


def _launch(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           os.path.join(ROOT, "examples", "train_dmd2", "train_dmd2.py"), *args]
    return subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_dmd2_two_process_ddp(tiny_teacher, tmp_path, lora_rank):
    out = str(tmp_path / "ddp")
    proc = _launch(["--teacher", tiny_teacher, "--output_dir", out, "--max_train_steps", "2", "--train_batch_size", "4",
                    "--student_update_freq", "2", "--eval_num_samples", "0", "--report_to", "none",
                    "--lora_rank", str(lora_rank)], tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "DDP replicas in sync across 2 processes" in log
    saved = "pytorch_lora_weights.safetensors" if lora_rank else "model_index.json"
    assert os.path.isfile(os.path.join(out, saved))
