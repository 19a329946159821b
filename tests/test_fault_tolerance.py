"""Runs that get killed, preempted, corrupted or starved of disk lose nothing and resume exactly.

Most tests here run `python -m uncond train` as a subprocess and kill it for real (SIGKILL, SIGTERM).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_UNET, fast_train_args, mounted_tmpfs, strict_json_lines, write_images
from uncond import checkpoint

WEIGHTS = "diffusion_pytorch_model.safetensors"
STEPS = 40
# A run long enough for kills to land in training and in checkpoint writes (every 4 steps).
RUN_FLAGS = ("--max_train_steps", str(STEPS), "--checkpointing_steps", "4", "--use_ema", "--random_flip",
             "--gradient_accumulation_steps", "2", "--logging_steps", "1", "--save_images_epochs", "1000",
             "--save_model_epochs", "1000", "--checkpoints_total_limit", "3")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    write_images(folder / "images", 12)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps(TINY_UNET))
    return folder / "images", folder / "unet"


def command(inputs: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "uncond", *map(str, fast_train_args(*inputs, out, *RUN_FLAGS, *extra))]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(command(inputs, out), env=ENV, check=True, capture_output=True)
    return out


def final_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {"unet": load_file(out / f"checkpoint-{STEPS}" / "unet" / WEIGHTS),
            "unet_ema": load_file(out / f"checkpoint-{STEPS}" / "unet_ema" / WEIGHTS),
            "export": load_file(out / "unet" / WEIGHTS)}


def assert_same_result(out: Path, reference: Path) -> None:
    got, expected = final_weights(out), final_weights(reference)
    for name in expected:
        assert all(torch.equal(got[name][key], expected[name][key]) for key in expected[name]), name


def assert_every_checkpoint_loads(out: Path) -> None:
    for _, path in checkpoint.complete_checkpoints(out):
        checkpoint.verify_checkpoint(path)  # raises on a damaged file


def start(inputs, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(command(inputs, out, *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_training(process: subprocess.Popen, out: Path, timeout: float = 60) -> None:
    """Until the first metrics line is written (imports and decoding are over)."""
    deadline = time.monotonic() + timeout
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.02)


def resume_to_the_end(inputs, out: Path) -> str:
    finished = subprocess.run(command(inputs, out), env=ENV, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished.stderr


def kill_at_random_and_resume(inputs, reference: Path, out: Path, rng: random.Random) -> None:
    process = start(inputs, out)
    wait_for_training(process, out)
    time.sleep(rng.uniform(0, 1.5))  # the tiny run trains 40 steps in about a second or two
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert_every_checkpoint_loads(out)
    resume_to_the_end(inputs, out)
    assert_same_result(out, reference)


@pytest.mark.parametrize("trial", range(2))
def test_killed_at_a_random_moment_resumes_to_the_same_weights(inputs, reference, tmp_path, trial):
    kill_at_random_and_resume(inputs, reference, tmp_path / "run", random.Random(trial))


@pytest.mark.slow
def test_killed_at_random_moments_many_times(inputs, reference, tmp_path):
    rng = random.Random(1234)
    for trial in range(10):
        kill_at_random_and_resume(inputs, reference, tmp_path / f"run{trial}", rng)


# Kill the process at the nth call of a function of uncond.checkpoint.
KILL_INSIDE = """
import os, signal, sys
import uncond.checkpoint as checkpoint
calls = {{"n": 0}}
original = checkpoint.{function}
def dying(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
checkpoint.{function} = dying
from uncond.cli import console
sys.exit(console(sys.argv[1:]))
"""


def run_killed_inside(inputs, out: Path, function: str, nth: int) -> None:
    script = KILL_INSIDE.format(function=function, nth=nth)
    killed = subprocess.run([sys.executable, "-c", script, *command(inputs, out)[3:]], env=ENV,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]


def test_kill_in_the_middle_of_a_checkpoint_write(inputs, reference, tmp_path):
    out = tmp_path / "run"
    # write_manifest runs once the state files are in the staging folder, before it is renamed
    run_killed_inside(inputs, out, "write_manifest", nth=3)
    assert (out / ".tmp-checkpoint-12").is_dir() and not (out / "checkpoint-12").exists()
    assert [step for step, _ in checkpoint.complete_checkpoints(out)] == [4, 8]
    log = resume_to_the_end(inputs, out)
    assert "removed .tmp-checkpoint-12, left by an interrupted write" in log
    assert "resuming from checkpoint-8 at step 8" in log
    assert_same_result(out, reference)


KILL_WHILE_DROPPING = """
import os, re, signal, sys
import uncond.checkpoint as checkpoint
original = checkpoint.remove
def dying(path):
    if re.fullmatch(r"(\\.tmp-dropped-)?checkpoint-\\d+", path.name):  # --checkpoints_total_limit's, half deleted
        (path / "optimizer.bin").unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path)
checkpoint.remove = dying
from uncond.cli import console
sys.exit(console(sys.argv[1:]))
"""


def test_kill_while_dropping_an_old_checkpoint(inputs, reference, tmp_path):
    """A kill inside the deletion of the checkpoint --checkpoints_total_limit drops left it damaged, and every
    next run kept it as incomplete-checkpoint-N for the user to delete (a preempted job gathered them, each the
    size of a checkpoint): it is renamed first, and the next run finishes deleting it."""
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_DROPPING, *command(inputs, out)[3:]], env=ENV,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    log = resume_to_the_end(inputs, out)
    assert "removed .tmp-dropped-checkpoint-4, left by an interrupted write" in log, log
    assert not list(out.glob("incomplete-*")) and not list(out.glob(".tmp-*"))
    assert_same_result(out, reference)


KILL_BETWEEN_RENAMES = """
import os, signal, sys
import uncond.checkpoint as checkpoint
original = checkpoint.replace_path
def dying(source, destination):
    if destination.name == os.environ["KILL_REPLACING"] and destination.exists():  # replacing an earlier one
        os.replace(destination, destination.with_name(".tmp-old-" + destination.name))
        os.kill(os.getpid(), signal.SIGKILL)
    return original(source, destination)
checkpoint.replace_path = dying
from uncond.cli import console
sys.exit(console(sys.argv[1:]))
"""


def kill_between_the_renames(inputs, out: Path, name: str, *extra: str) -> None:
    """Run until replace_path replaces `name` in `out`, and SIGKILL it between its two renames."""
    killed = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, *command(inputs, out, *extra)[3:]],
                            env={**ENV, "KILL_REPLACING": name}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / name).exists() and (out / f".tmp-old-{name}").is_dir()


def test_kill_between_the_renames_of_an_export(inputs, reference, tmp_path):
    out = tmp_path / "run"
    # exports every epoch (2 steps); the second export finds the first one's unet/ and dies replacing it
    kill_between_the_renames(inputs, out, "unet", "--save_model_epochs", "1")
    # model_index.json goes out first: no loader takes the half-replaced folder for a model meanwhile
    assert not (out / "model_index.json").exists() and (out / ".tmp-old-model_index.json").is_file()
    log = resume_to_the_end(inputs, out)
    assert "restored unet from an interrupted write" in log
    assert_same_result(out, reference)


FINISHED = """
import atexit, sys, time
from uncond import cli

class FreedSlowly:  # as torch's modules are, as the interpreter ends, once its exit functions have run
    def __del__(self):
        time.sleep(2)

freed_slowly = FreedSlowly() if sys.argv[1] == "freeing" else None
cli.run_command = lambda argv: print("done:", flush=True) or 0  # a command that finished
atexit.register(time.sleep, 2 if sys.argv[1] == "exit functions" else 0)
sys.exit(cli.script())
"""


@pytest.mark.parametrize("phase", ["exit functions", "freeing"])
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_after_the_command_finished_keeps_its_status(signal_number, phase):
    """A SIGTERM or Ctrl-C in the seconds after `done:`, as the interpreter ends, ended a finished run with 143 or
    130 and no word; a scheduler requeued it (trial 55 F5)."""
    process = subprocess.Popen([sys.executable, "-c", FINISHED, phase], stdout=subprocess.PIPE, text=True, env=ENV)
    assert process.stdout.readline() == "done:\n"
    time.sleep(0.7)
    process.send_signal(signal_number)
    assert process.wait(timeout=20) == 0


SIGNALLED_AFTER_DONE = """
import os, signal, sys
from uncond import cli, environment

give_back_freed_memory = environment.give_back_freed_memory

def signalled():  # after `done:`, before train() returns: milliseconds in a real run
    os.kill(os.getpid(), int(os.environ["SIGNAL_AFTER_DONE"]))
    give_back_freed_memory()

environment.give_back_freed_memory = signalled
sys.exit(cli.script())
"""


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_just_after_done_keeps_the_runs_status(inputs, tmp_path, signal_number):
    """In the milliseconds between `done:` and the command's return (10 ms for the tiny preset, 29 ms for small-32:
    freeing memory, unlocking the folder) a SIGTERM or Ctrl-C still stopped the finished run: 143 "stopped by
    SIGTERM", or 130 (trial 56 F3). Once said, the outcome stands."""
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", SIGNALLED_AFTER_DONE, *command(inputs, out)[3:]],
                            env={**ENV, "SIGNAL_AFTER_DONE": str(int(signal_number))}, capture_output=True, text=True)
    assert result.returncode == 0 and "done: the pipeline is in" in result.stderr, result.stderr[-3000:]
    assert "stopped" not in result.stderr and "interrupted" not in result.stderr


def test_an_export_moves_model_index_json_in_last(tmp_path, monkeypatch):
    """A kill between two of the export's renames then leaves a folder no loader takes for a model, never a
    loadable one whose UNet and training state are of two exports."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**{key: value for key, value in TINY_UNET.items() if not key.startswith("_")})
    checkpoint.export_pipeline(unet, DDPMScheduler(), tmp_path, {"step": 1})
    moved, replace_path = [], checkpoint.replace_path
    monkeypatch.setattr(checkpoint, "replace_path", lambda source, destination: (
        moved.append(destination.name), replace_path(source, destination)))
    checkpoint.export_pipeline(unet, DDPMScheduler(), tmp_path, {"step": 2})
    assert sorted(moved) == sorted(checkpoint.PIPELINE_ITEMS) and moved[-1] == "model_index.json"
    assert json.loads((tmp_path / checkpoint.STATE_FILE).read_text()) == {"step": 2}


def test_going_back_to_an_older_checkpoint_redoes_the_same_steps(inputs, reference, tmp_path):
    """The later checkpoints are set aside whole (so no checkpoint is ever written over another), and the steps
    redone from the older one end with the same weights."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    redone = subprocess.run(command(inputs, out, "--resume_from_checkpoint", "checkpoint-32"), env=ENV,
                            capture_output=True, text=True)
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert "checkpoint-36, checkpoint-40, of the run's later steps, moved to" in redone.stderr
    for path in (out / "abandoned-after-step-32").iterdir():
        checkpoint.verify_checkpoint(path)  # moved whole
    assert_same_result(out, reference)


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_a_checkpoint_and_exits_with_the_signals_status(inputs, reference, tmp_path, signal_number):
    """128 + the signal's number, as a shell reports a command the signal ended: a stopped run is not a finished
    one (`uncond train ... && upload` went on; a scheduler restarting failed jobs took it as done)."""
    out = tmp_path / "run"
    process = start(inputs, out)
    wait_for_training(process, out)
    process.send_signal(signal_number)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal_number, err[-2000:]
    stopped = f"stopped by {signal.Signals(signal_number).name}"
    line = next(line for line in err.splitlines() if line.startswith(stopped))
    step = int(line.split("at step ")[1].split(",")[0])
    assert step < STEPS and f"checkpoint-{step} saved; to resume, run: uncond train " in line
    assert err.count(f"{signal.Signals(signal_number).name}: stopping with a checkpoint after the current step") == 1
    assert ("Ctrl-C again stops at once" in err) == (signal_number == signal.SIGINT)  # a job's SIGTERM: no terminal
    assert checkpoint.checkpoint_problem(out / f"checkpoint-{step}") is None
    resume_to_the_end(inputs, out)
    assert_same_result(out, reference)


@pytest.mark.parametrize("launched_by_torchrun", [True, False])
def test_a_second_ctrl_c_passed_on_by_torchrun_as_sigterm_stops_at_once(launched_by_torchrun, monkeypatch):
    """torchrun's agent (accelerate launch of several processes) passes a terminal's second Ctrl-C on as SIGTERM:
    the run went on to its next checkpoint, 14 s more, and said "stopped by SIGTERM" (trial 66 F1). A job's
    SIGTERM after a Ctrl-C elsewhere still stops with a checkpoint."""
    from uncond.stopping import StopSignal

    if launched_by_torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with StopSignal(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.asked() and stop.received == "SIGINT"
        with contextlib.nullcontext() if not launched_by_torchrun else pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # (the handler runs at the next bytecode)
        assert stop.received == ("SIGINT" if launched_by_torchrun else "SIGTERM")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_an_interrupt_is_said_once_per_machine(local_rank, monkeypatch, capsys):
    """Ctrl-C before a launch's run had started: `uncond: interrupted` once per process (trial 66 F2), where every
    other message is the machine's first process's."""
    from uncond import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "parse_and_run", interrupted)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert cli.run_command(["train"]) == cli.INTERRUPTED
    assert capsys.readouterr().err == ("uncond: interrupted\n" if local_rank == "0" else "")


def test_a_job_preempted_while_decoding_keeps_what_it_decoded(run_cli, tiny_unet, tmp_path, monkeypatch):
    """SIGTERM during the first decode ended the run with no word (Python's default), and the next run decoded
    every image again: a job preempted more often than a long decode takes never trained."""
    from uncond import decoding

    folder = write_images(tmp_path / "photos", 8, nested=False)
    decode_image, decoded, preempted = decoding.decode_image, [], []

    def preempted_at_the_fifth(image, *args):  # once: the threads decode ahead, so the first run keeps 1 to 7
        decoded.append(1)
        if len(decoded) == 5 and not preempted:
            preempted.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return decode_image(image, *args)

    monkeypatch.setattr(decoding, "decode_image", preempted_at_the_fifth)
    args = fast_train_args(folder, tiny_unet, tmp_path / "run", "--max_train_steps", "2",
                           "--dataloader_num_workers", "1")
    code, _, err = run_cli(*args)
    assert code == 143 and "those are kept: the next run decodes only the others" in err, err
    kept = int(re.search(r"decoding stopped after (\d+) of 8 images", err)[1])
    assert 0 < kept < 8
    decoded.clear()
    code, _, err = run_cli(*args)
    assert code == 0 and f"the other {kept} copied from earlier entries" in err, err
    assert len(decoded) == 8 - kept


@contextlib.contextmanager
def sigterm_must_be_handled():
    """Python's default for SIGTERM would end pytest's process: the test fails instead."""
    def unhandled(number, frame):
        raise AssertionError("SIGTERM reached the test: the command did not handle it")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_job_ended_while_setting_up_says_so_and_puts_back_the_run_it_was_replacing(run_cli, inputs, tmp_path,
                                                                                      monkeypatch):
    """SIGTERM while a run set up (before any decode or step) ended it with no word and, under
    --overwrite_output_dir, left the earlier run set aside in .replaced-run, where the next --overwrite_output_dir
    run removes it. Now it stops as for Ctrl-C: one line, status 143, the folder as it found it."""
    from uncond import train

    out = tmp_path / "run"
    assert run_cli(*fast_train_args(*inputs, out, "--max_train_steps", "2", "--checkpointing_steps", "2"))[0] == 0
    before = sorted(path.name for path in out.iterdir())

    def ended(*args, **kwargs):  # after the earlier run was set aside
        assert (out / ".replaced-run").is_dir()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "init_trackers", ended)
    with sigterm_must_be_handled():
        code, _, err = run_cli(*fast_train_args(*inputs, out, "--max_train_steps", "4", "--overwrite_output_dir"))
    assert code == 143 and err.strip().endswith("uncond: stopped by SIGTERM"), err
    assert sorted(path.name for path in out.iterdir()) == before and "checkpoint-2" in before
    assert checkpoint.read_training_state(out)["step"] == 2


def test_a_job_ended_while_loading_its_checkpoint_resumes_from_it_next_time(run_cli, inputs, tmp_path, monkeypatch):
    """SIGTERM while a resume loaded its checkpoint was taken for the checkpoint's own failure ("cannot resume from
    checkpoint-2 (RunStopped: 15); ... damaged", status 2): a scheduler would not requeue the job, and its user would
    set a whole checkpoint aside. It is a stop like any other (143), and the next run resumes from it."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    args = fast_train_args(*inputs, out, "--checkpointing_steps", "2")
    assert run_cli(*args, "--max_train_steps", "2")[0] == 0
    load_state = Accelerator.load_state

    def ended_while_loading(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return load_state(self, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "load_state", ended_while_loading)
    with sigterm_must_be_handled():
        code, _, err = run_cli(*args, "--max_train_steps", "4")
    assert code == 143 and err.strip().endswith("uncond: stopped by SIGTERM"), err
    monkeypatch.setattr(Accelerator, "load_state", load_state)
    code, _, err = run_cli(*args, "--max_train_steps", "4")
    assert code == 0 and "resuming from checkpoint-2 at step 2" in err, err


def test_a_job_ended_while_its_images_headers_are_read_stops(run_cli, tiny_unet, tmp_path, monkeypatch):
    """Before decoding, a run reads every new image's header for the cache's size (in its main thread; the decoding
    is in threads); SIGTERM there was taken for an unreadable file, and the run trained on as if not asked to stop."""
    from PIL import Image

    folder = write_images(tmp_path / "photos", 8, nested=False)
    open_image, opened = Image.open, []

    def ended_at_the_third(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            opened.append(1)
            if len(opened) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return open_image(*args, **kwargs)

    monkeypatch.setattr(Image, "open", ended_at_the_third)
    with sigterm_must_be_handled():
        code, _, err = run_cli(*fast_train_args(folder, tiny_unet, tmp_path / "run", "--max_train_steps", "2"))
    assert len(opened) >= 3 and code == 143 and err.strip().endswith("uncond: stopped by SIGTERM"), err


def train_under(script: str, inputs: tuple[Path, Path], out: Path) -> subprocess.CompletedProcess:
    """A 2-step run in a Python process that runs `script` (which ends by running uncond's command line)."""
    return subprocess.run([sys.executable, "-c", script, *map(str, fast_train_args(
        *inputs, out, "--max_train_steps", "2"))], env=ENV, capture_output=True, text=True, timeout=300)

def test_a_job_ended_while_diffusers_imports_a_module_says_so_in_one_line(inputs, tmp_path):
    """diffusers imports its modules when first used, in a run's first seconds, and turns any Exception raised
    there into a RuntimeError: SIGTERM then (a job preempted as it starts) ended in a 150-line traceback and status 1,
    so a scheduler that requeues preempted jobs (143) gave up on it."""
    script = (  # the signal lands in diffusers' import of a module (inside _LazyModule._get_module's try)
        "import importlib, os, signal, sys, types\n"
        "from diffusers.utils import import_utils\n"
        "from uncond import cli\n"
        "def import_module(name, package=None):\n"
        "    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # once the command handles it\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return importlib.import_module(name, package)\n"
        "import_utils.importlib = types.SimpleNamespace(**{**vars(importlib), 'import_module': import_module})\n"
        "sys.exit(cli.console(sys.argv[1:]))\n")
    result = train_under(script, inputs, tmp_path / "run")
    assert result.returncode == 143 and result.stderr.strip().endswith("uncond: stopped by SIGTERM"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_job_ended_while_torch_is_imported_says_so_in_one_line(inputs, tmp_path):
    """SIGTERM is handled from before the command imports torch: the 1.5 s of that import in a job's first seconds
    ended the process with no word (Python's default), as if it had never started."""
    script = (
        "import builtins, os, signal, sys\n"
        "real_import = builtins.__import__\n"
        "def importing(name, *args, **kwargs):  # the signal arrives as torch is first imported\n"
        "    handled = signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL\n"
        "    if name == 'torch' and 'torch' not in sys.modules and handled:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
        "from uncond import cli\n"
        "sys.exit(cli.console(sys.argv[1:]))\n")
    result = train_under(script, inputs, tmp_path / "run")
    assert result.returncode == 143 and result.stderr.strip() == "uncond: stopped by SIGTERM", result.stderr
    assert not (tmp_path / "run").exists()


def test_a_killed_launcher_stops_the_run_with_a_checkpoint(inputs, tmp_path):
    """`accelerate launch` of one process passes no signal on: SIGTERM to it alone (`kill`, a sweep tool ending a
    trial) left the run training on, unseen, until its end. The run now stops as for a signal of its own."""
    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    arguments = fast_train_args(*inputs, out, "--max_train_steps", "100000", "--logging_steps", "1")
    launcher = subprocess.Popen([str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "uncond",
                                 *map(str, arguments)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    try:
        wait_for_training(launcher, out)
        run = int(Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()[0])
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=60)  # the pipes close when the run, which shares them, exits
    finally:
        with contextlib.suppress(ProcessLookupError, UnboundLocalError):
            os.kill(run, signal.SIGKILL)  # the run left training on: not beyond the test
    assert f"the launcher (pid {launcher.pid}) exited: stopping with a checkpoint after the current step" in err
    line = next(line for line in err.splitlines() if line.startswith("stopped by the launcher's exit at step "))
    step = int(line.split("at step ")[1].split(",")[0])
    assert f"checkpoint-{step} saved; to resume, run: accelerate launch --num_processes 1 " in line
    assert checkpoint.checkpoint_problem(out / f"checkpoint-{step}") is None


# ---------------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def stopped_run(inputs, tmp_path) -> Path:
    """A run of 40 steps that stopped after step 12 (checkpoints 4, 8, 12)."""
    out = tmp_path / "run"
    subprocess.run(command(inputs, out, "--max_train_steps", "12"), env=ENV, check=True, capture_output=True)
    for item in ("unet", "scheduler", "model_index.json"):
        path = out / item
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return out


def test_truncated_checkpoint_is_set_aside_with_a_warning(inputs, stopped_run):
    """A damaged checkpoint is moved out of the way, not deleted: its weights may be whole."""
    optimizer = stopped_run / "checkpoint-12" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    weights = (stopped_run / "checkpoint-12" / "unet" / WEIGHTS).read_bytes()
    (stopped_run / ".tmp-checkpoint-16").mkdir()
    log = resume_to_the_end(inputs, stopped_run)
    assert ("set aside incomplete checkpoint-12 as incomplete-checkpoint-12 (optimizer.bin has 100 bytes" in log
            and "delete it when you no longer need it" in log)
    assert (stopped_run / "incomplete-checkpoint-12" / "unet" / WEIGHTS).read_bytes() == weights
    assert "removed .tmp-checkpoint-16, left by an interrupted write" in log
    assert "resuming from checkpoint-8 at step 8" in log


def test_a_run_whose_checkpoints_are_all_incomplete_says_so(inputs, stopped_run):
    """Rather than start again from step 0, or say it holds a trained model."""
    for step in (4, 8, 12):
        (stopped_run / f"checkpoint-{step}" / "optimizer.bin").unlink()
    for extra in ((), ("--resume_from_checkpoint", "latest")):
        failed = subprocess.run(command(inputs, stopped_run, *extra), env=ENV, capture_output=True, text=True)
        error = [line for line in failed.stderr.splitlines() if line.startswith("uncond: error:")]
        assert failed.returncode == 2 and len(error) == 1, failed.stderr[-2000:]
        assert error[0].startswith(f"uncond: error: --output_dir {stopped_run}: none of its checkpoints is complete "
                                   "(checkpoint-4: optimizer.bin is missing;")
        assert error[0].endswith("restore their files to go on, or pass --overwrite_output_dir to start afresh")
    assert [path.name for _, path in checkpoint.list_checkpoints(stopped_run)] == [
        "checkpoint-4", "checkpoint-8", "checkpoint-12"]


def test_corrupted_checkpoint_file_is_named(inputs, stopped_run):
    weights = stopped_run / "checkpoint-12" / "unet_ema" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    failed = subprocess.run(command(inputs, stopped_run), env=ENV, capture_output=True, text=True)
    assert failed.returncode == 2
    error = [line for line in failed.stderr.splitlines() if line.startswith("uncond: error:")]
    assert len(error) == 1 and f"{weights} is corrupted" in error[0]
    assert error[0].endswith(f"delete {stopped_run / 'checkpoint-12'} (or move it away) to resume from checkpoint-8")
    for earlier in ("checkpoint-4", "checkpoint-8"):  # the damaged one is the only one: deleting it loses the run
        shutil.rmtree(stopped_run / earlier)
    failed = subprocess.run(command(inputs, stopped_run), env=ENV, capture_output=True, text=True)
    assert "no complete checkpoint comes before it: pass --overwrite_output_dir to start afresh" in failed.stderr


def test_incomplete_named_checkpoint_is_refused(inputs, stopped_run):
    (stopped_run / "checkpoint-8" / "scheduler.bin").write_bytes(b"")
    failed = subprocess.run(command(inputs, stopped_run, "--resume_from_checkpoint", "checkpoint-8"), env=ENV,
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "checkpoint-8 is incomplete (scheduler.bin has 0 bytes" in failed.stderr


# ---------------------------------------------------------------------------------------- full disk


def test_disk_full_leaves_the_previous_checkpoint_intact(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    from accelerate import Accelerator

    original = Accelerator.save_state
    calls = {"n": 0}

    def save_state_on_a_full_disk(self, output_dir, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state_on_a_full_disk)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "6",
                                            "--checkpointing_steps", "2"))
    assert code == 1
    assert ("uncond: stopped: could not write checkpoint-4 (No space left on device); checkpoint-2 is intact; "
            "free some space and re-run the same command to resume") in err
    assert not list(out.glob(".tmp-*")) and checkpoint.checkpoint_problem(out / "checkpoint-2") is None


def test_a_checkpoint_whose_exchange_with_another_process_failed_is_not_left_half_written(run_cli, color_folder,
                                                                                          tiny_unet, tmp_path,
                                                                                          monkeypatch):
    """Another process of the launch killed while the main one wrote the first checkpoint: the main process's
    exchange with it raised, and the half-written .tmp-checkpoint-2 (1.7 GB) stayed in the folder the run had
    made, which the run otherwise removed (trial 66 F4). Here the exchange fails as gloo's does."""
    from uncond import environment

    calls = []

    def peer_gone(failure):  # after the state's write (the first call is after clearing a staging folder)
        calls.append(failure)
        if len(calls) == 2:
            raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:3466")
        return failure

    monkeypatch.setattr(environment, "failure_anywhere", peer_gone)
    out = tmp_path / "made" / "run"
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4", "--checkpointing_steps", "2"))
    assert len(calls) == 2 and not (tmp_path / "made").exists(), sorted(path.name for path in out.iterdir())


def test_a_really_full_disk(inputs, tmp_path):
    """A 1.5 MB tmpfs holds the first checkpoints but not the whole run: the write that does not fit fails
    with a clear message and the checkpoints before it stay loadable. Needs permission to mount."""
    with mounted_tmpfs(tmp_path / "disk", "size=1500k") as disk:
        out = disk / "run"
        failed = subprocess.run(command(inputs, out, "--checkpoints_total_limit", "5"), env=ENV,
                                capture_output=True, text=True)
        assert failed.returncode == 1, failed.stderr[-2000:]
        message = [line for line in failed.stderr.splitlines() if line.startswith("uncond: stopped:")]
        assert len(message) == 1 and "No space left on device" in message[0], failed.stderr[-2000:]
        assert checkpoint.complete_checkpoints(out), "at least one checkpoint fitted"
        assert_every_checkpoint_loads(out)


def test_a_full_disk_under_tensorboard_is_one_line(inputs, tmp_path):
    """TensorBoard's writer thread failed too, and Python printed its traceback under uncond's line."""
    with mounted_tmpfs(tmp_path / "disk", "size=1m") as disk:
        args = [sys.executable, "-m", "uncond", *map(str, fast_train_args(*inputs, disk / "run", "--max_train_steps",
                                                                           "2", "--logger", "tensorboard"))]
        subprocess.run(args, env=ENV, check=True, capture_output=True)
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:  # until the disk is full
                filler.write(b"\0" * 4096)
        failed = subprocess.run([*args[:-6], "--max_train_steps", "4", "--logger", "tensorboard"], env=ENV,
                                capture_output=True, text=True)
    assert failed.returncode in (1, 2) and "No space left on device" in failed.stderr, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr and "Exception in thread" not in failed.stderr, failed.stderr[-3000:]


def test_trackers_logs_filling_their_disk_are_named(inputs, tmp_path):
    """TensorBoard's failed write names no file: the message said 'writing a file'."""
    with mounted_tmpfs(tmp_path / "logs", "size=16k") as logs:
        failed = subprocess.run([sys.executable, "-m", "uncond", *map(str, fast_train_args(
            *inputs, tmp_path / "run", "--max_train_steps", "200", "--logging_steps", "1", "--logger", "tensorboard",
            "--logging_dir", logs))], env=ENV, capture_output=True, text=True)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert failed.stderr.strip().splitlines()[-1].startswith(
        f"uncond: stopped: no space left on the device writing the trackers' logs in {logs / 'run'};")


def test_torch_saves_failed_write_is_said_to_be_a_full_disk(tmp_path):
    """accelerate writes the optimizer's state with torch.save, whose error on a full disk names no errno."""
    with mounted_tmpfs(tmp_path / "disk", "size=64k") as disk:
        with pytest.raises(RuntimeError) as failed:
            torch.save({"state": torch.zeros(100_000)}, disk / "optimizer.bin")
    assert checkpoint.write_error(failed.value).startswith("No space left on device, or a disk quota reached")


# ---------------------------------------------------------------------------------------- divergence


def test_divergence_stops_with_the_last_good_checkpoint(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "30",
                                            "--learning_rate", "1e12", "--max_grad_norm", "0",
                                            "--checkpointing_steps", "1", "--logging_steps", "5"))
    assert code == 1, err[-2000:]
    message = next(line for line in err.splitlines() if line.startswith("uncond: stopped:"))
    assert "became" in message and "is the last good checkpoint" in message and "--skip_nonfinite" in message
    assert message.count("stopped") == 1, message  # said once, by the line's prefix
    last = checkpoint.complete_checkpoints(out)[-1][1]
    assert all(torch.isfinite(t).all() for t in load_file(last / "unet" / WEIGHTS).values())


def test_divergence_in_a_compiled_unets_first_steps_points_at_compile(run_cli, color_folder, tiny_unet, tmp_path,
                                                                      monkeypatch):
    """A loss that is NaN by the first log line of a compiled run is more likely the compiler's (as with torch 2.13's
    CPU code under bf16) than a learning rate still warming up: the message says to drop --compile, not to lower
    it."""
    from uncond import parts, plan

    plugin = parts.TorchDynamoPlugin  # dynamo's eager backend: seconds, where inductor takes minutes here
    monkeypatch.setattr(parts, "TorchDynamoPlugin", lambda **settings: plugin(**{**settings, "backend": "eager"}))
    monkeypatch.setattr(plan, "CPU_COMPILER_MISCOMPUTES_GRADIENTS", False)  # inductor's C++ code is not used
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "30",
                                            "--learning_rate", "1e12", "--max_grad_norm", "0", "--compile",
                                            "--logging_steps", "5"))
    message = next(line for line in err.splitlines() if line.startswith("uncond: stopped:"))
    assert code == 1 and "became" in message and "drop --compile" in message, err[-2000:]
    assert "--learning_rate" not in message


def test_weights_that_diverged_are_never_exported(run_cli, color_folder, tiny_unet, tmp_path):
    """A loss that diverged between log lines was found only at the next one: the epoch's export came first, wrote
    NaN weights as the model, and, as this run's first save, deleted the earlier run it replaced."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_grad_norm", "0", "--logging_steps", "100")
    assert run_cli(*args, "--max_train_steps", "2")[0] == 0
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(logged["grad_norm"]) and logged["grad_norm"] > 0  # logged without clipping too
    earlier = (out / "unet" / WEIGHTS).read_bytes()
    code, _, err = run_cli(*args, "--max_train_steps", "6", "--learning_rate", "1e12", "--overwrite_output_dir",
                           "--save_model_epochs", "1", "--checkpointing_steps", "100")
    assert code == 1, err[-2000:]
    message = next(line for line in err.splitlines() if line.startswith("uncond: stopped:"))
    assert "the weights became NaN or inf by step 3" in message and "run the command again" in message
    assert (out / "unet" / WEIGHTS).read_bytes() == earlier
    assert [path.name for _, path in checkpoint.complete_checkpoints(out)] == ["checkpoint-2"]


@pytest.mark.parametrize("max_grad_norm", ["1.0", "0"])
def test_skip_nonfinite_trains_through_with_fp16_loss_scaling(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch,
                                                              max_grad_norm):
    """fp16 on a GPU scales the loss (accelerate's GradScaler); a skipped step must close the scaler's step too.
    This machine has no GPU: the same scaler, for the CPU, is given to the run's accelerator."""
    from uncond import train

    make_accelerator = train.make_accelerator

    def with_loss_scaler(*args):
        accelerator = make_accelerator(*args)
        accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True  # as accelerate does on CUDA
        return accelerator

    monkeypatch.setattr(train, "make_accelerator", with_loss_scaler)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "8",
                                            "--learning_rate", "1e12", "--max_grad_norm", max_grad_norm,
                                            "--mixed_precision", "fp16", "--skip_nonfinite", "--logging_steps", "8"))
    assert code == 0, err[-2000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] > 1
    assert last["lr"] == 0.0  # skipped steps count in the schedule too: the cosine reaches its end with the run


def test_a_skipped_step_keeps_the_ema_updates_on_their_steps(run_cli, color_folder, tiny_unet, tmp_path,
                                                               monkeypatch):
    """A step skipped under --skip_nonfinite skipped the EMA's update with it: updated every 2 steps, it was a step
    behind from then on, and every later export blended trained weights into an average just updated, as if the
    steps since an update had not been averaged (trial 60 F1)."""
    from uncond import train

    monkeypatch.setattr(train, "everywhere_finite", lambda run, loss, grad_norm: run.step != 1)  # skips step 2
    out = tmp_path / "run"
    assert run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4", "--use_ema",
                                    "--ema_update_every", "2", "--skip_nonfinite", "--logging_steps", "4"))[0] == 0
    assert strict_json_lines(out / "metrics.jsonl")[-1]["skipped_steps"] == 1
    assert json.loads((out / "checkpoint-4" / "unet_ema" / "config.json").read_text())["optimization_step"] == 2
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["ema_share"] == 1.0
    exported, ema = load_file(out / "unet" / WEIGHTS), load_file(out / "checkpoint-4" / "unet_ema" / WEIGHTS)
    assert all(torch.equal(exported[name], ema[name]) for name in ema)  # the average itself, updated at step 4


def test_skip_nonfinite_trains_through(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "30",
                                            "--learning_rate", "1e12", "--max_grad_norm", "0",
                                            "--skip_nonfinite", "--logging_steps", "5"))
    assert code == 0, err[-2000:]
    # strict JSON (jq and JavaScript refuse NaN): an interval whose every step was skipped has a null loss
    records = strict_json_lines(out / "metrics.jsonl")
    assert records[-1]["skipped_steps"] > 0 and records[-1]["loss"] is None
    assert all(torch.isfinite(t).all() for t in load_file(out / "unet" / WEIGHTS).values())
    assert "| final loss (mean over the last logging interval) | none: every step was skipped" in (
        out / "README.md").read_text()
    assert (out / "loss.png").exists()

