"""uncond's CLI, where the process of rank STOP_RANK sends itself SIGTERM just before optimizer step STOP_AT, for
test_distributed.py's stop test (a signal that reaches one process of a launch, at a known step)."""

from __future__ import annotations

import os
import signal
import sys

from uncond import cli, train


def main(argv: list[str]) -> int:
    step_function, rank, stop_at = train.train_step, os.environ["STOP_RANK"], int(os.environ["STOP_AT"])

    def signalled_before_step(run, micro_batches):
        if os.environ.get("RANK") == rank and run.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_function(run, micro_batches)

    train.train_step = signalled_before_step
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
