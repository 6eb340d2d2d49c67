"""The launcher runner used by the multi-process tests kills a hung rank that lives in a session of its own
(as torchrun starts them) and still holds the launcher's output open."""

import subprocess
import sys
import threading
import time

import psutil
from launch_utils import run_launcher

LAUNCHER = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; print('rank up', flush=True); time.sleep(600)"],
                        start_new_session=True)
print(rank.pid, flush=True)
time.sleep(600)
"""


def test_a_hung_rank_in_its_own_session_is_killed_on_timeout(tmp_path):
    result = {}

    def run():
        try:
            run_launcher([sys.executable, "-c", LAUNCHER], None, tmp_path, timeout=3)
        except subprocess.TimeoutExpired as exc:
            result["exc"] = exc

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "run_launcher hung past its timeout"
    assert "exc" in result and time.monotonic() - start < 30
    rank_pids = [p.pid for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and "print('rank up'" in " ".join(p.info["cmdline"])]
    assert rank_pids == []  # the rank was killed with its launcher


def test_output_and_return_code_come_back(tmp_path):
    proc = run_launcher([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                        None, tmp_path, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")

