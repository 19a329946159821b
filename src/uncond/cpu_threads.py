"""PyTorch's CPU threads on a machine shared with other work. PyTorch's CPU wheels use GNU OpenMP, whose threads
work in lockstep and spin while they wait for each other: beside another busy process, a step waits for the
thread that lost its core, and the spinning ones take the cores the working ones need. On 2 cores beside another
PyTorch job the demo trained at 12.7 images/s (258 alone; 20 times slower than alone in a user's trial), and on
one thread at 90.9 (docs/benchmarks.md). So while other processes keep cores busy, a CPU run trains on the cores
left (at least one thread), and goes back to all of them when they are done; so does sampling (previews,
`uncond sample`, `uncond evaluate`). It does nothing where the threads were chosen (OMP_NUM_THREADS, a
launcher's), off Linux, or on a GPU.

Others' share of the run's cores is read from Linux's /proc by hand (psutil reads the same files, and is not among
uncond's dependencies): the busy time of the process's CPUs (/proc/stat; a container's cpuset only) less its own
and its child processes' (/proc/PID/stat; its data workers are threads of its own). A machine-wide load average
would count the run's own threads."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

logger = logging.getLogger("uncond")

CHECK_EVERY_SECONDS = 10.0
AGREEING_CHECKS = 2  # a change needs two checks in a row that want it: no switching back and forth on a blip
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_times(cpus: set[int]) -> tuple[float, float]:
    """Busy and idle seconds of `cpus` since boot (/proc/stat's per-CPU lines: a container's cpuset only)."""
    busy = idle = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(tick) for tick in ticks[:8]]  # user nice system idle iowait irq softirq steal
            idle += values[3] + values[4]
            busy += sum(values) - values[3] - values[4]
    return busy / CLOCK_TICKS, idle / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds used by this process (its threads, the data workers among them) and its live children, from
    /proc."""
    pids = [os.getpid()]
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except OSError:  # a thread that ended meanwhile
            pass
    seconds = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a worker that ended meanwhile
            continue
        seconds += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return seconds


class CpuNeighbours:
    """How many of this process's cores other processes kept busy since the last look."""

    def __init__(self) -> None:
        self.cpus = os.sched_getaffinity(0)
        self.last = self.read()

    def read(self) -> tuple[float, float, float]:
        busy, idle = cpu_times(self.cpus)
        return busy, idle, own_cpu_seconds()

    def busy_cores(self) -> float:
        (busy, idle, own), (last_busy, last_idle, last_own) = self.read(), self.last
        self.last = busy, idle, own
        elapsed = (busy - last_busy) + (idle - last_idle)  # CPU seconds of every core together
        if elapsed <= 0:
            return 0.0
        return max(0.0, (busy - last_busy) - (own - last_own)) / elapsed * len(self.cpus)


class ThreadGovernor:
    """Keeps torch's CPU threads to the cores other processes leave free, checked every CHECK_EVERY_SECONDS at
    step boundaries (`adjust`), between 1 and the thread count the work started with. `doing` names the work in
    the log ("training on 1 of 2 threads")."""

    def __init__(self, neighbours: CpuNeighbours | None, clock=time.monotonic, doing: str = "training") -> None:
        self.neighbours, self.clock, self.doing = neighbours, clock, doing
        self.most = torch.get_num_threads()
        self.fewest = self.most  # the fewest it set: weights are bitwise those of a quiet machine only without a change
        self.wanted: deque[int] = deque(maxlen=AGREEING_CHECKS)  # the thread counts of the latest looks
        self.next_check = clock() + CHECK_EVERY_SECONDS

    @property
    def active(self) -> bool:
        return self.neighbours is not None

    @classmethod
    def for_run(cls, device: torch.device, doing: str = "training") -> ThreadGovernor:
        """Active for a CPU run on Linux whose threads nobody chose; otherwise one that does nothing."""
        chosen = [name for name in THREAD_VARIABLES if os.environ.get(name)]
        usable = device.type == "cpu" and not chosen and torch.get_num_threads() > 1 and Path("/proc/stat").exists()
        return cls(CpuNeighbours() if usable else None, doing=doing)

    def adjust(self) -> None:
        if not self.active or self.clock() < self.next_check:
            return
        self.next_check = self.clock() + CHECK_EVERY_SECONDS
        try:
            others = self.neighbours.busy_cores()
        except (OSError, ValueError, IndexError):  # a /proc unlike Linux's (a sandbox's): train on as it is
            self.neighbours = None
            return
        self.wanted.append(max(1, min(self.most, round(len(self.neighbours.cpus) - others))))
        current = torch.get_num_threads()
        if len(self.wanted) == AGREEING_CHECKS and len(set(self.wanted)) == 1 and self.wanted[0] != current:
            torch.set_num_threads(self.wanted[0])
            self.fewest = min(self.fewest, self.wanted[0])
            if self.wanted[0] < current:
                logger.info(f"other processes keep {others:.1f} of this run's {len(self.neighbours.cpus)} cores busy: "
                            f"{self.doing} on {self.wanted[0]} of {self.most} threads while they do (all of them "
                            f"beside other work run many times slower; OMP_NUM_THREADS={self.most} keeps {self.most})")
            else:
                logger.info(f"the other processes left cores free: {self.doing} on {self.wanted[0]} of {self.most} "
                            "threads")


@contextmanager
def governed_threads(device: torch.device, doing: str) -> Iterator[ThreadGovernor]:
    """A governor for work of its own (sampling), the thread count it started with given back after it: to a
    notebook, or to a training run whose preview this is."""
    governor = ThreadGovernor.for_run(device, doing)
    try:
        yield governor
    finally:
        torch.set_num_threads(governor.most)
