"""How often a finished two-process gloo DDP run aborts at exit, with and without `training.run_main`.

    python benchmarks/ddp_exit.py --runs 40 --load 1

Each run launches a plain accelerate DDP script (a Linear layer, two backward passes, wait_for_everyone,
end_training) on two CPU processes while `--load` busy-looping processes compete for the cores. "finalize"
lets the interpreter finalize as usual; "run_main" leaves through `run_main` (flush, os._exit). A failure is a
non-zero exit code (a rank aborting with "terminate called without an active exception") or a hang (a rank
deadlocked in ~ProcessGroupGloo, joining a gloo worker that waits for the GIL the finalizing main thread
holds; seen with gdb).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

SCRIPT = '''
import sys, torch
from accelerate import Accelerator
from diffusers_fastgen.training import run_main

def main():
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 4))
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
    accelerator.wait_for_everyone()
    accelerator.end_training()

if sys.argv[1] == "run_main":
    run_main(main)
else:
    main()
'''

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end: pass\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--load", type=int, default=1, help="busy-looping processes beside the launch")
    parser.add_argument("--port", type=int, default=29790)
    parser.add_argument("--timeout", type=float, default=120.0, help="a launch still running after this hung")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "ddp_exit_probe.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.load)]
        try:
            for mode in ("finalize", "run_main"):
                failures, aborts, hangs = 0, 0, 0
                for _ in range(args.runs):
                    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", str(args.port), script, mode]
                    try:
                        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                              env={**os.environ, "OMP_NUM_THREADS": "1"})
                    except subprocess.TimeoutExpired:  # killed with its process group below
                        failures, hangs = failures + 1, hangs + 1
                        subprocess.run(["pkill", "-9", "-f", script])
                        continue
                    failures += proc.returncode != 0
                    aborts += "terminate called without an active exception" in proc.stderr
                print(f"{mode}: {failures}/{args.runs} runs failed ({aborts} aborted with 'terminate called without an "
                      f"active exception', {hangs} hung past {args.timeout:g} s); load {args.load}", flush=True)
        finally:
            for p in busy:
                p.kill()


if __name__ == "__main__":
    main()
