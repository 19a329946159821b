"""A multi-process CPU run must exit after it finishes: the gloo teardown deadlock (environment.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_distributed import free_port

TESTS = Path(__file__).parent
ITERATIONS = 200  # without finish_collectives, the two processes deadlock within about 20 (measured here)


def test_process_groups_ended_like_a_run_are_destroyed_without_deadlock():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    workers = [subprocess.Popen([sys.executable, str(TESTS / "teardown_worker.py"), str(rank), str(port),
                                 str(ITERATIONS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env) for rank in (0, 1)]
    deadline = time.monotonic() + 60  # it takes about 10 s
    try:
        for worker in workers:
            worker.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for worker in workers:
            worker.kill()
    outputs = [worker.communicate()[0] for worker in workers]
    done = [output.split()[-1] if output.split() else "0" for output in outputs]
    assert [worker.returncode for worker in workers] == [0, 0], (
        f"the processes stopped after {done} of {ITERATIONS} process groups (a deadlock if they timed out);"
        f" output of the first:\n{outputs[0][-3000:]}")
    assert done == [str(ITERATIONS)] * 2
