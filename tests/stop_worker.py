"""uncond's CLI, where the process of rank STOP_RANK sends itself SIGTERM (or STOP_SIGNAL) just before optimizer
step STOP_AT (or, with STOP_AT=preview, as its first sample grid starts; setup, as its process group starts), for
test_distributed.py's stop tests (a signal that reaches one process of a launch, at a known point)."""

from __future__ import annotations

import os
import signal
import sys

from uncond import cli, sampling, train


def main(argv: list[str]) -> int:
    rank, stop_at = os.environ["STOP_RANK"], os.environ["STOP_AT"]
    stop_signal = getattr(signal, os.environ.get("STOP_SIGNAL", "SIGTERM"))
    # setup: as the process group starts, which the others then wait in; preview: as the first grid starts
    called = {"setup": (train, "make_accelerator"), "preview": (sampling, "generate")}
    if stop_at in called:
        module, name = called[stop_at]
        function = getattr(module, name)

        def signalled_first(*args, **kwargs):
            if os.environ.get("RANK") == rank:
                os.kill(os.getpid(), stop_signal)
            return function(*args, **kwargs)

        setattr(module, name, signalled_first)
        return cli.console(argv)
    step_function, stop_at = train.train_step, int(stop_at)

    def signalled_before_step(run, micro_batches):
        if os.environ.get("RANK") == rank and run.step + 1 == stop_at:
            os.kill(os.getpid(), stop_signal)
        return step_function(run, micro_batches)

    train.train_step = signalled_before_step
    return cli.console(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
