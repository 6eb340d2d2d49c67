"""torch FSDP2 (`fully_shard`) on the shared-base LoRA layout of DMD2, two gloo ranks on CPU: the
sharded run equals per-rank unsharded replicas with hand-averaged gradients, parameters really are
sharded, the frozen base never changes, and both adapters (and the GAN head) train."""

import json
import os
import sys

import pytest
from launch_utils import run_launcher

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp2_lora_worker.py")


@pytest.mark.parametrize("mode,port", [("gan", 29542)])  # the GAN mode runs the plain steps plus the head
def test_fully_shard_shared_base_lora_matches_replicas(tmp_path, mode, port):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = run_launcher([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(port), WORKER, str(out), mode], env, tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["sharded_params"] > 100
    assert r["max_err"] < 1e-6 and r["head_err"] < 1e-6  # sharded == replicated DDP semantics
    assert r["base_err"] == 0.0  # the teacher (frozen base) is untouched
    assert r["lora_change"]["student"] > 1e-5 and r["lora_change"]["fake_score"] > 1e-5
    if mode == "gan":
        assert r["head_change"] > 1e-5
