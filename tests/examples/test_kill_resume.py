"""Fault injection with real processes: a digits run killed with SIGKILL (during a checkpoint save, and at
a random moment) and resumed with `--resume_from_checkpoint latest` ends with the weights of an
uninterrupted run, bit for bit; every listed checkpoint stays loadable."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from script_utils import ROOT

from diffusers_fastgen.training import list_checkpoints
from diffusers_fastgen.training.checkpoint import verify_checkpoint

STEPS = 24


def _cmd(teacher, out, resume=False):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_cm", "train_cm.py"), "--teacher", teacher,
           "--output_dir", out, "--max_train_steps", str(STEPS), "--train_batch_size", "4", "--checkpointing_steps", "1",
           "--checkpoints_total_limit", "2", "--eval_num_samples", "0", "--report_to", "none"]
    return cmd + (["--resume_from_checkpoint", "latest"] if resume else [])


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _kill_when(cmd, ready, deadline=120.0):
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; True if it was killed (not finished first)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    proc.wait()
    return False


def _weights(out):
    return load_file(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))


def test_sigkill_during_a_save_and_at_a_random_step_then_resume_is_exact(tiny_teacher, tmp_path):
    ref = str(tmp_path / "ref")
    subprocess.run(_cmd(tiny_teacher, ref), env=ENV, check=True, capture_output=True, timeout=180)
    expected = _weights(ref)

    out = str(tmp_path / "run")
    ckpts = os.path.join(out, "checkpoints")
    rng = random.Random(0)
    target = rng.randint(4, STEPS - 6)  # a random step to die after
    killed = [
        # 1. killed while a checkpoint is being written (its .tmp folder exists)
        _kill_when(_cmd(tiny_teacher, out), lambda: bool(glob.glob(os.path.join(ckpts, "checkpoint-*.tmp")))),
        # 2. resumed, then killed once it has passed a random step
        _kill_when(_cmd(tiny_teacher, out, resume=True),
                   lambda: any(int(p.rsplit("-", 1)[1]) >= target for p in list_checkpoints(out))),
    ]
    assert any(killed)  # at least one kill landed before the run finished
    for path in list_checkpoints(out):
        verify_checkpoint(path)
    subprocess.run(_cmd(tiny_teacher, out, resume=True), env=ENV, check=True, capture_output=True, timeout=180)
    got = _weights(out)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    with open(os.path.join(out, "run_summary.json")) as f:
        summary = json.load(f)  # the last (resumed) run's summary
    assert summary["steps"] == STEPS and 0 < summary["started_at_step"] <= STEPS
    assert summary["steps_this_run"] == STEPS - summary["started_at_step"]
