"""Helpers for the example-script smoke tests."""

import hashlib
import importlib.util
import os
import sys

import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(name):
    """Import examples/train_<name>/train_<name>.py as a module."""
    path = os.path.join(ROOT, "examples", f"train_{name}", f"train_{name}.py")
    spec = importlib.util.spec_from_file_location(f"train_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_script(name, argv):
    AcceleratorState._reset_state(True)
    load_script(name).main(argv)
    AcceleratorState._reset_state(True)


def file_digest(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def unet_weights(folder):
    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def assert_changed(before: dict, after: dict):
    assert before.keys() == after.keys()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > len(before) // 2, f"only {changed}/{len(before)} tensors changed"




# the causal-video scripts' tiny moving-digits runs
VIDEO_TINY = ["--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "12", "--ffn_dim", "32"]
VIDEO_COMMON = ["--max_train_steps", "2", "--train_batch_size", "4", "--report_to", "none", "--ema_schedule",
                "constant", "--ema_decay", "0.0", "--learning_rate", "1e-3", "--eval_num_videos", "20"]
