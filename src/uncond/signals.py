"""Signal handlers set for a piece of work and put back after it. Imports no torch: cli sets SIGTERM's before a
command imports it (the first 1.5 s of a job)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


@contextlib.contextmanager
def handled(handlers: dict[int, Any]) -> Iterator[None]:
    """`handlers` (signal number -> a function, or signal.SIG_DFL) while the block runs, the earlier ones after it.
    Off the main thread nothing changes: Python sets and runs handlers there only. A signal ignored when the block
    starts stays ignored: a shell without job control starts background jobs (`uncond train ... &` in a script)
    with SIGINT ignored, so that a Ctrl-C meant for the foreground does not reach them, and Python keeps that at
    start-up; a handler set over it made the same `kill -INT` ignored in a job's first seconds and a stop later.
    The glibc manual's idiom ("Basic Signal Handling": children should respect this); such a job stops on
    SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, handler) for number, handler in handlers.items()
                if signal.getsignal(number) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
