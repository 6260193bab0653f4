"""Shared by the tests that launch torchrun (test_distributed.py, test_eval.py)."""
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, nproc=2, shutdown_timeout=5):
    """Start `torchrun --standalone --nproc_per_node=nproc script args` (CPU, gloo) from the repository root."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--shutdown_timeout={shutdown_timeout}", script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc):
    """End a torchrun launch and its workers: SIGTERM reaches the workers through torchrun (which kills them
    after its shutdown timeout); SIGKILL if torchrun itself does not end. Returns (stdout, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.fixture(scope="session")
def torchrun():
    """torchrun(script, *args, nproc=2, timeout=300) -> stdout; the test fails with the output if it fails or hangs
    (a collective that not every rank joined), and no worker outlives it."""
    def run(script, *args, nproc=2, timeout=300):
        proc = launch(script, *args, nproc=nproc)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _, stderr = stop(proc)
            pytest.fail(f"torchrun {script} hung for {timeout} s (a collective that not every rank joined?):\n"
                        f"{stderr[-3000:]}")
        finally:
            stop(proc)
        if proc.returncode != 0:
            pytest.fail(f"torchrun {script} failed ({proc.returncode}):\n{stdout[-3000:]}\n{stderr[-5000:]}")
        return stdout
    return run
