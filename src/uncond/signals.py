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


@contextlib.contextmanager
def deferred(numbers: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Around a library call that builds Python objects from native code (safetensors makes its tensors through
    torch from Rust): a handler that raises (a stop, KeyboardInterrupt) inside it had its exception replaced by
    the library's own error, and a SIGTERM while a checkpoint loaded said the checkpoint was damaged, status 2
    (trial 55 F2). Signals whose handlers are Python functions are held while the block runs, then delivered to
    them as it ends. For short local reads only: a stop waits for the block."""
    received: list[int] = []

    def hold(number: int, frame: Any) -> None:
        received.append(number)

    held = [number for number in numbers if callable(signal.getsignal(number))]
    try:
        with handled(dict.fromkeys(held, hold)):
            yield
    finally:  # also where the block failed: the stop then says so rather than the failure
        for number in dict.fromkeys(received):  # each once, in the order they came
            signal.raise_signal(number)
