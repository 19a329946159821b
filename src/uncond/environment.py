"""Process-wide settings: made once at start-up, before the first large allocation, and the end of the
process group; and how the launcher started this process."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import io
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from . import signals, start

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30
DEFAULT_THRESHOLD = 128 << 10  # glibc's default for both (its mmap threshold, once set, no longer adapts)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep large freed buffers for reuse instead of returning them to the kernel.

    By default glibc serves every allocation above a (dynamic, at most 32 MiB) threshold with its own
    mmap and unmaps it when freed, and trims the heap top above 128 KiB. A CPU training step frees
    and re-allocates the same activation buffers every step, so each step pays the page faults of
    mapping them again (measured in docs/benchmarks.md). Raising both thresholds to 1 GiB keeps the
    buffers mapped; the cost is that the process keeps its peak memory. PyTorch's CUDA caching
    allocator does the same on GPUs. jemalloc would work too but is not a Python package.
    Returns whether the allocator took the settings (False off glibc).
    """
    libc = glibc()
    if libc is None:
        return False
    # glibc before 2.26 caps the mmap threshold at 32 MiB on 64-bit systems
    mapped = libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mapped) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES))


def give_back_freed_memory() -> None:
    """Undo keep_freed_memory once a run ends, for a process that goes on (a notebook, a script training and then
    doing other work): glibc's thresholds at their defaults (128 KiB) again, and what the run kept handed back."""
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


def software_description(device: torch.device) -> str:
    """What a run's weights depend on besides its settings, for the model card: uncond's version and those of the
    libraries doing its arithmetic, the device, and on a CPU the thread count (float sums in another order)."""
    import accelerate
    import diffusers

    from .version import uncond_version

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return (f"uncond {uncond_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"accelerate {accelerate.__version__}; {where}{threads}")


@contextlib.contextmanager
def backend_settings_kept():
    """cuDNN autotuning, TF32 and the CPU thread count as they were before: a run on a GPU turns the first two on
    for its steps (parts.tune_cuda), and a notebook's own float32 products after it would otherwise run in TF32; a
    CPU run trains on fewer threads while other processes are busy (cpu_threads). And torch's default dtype, which
    is float32 during the run: a caller's float64 (torch.set_default_dtype) built a float64 UNet that float32
    batches failed in, after the decoding."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    precision, settings = torch.get_float32_matmul_precision(), (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    threads, default_dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(default_dtype)
        torch.set_float32_matmul_precision(precision)  # first: it sets matmul.allow_tf32 too
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = settings
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@contextlib.contextmanager
def accelerate_state_kept():
    """accelerate keeps one process-wide state, set by a process's first Accelerator and refused to another with
    other settings: in a notebook or a sweep, a run after a finished one with another --mixed_precision ended
    "AcceleratorState has already been initialized ... restart your runtime" (trial 59 F1). The state a run made is
    cleared as it ends (accelerate's own tests do so: it has no public reset); one the caller had is left."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    made = [not state._shared_state for state in (AcceleratorState, PartialState, GradientState)]
    try:
        yield
    finally:
        for state, made_here in zip((AcceleratorState, PartialState, GradientState), made):
            if made_here:
                state._shared_state.clear()


@contextlib.contextmanager
def global_random_state_kept():
    """Python's, NumPy's and PyTorch's global random generators as they were before: a run seeds them (accelerate's
    set_seed, as the seed script does), and a notebook's own draws after it would otherwise follow the run's seed."""
    import random

    import numpy as np

    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (mallopt and malloc_trim are glibc's)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def sigterm_ends_while_processes_meet() -> Iterator[None]:
    """Around the start of a launch's process group: torch waits there for the other processes in C++, where a
    Python signal handler cannot run, so a SIGTERM (the launcher ending the launch because another process stopped
    before joining) waited 30 s for the launcher's SIGKILL, or, sent to one process, left the others waiting for it
    for the group's 2-hour timeout. Python's default ends the process at once; nothing is written before.
    So does the launcher's own end (SIGKILLed, its node lost): the processes, handed to another parent, waited
    for its store until that timeout (trial 55 F1), keeping their GPUs."""
    if launched_processes() == 1:
        yield
        return
    with signals.handled({signal.SIGTERM: signal.SIG_DFL}), ends_with_the_launcher():
        yield


LAUNCHER_LOOK_S = 0.5  # how often a process meeting the others looks whether its launcher is still there


def launcher_pid() -> int:
    """The process that started this one (under a launcher, the launcher), as it was when uncond was imported: a
    launcher that ended before the processes met would otherwise be taken for the parent they were handed to."""
    return start.PARENT


@contextlib.contextmanager
def ends_with_the_launcher() -> Iterator[None]:
    """While the block runs, a thread looks whether this process was handed to another parent (its launcher, the
    parent, ended: before the block too) and then sends it SIGTERM (which ends it where the block leaves SIGTERM's
    default)."""
    launcher, done = launcher_pid(), threading.Event()

    def look() -> None:
        while True:
            if os.getppid() != launcher:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if done.wait(LAUNCHER_LOOK_S):
                return

    watcher = threading.Thread(target=look, name="uncond-launcher-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def launched_processes() -> int:
    """How many processes a launcher (torchrun, `accelerate launch`) started for this run; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def expected_device_type() -> str:
    """The kind of device accelerate will give this process, told before it starts one (for --dry_run)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or cpu_processes():
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def cpu_processes() -> bool:
    """Whether this is one of several processes on a machine without CUDA (torchrun, or `accelerate launch
    --multi_gpu`): accelerate runs them on the CPU with gloo only when told so (`cpu=True`)."""
    return launched_processes() > 1 and not torch.cuda.is_available()


# Options that say how the script is run: the commands run uncond as `-m uncond`
SCRIPT_KIND_OPTIONS = ("-m", "--module", "--no_python", "--no-python", "--run-path", "--run_path")


def typed_launch() -> tuple[str, ...] | None:
    """The launcher's command up to the script, as it was typed, where the launcher is `accelerate launch` or
    torchrun and is this process's parent (read from Linux's /proc): its config file's path made absolute so that
    the command runs from any folder. None under any other launcher (a job scheduler's), or none."""
    parent = Path(f"/proc/{os.getppid()}")
    try:
        words = (parent / "cmdline").read_bytes().decode().split("\0")[:-1]
        folder = Path(os.readlink(parent / "cwd"))
    except (OSError, UnicodeDecodeError):
        return None
    for i, word in enumerate(words):  # `accelerate launch`, `python -m accelerate.commands.launch`, torchrun, ...
        previous = words[i - 1] if i else ""
        if (word == "launch" and Path(previous).name == "accelerate") or \
                (word == "accelerate.commands.launch" and previous == "-m"):
            from accelerate.commands.launch import launch_command_parser as parser
            program = ("accelerate", "launch")
            break
        if Path(word).name == "torchrun" or (word == "torch.distributed.run" and previous == "-m"):
            from torch.distributed.run import get_args_parser as parser
            program = ("torchrun",)
            break
    else:
        return None
    rest = words[i + 1:]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parsed = parser().parse_args(rest)
    except SystemExit:
        return None
    options = rest[:len(rest) - len(parsed.training_script_args) - 1]  # up to the script (or -m's module)
    options = [word for word in options if word not in SCRIPT_KIND_OPTIONS]  # the command adds `-m uncond`
    for i, word in enumerate(options):
        if word in ("--config_file", "--config-file") and i + 1 < len(options):
            options[i + 1] = str(folder / options[i + 1])
        elif word.startswith(("--config_file=", "--config-file=")):
            name, _, path = word.partition("=")
            options[i] = f"{name}={folder / path}"
    return (*program, *options)


def failure_anywhere(failure: str | None) -> str | None:
    """After work that each process does on its own: the first process's failure (None where every one
    succeeded), known to every process. Used in place of a barrier: a process that failed and left would leave
    the others waiting in the next collective, until the launcher or the process group's timeout ended them
    with a traceback."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    return next((said for said in failures if said is not None), None)


# The last collective of each multi-process gloo run, kept until the process exits (see finish_collectives).
_last_collectives: list[dist.Work] = []


def keep_until_exit(work: dist.Work) -> None:
    """Hold a finished collective's work object for the life of the process (see finish_collectives)."""
    _last_collectives.append(work)


def finish_collectives() -> None:
    """Wait for every process at the end of a run, in a way that lets the gloo process group be destroyed.

    torch's gloo backend (2.13) can deadlock when its process group is destroyed right after a collective:
    a worker thread drops its reference to the finished work while holding the group's queue lock; if that
    was the last reference, the work frees tensors that Python made, which needs the GIL. DDP's Reducer
    destroys the group with the GIL held, and the destructor waits for that lock: neither moves. Users saw
    a CPU run print `done` and never exit (about 1 launch in 100; tests/test_teardown.py makes it in a few
    dozen). A last barrier whose work object is kept for the life of the process means the worker never
    drops the last reference (the barrier also holds the collectives still in flight when it was queued),
    so the group's threads are idle when it is destroyed. No-op without a gloo process group.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    barrier = dist.barrier(async_op=True)
    barrier.wait()
    _last_collectives.append(barrier)
