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
    if stop_at == "setup":  # as the process group starts, which the others then wait in
        make_accelerator = train.make_accelerator

        def signalled_in_setup(*args, **kwargs):
            if os.environ.get("RANK") == rank:
                os.kill(os.getpid(), stop_signal)
            return make_accelerator(*args, **kwargs)

        train.make_accelerator = signalled_in_setup
        return cli.console(argv)
    if stop_at == "preview":
        generate = sampling.generate

        def signalled_in_preview(*args, **kwargs):
            if os.environ.get("RANK") == rank:
                os.kill(os.getpid(), stop_signal)
            return generate(*args, **kwargs)

        sampling.generate = signalled_in_preview
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
