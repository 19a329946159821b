"""Stopping a run cleanly: a signal (a preempted job, Ctrl-C) asks for a checkpoint at the next step boundary,
and under several processes they agree, at every step, to stop at the same one. Outside the steps (setting up,
decoding into the cache, sampling, any other command's work), SIGTERM raises where the work is, as Ctrl-C does
(cli.sigterm_stops)."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import torch
import torch.distributed as dist

from . import environment, signals

logger = logging.getLogger("uncond")  # cli shows its records on the main process only


class StopSignal:
    """SIGTERM or SIGINT (a preempted job, Ctrl-C) asks the run to save a checkpoint at the next step
    boundary and exit cleanly; a second SIGINT stops at once. So does the exit of the launcher that started
    this process (`launcher`, its pid): `accelerate launch` of one process passes no signal on, and dies of
    SIGTERM alone (`kill`, a sweep tool ending a trial), which would leave the run training on unseen."""

    def __init__(self, announce: bool = True, launcher: int | None = None) -> None:
        self.received: str | None = None  # the signal's name, or what else asked to stop
        self.handlers = signals.handled({signal.SIGTERM: self.handle, signal.SIGINT: self.handle})
        self.announce = announce  # on one process: every process of the launch gets a terminal's Ctrl-C
        self.launcher = launcher

    def __enter__(self) -> "StopSignal":
        self.handlers.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.handlers.__exit__(*exc_info)

    def asked(self) -> bool:
        """Whether a signal, or the launcher's exit, asked this process to stop."""
        if self.received is None and self.launcher is not None and os.getppid() != self.launcher:
            self.received = "the launcher's exit"  # this process was handed to another parent
            if self.announce:
                logger.warning(f"the launcher (pid {self.launcher}) exited: stopping with a checkpoint after the "
                               "current step")
        return self.received is not None

    def handle(self, number: int, frame: Any) -> None:
        # torchrun's agent (accelerate launch of several processes) passes a terminal's first Ctrl-C on as SIGINT
        # and, stopped by a second while it waits, ends the processes with SIGTERM: that is the second Ctrl-C
        # (it stopped with a checkpoint after 14 s more, "stopped by SIGTERM"; trial 66 F1)
        again = number == signal.SIGINT or (self.received == "SIGINT" and "TORCHELASTIC_RUN_ID" in os.environ)
        if self.received and again:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        if self.announce:  # a preview or export under way can take a while: say at once what happens
            # SIGTERM comes from a job scheduler or `kill`, whose user is at no terminal to press Ctrl-C
            again = "; Ctrl-C again stops at once, without one" if number == signal.SIGINT else ""
            logger.warning(f"{self.received}: stopping with a checkpoint after the current step (an export under "
                           f"way is finished, a preview left out){again}")


class StopAgreement:
    """Whether any process was asked to stop, agreed by all processes at every step without stalling it: each
    step's flags are summed by an all-reduce on a gloo group of its own, in the background (no GPU sync), and
    the sum is read at the next step, so every process stops at the same step, one after the signal. Launchers
    kill their processes soon after a signal (torchrun and accelerate launch: 30 s), so it must come quickly."""

    def __init__(self) -> None:
        self.group = dist.new_group(backend="gloo")  # every process creates it, at the same point
        self.pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, asked_here: bool, at_once: bool = False) -> bool:
        """Whether a process was asked to stop by the previous call (or, `at_once`, by this one: the all-reduce
        is then waited for, where the processes wait for each other anyway). Every process calls it alike."""
        agreed = False
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            agreed = flags.item() > 0
            self.pending = None
        flags = torch.tensor([float(asked_here)])
        work = dist.all_reduce(flags, group=self.group, async_op=True)
        if at_once:
            work.wait()
            return agreed or flags.item() > 0
        self.pending = (work, flags)
        return agreed

    def finish(self) -> None:
        """Wait for the last all-reduce, and keep it (environment.finish_collectives says why)."""
        if self.pending is not None:
            self.pending[0].wait()
            environment.keep_until_exit(self.pending[0])
