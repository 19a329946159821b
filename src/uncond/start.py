"""What this process was when uncond was first imported, read before the package's imports (torch, diffusers:
seconds), which are what could change it."""

import os

# Its parent then: under a launcher, the launcher. One that ended during the imports would have handed the
# process to another parent by the time the processes meet (environment.launcher_pid).
PARENT = os.getppid()


def parent_at_fork() -> None:
    """A process forked after the import (accelerate's notebook_launcher, multiprocessing's fork) starts there:
    its launcher is the process it was forked from, not the parent that one had (trial 58 F1: each was sent
    SIGTERM as it met the others)."""
    global PARENT
    PARENT = os.getppid()


os.register_at_fork(after_in_child=parent_at_fork)
