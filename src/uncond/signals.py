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
            if not holds_the_outcome(signal.getsignal(number)):  # said within the block: held to the command's end
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


OUTCOME_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The signals held since the command under way said its outcome, one list per command (cli.main inside cli.main
# would nest them): set and read on the main thread only, where Python runs handlers.
outcomes_under_way: list[list[int]] = []


@contextlib.contextmanager
def outcome_kept() -> Iterator[list[int]]:
    """Around a command: once it has said how it ended (outcome_said), a SIGTERM or Ctrl-C is held in the list this
    yields, to its end, rather than stopping it: in the milliseconds between `done:` and the command's return
    (freeing memory, unlocking the folder) it made a finished run's status 143 or 130, "stopped", and a scheduler
    ran it again (trial 56 F3). The caller delivers them once the command is over; the handlers it had are back."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # no handler runs there
        yield received
        return
    before = {number: signal.getsignal(number) for number in OUTCOME_SIGNALS}
    outcomes_under_way.append(received)
    try:
        yield received
    finally:
        outcomes_under_way.remove(received)
        for number, handler in before.items():
            if holds_the_outcome(signal.getsignal(number)):  # (the caller may have set its own since)
                signal.signal(number, handler)
        received[:] = dict.fromkeys(received)  # each once, in the order they came


def outcome_said() -> None:
    """The command has decided how it ended and says so now: the signals its handlers would stop it on are held
    from here to the end of outcome_kept (and a `handled` block ending leaves them held)."""
    if not outcomes_under_way or threading.current_thread() is not threading.main_thread():
        return
    received = outcomes_under_way[-1]

    def hold(number: int, frame: Any) -> None:
        received.append(number)

    hold.holds_the_outcome = True  # type: ignore[attr-defined]
    for number in OUTCOME_SIGNALS:
        if callable(signal.getsignal(number)):  # a default or ignored signal is left as it is
            signal.signal(number, hold)


def holds_the_outcome(handler: Any) -> bool:
    return getattr(handler, "holds_the_outcome", False)
