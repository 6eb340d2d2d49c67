"""Run a multi-process launcher (accelerate launch, torchrun) from a test without ever hanging the suite."""

import subprocess
import tempfile

import psutil


def run_launcher(cmd, env, cwd, timeout):
    """Like subprocess.run(capture_output=True, text=True, timeout=...), for launchers whose ranks outlive them.

    torchrun starts every rank in a session of its own, so killing the launcher's process group misses a hung
    rank, and a hung rank holding the launcher's stdout pipe open made `communicate()` wait forever (a CI run
    ran out of its time that way). Output goes to files instead of pipes, and on a timeout every descendant of
    the launcher, found through the process tree, is killed before TimeoutExpired is raised."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def kill_tree(pid):
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
