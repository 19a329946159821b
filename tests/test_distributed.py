"""Several processes through accelerate, on the CPU (gloo): a two-process run to completion, resuming
with another process count, one process x 8 images = two processes x 4 images, and FSDP2 against DDP.

`accelerate launch --cpu --num_processes 2` starts only one process in accelerate 1.15 (`--cpu` takes
its single-process launcher; several CPU processes need MPI there), so these tests launch with
`--multi_gpu --num_processes 2` on a machine with CUDA hidden: uncond then asks accelerate for CPU
processes, which talk over gloo. The tests check that two processes really ran.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import ddp_worker
from conftest import fast_train_args
from uncond.accelerate_configs import config_path
from hub_standin import HubStandIn

TESTS = Path(__file__).parent
FSDP_CONFIG = config_path("fsdp")  # as users launch it: `--config_file "$(uncond launch-config fsdp)"`


def free_port() -> int:
    """Another test run on this machine may hold accelerate's default port 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_processes(*args: object, timeout: float = 300, processes: int = 2, fsdp: bool = False,
                     **env_vars: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 ARGS` on the CPU (`processes` of them), or with
    uncond's fsdp.yaml when `fsdp`; returns the finished process."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS),
           "HF_HUB_OFFLINE": "1", **env_vars}
    kind = (["--config_file", str(FSDP_CONFIG)] if fsdp
            else ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"])
    command = [str(accelerate), "launch", *kind, "--num_processes", str(processes), "--mixed_precision", "no",
               "--main_process_port", str(free_port()), *[str(a) for a in args]]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=TESTS.parent)
    except subprocess.TimeoutExpired as error:  # where it stopped, rather than pytest's cut-off repr
        output = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
        raise AssertionError(f"launch timed out after {timeout} s; the end of its output:\n{output[-6000:]}") from None


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def lr_schedule(steps: int) -> list[float]:
    """The learning rate after each optimizer step of fast_train_args' cosine schedule, stepped once a step."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-4)
    schedule = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=1, num_training_steps=steps)
    rates = []
    for _ in range(steps):
        optimizer.step()
        schedule.step()
        rates.append(schedule.get_last_lr()[0])
    return rates


def test_two_processes_train_to_completion_and_resume_on_one(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "2", "--gradient_accumulation_steps",
                           "2", "--checkpointing_steps", "2", "--logging_steps", "1", "--logger", "tensorboard")
    with HubStandIn(token="hf_standin_token") as hub:  # a local stand-in for the Hub's HTTP API
        result = launch_processes("-m", "uncond", *args, "--max_train_steps", "4", "--push_to_hub",
                                      "--hub_token", "hf_standin_token", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert result.returncode == 0, result.stderr[-3000:]
    # one upload per export (after epoch 0 and at the end), from the main process only
    assert len(hub.created) == 1 and [c.message for c in hub.commits] == ["uncond: step 2", "uncond: step 4"]
    assert not [path for path in out.rglob("*") if path.is_file() and b"hf_standin_token" in path.read_bytes()]
    log = result.stderr
    assert "2 processes on cpu" in log and "batch 2 per device x 2 processes x 2 accumulation = 8" in log
    assert "2 per epoch" in log  # 12 images: 6 per process, 3 micro-batches of 2, 2 optimizer steps
    for rank in (0, 1):  # each process saved its own random state: two processes really ran
        assert (out / "checkpoint-4" / f"random_states_{rank}.pkl").is_file()
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by the main process
    assert records[-1]["images_seen"] == 24  # 2 epochs of 12: each epoch's second step holds 4 images, not 8
    # the schedule moved once per optimizer step, not once per process or micro-batch
    assert [r["lr"] for r in records] == pytest.approx(lr_schedule(4), abs=1e-12)
    writers = {path.name.split(".")[-2] for path in (out / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # TensorBoard files of one process id only
    for name in ("README.md", "loss.png", "samples/step-0000004.png"):
        assert (out / name).is_file(), name
    # the launch as it was typed (the card named --multi_gpu and the count alone, dropping the rest)
    card = (out / "README.md").read_text()
    assert "accelerate launch --multi_gpu --num_machines 1 --dynamo_backend no --num_processes 2 --mixed_precision " \
           "no --main_process_port " in card and " -m uncond train " in card
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert pipeline(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)

    # The two-process checkpoint goes on in one process, after the 12 images (one epoch) already seen.
    code, _, err = run_cli(*args, "--max_train_steps", "6")
    assert code == 0, err
    assert "checkpoint-4 was written by 2 processes with a global batch of 8; going on with 1 process" in err
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["epoch"] for r in records[-2:]] == [2, 2] and records[-1]["images_seen"] == 24 + 2 * 4


def test_one_process_checkpoint_resumes_on_two(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "2", "--checkpointing_steps", "3",
                           "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "3")[0] == 0
    assert not (out / "checkpoint-3" / "random_states_1.pkl").exists()
    result = launch_processes("-m", "uncond", *args, "--max_train_steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-3" in result.stderr and "going on with 2 processes" in result.stderr
    assert (out / "checkpoint-6" / "random_states_1.pkl").is_file()
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["images_seen"] == 3 * 2 + 3 * 4


def test_two_processes_share_the_evaluation_images(color_folder, tiny_unet, tmp_path):
    """--eval_every_steps with 2 processes: each samples and measures its half of the images, and the FID the
    run logs is the one a single process computes from the exported EMA weights with the same images."""
    from diffusers import DDPMScheduler, UNet2DModel

    from conftest import make_tiny_extractor
    from uncond import metrics as uncond_metrics
    from uncond import sampling

    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "2", "--eval_every_steps", "2",
                           "--eval_num_images", "6", "--use_ema")
    result = launch_processes(TESTS / "eval_worker.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluation at step 2 (6 images from 2 processes" in result.stderr
    [evaluation] = [r for r in metrics(out) if "fid" in r]
    assert evaluation["eval_images"] == 6

    unet = UNet2DModel.from_pretrained(out / "unet")  # the EMA weights at step 2, the last one
    scheduler = sampling.make_sampler("sde-dpmsolver++", DDPMScheduler.from_pretrained(out / "scheduler").config)
    batches = sampling.sample_batches(unet, scheduler, num_images=6, num_steps=2, seed=0, batch_size=4)
    features = uncond_metrics.extract_features(make_tiny_extractor(), batches)
    reference = uncond_metrics.load_stats(out / "fid_reference.npz")
    scores = uncond_metrics.compare(features, reference, torch.device("cpu"))
    assert evaluation["fid"] == pytest.approx(scores.fid, rel=1e-3)


def test_two_processes_sample_the_images_one_would_and_complete_an_interrupted_folder(run_cli, tmp_path):
    """`accelerate launch -m uncond sample`: each process samples its share into the same folder; the images are
    those one process writes, and an interrupted folder's missing images are shared out the same way."""
    import numpy as np
    from PIL import Image

    from conftest import save_tiny_pipeline

    model = save_tiny_pipeline(tmp_path / "model")
    args = ("sample", model, "--num_images", 7, "--batch_size", 2, "--steps", 2, "--grid", tmp_path / "grid.png")
    assert run_cli(*args, "--output_dir", tmp_path / "one")[0] == 0
    (tmp_path / "grid.png").rename(tmp_path / "one-grid.png")
    two = tmp_path / "two"
    result = launch_processes("-m", "uncond", *args, "--output_dir", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 7 images (16x16, RGB)" in result.stderr and "images/s from 2 processes" in result.stderr
    pixels = lambda folder: [np.asarray(Image.open(folder / f"{i:06d}.png")).astype(int) for i in range(7)]  # noqa
    for a, b in zip(pixels(tmp_path / "one"), pixels(two), strict=True):
        assert np.abs(a - b).max() <= 1  # float rounding of batched convolutions only
    assert Image.open(tmp_path / "grid.png").size == Image.open(tmp_path / "one-grid.png").size
    for lost in (1, 4, 5):  # as an interrupted run of either kind leaves it
        (two / f"{lost:06d}.png").unlink()
    result = launch_processes("-m", "uncond", *args, "--output_dir", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already holds 4 of the 7 images of these settings; sampling the other 3" in result.stderr
    assert "wrote 3 images" in result.stderr and len(list(two.glob("*.png"))) == 7


@pytest.mark.parametrize("case", ["setup", "checkpoint"])
def test_a_failure_of_the_main_process_alone_stops_every_process_with_its_reason(tmp_path, case):
    """Work that the main process does alone (the output folder, a checkpoint's last files) failing on a full
    disk: the other process was left in a collective and ended in a gloo traceback ("Connection closed by
    peer"), or waited until the process group's timeout."""
    result = launch_processes(TESTS / "main_failure_worker.py", case, tmp_path / "run", timeout=120)
    endings = [path.read_text() for path in sorted(tmp_path.glob("ending-*.txt"))]
    if case == "setup":
        assert endings == ["rank 0: OSError: [Errno 28] No space left on device",
                           "rank 1: RunFailed: the main process failed (OSError: [Errno 28] No space left on "
                           "device)"], result.stdout + result.stderr
    else:
        assert [line.split(";")[0] for line in endings] == [
            f"rank {rank}: RunFailed: could not write checkpoint-1 (No space left on device)" for rank in (0, 1)
        ], result.stdout + result.stderr
        assert not list((tmp_path / "run").iterdir())  # nothing half-written left


def test_a_signal_to_one_process_stops_every_process_at_the_next_step(color_folder, tiny_unet, tmp_path):
    """Launchers kill a stopping run 30 s after the signal: the processes agree on stopping at every step (not at
    log intervals or epoch ends, here 100 and 6 steps away), and all stop at the same one."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "1", "--max_train_steps", "12",
                           "--logging_steps", "100")
    result = launch_processes(TESTS / "stop_worker.py", *args, STOP_RANK="1", STOP_AT="3")
    assert stopped_processes(result) == ["0"], result.stderr[-3000:]
    assert "stopped by a signal to another process at step 4, checkpoint-4 saved" in result.stderr
    assert checkpoints_in(out) == ["checkpoint-4"] and json.loads(
        (out / "checkpoint-4" / "training_state.json").read_text())["step"] == 4


def test_a_signal_to_one_process_as_the_launch_starts_ends_the_launch_at_once(color_folder, tiny_unet, tmp_path):
    """SIGTERM to one process (not the main one) while the processes meet: it exited 0 with no word, so the
    launcher saw nothing wrong, and the main process waited for it in torch's rendezvous for the process group's
    2-hour timeout. Its status (143) tells the launcher, which ends the others: the main one, waiting in C++ where
    Python's handler cannot run, at once."""
    args = fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "4")
    started = time.monotonic()
    result = launch_processes(TESTS / "stop_worker.py", *args, STOP_RANK="1", STOP_AT="setup", timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 60, result.stderr[-3000:]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*exitcode\s*:\s*143\b", result.stderr), result.stderr[-3000:]
    assert "Unable to shutdown process" not in result.stderr  # not the launcher's SIGKILL 30 s later


MEETING = """
import sys, time
from uncond import environment
print("started", flush=True)
time.sleep(float(sys.argv[1]))  # imports and planning, before the processes meet
with environment.sigterm_ends_while_processes_meet():
    print("meeting", flush=True)
    time.sleep(60)
"""
LAUNCHER = """
import os, subprocess, sys, time
process = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], env={**os.environ, "WORLD_SIZE": "2"})
print(process.pid, flush=True)
time.sleep(120)
"""


def ended(pid: int) -> bool:
    """Gone, or a zombie that its new parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("killed_while", ["meeting", "started"])
def test_processes_meeting_end_when_their_launcher_is_killed(killed_while):
    """A launcher SIGKILLed while its processes met (torch's rendezvous, in C++): they were handed to another
    parent and waited for its store for the process group's 2-hour timeout, keeping their GPUs (trial 55 F1).
    Killed before they met (their imports and planning take seconds), they watched their new parent instead
    (trial 56 F2)."""
    planning_s = "0" if killed_while == "meeting" else "3"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, MEETING, planning_s], stdout=subprocess.PIPE,
                                text=True)
    worker = int(launcher.stdout.readline())
    try:
        assert launcher.stdout.readline() == "started\n"
        if killed_while == "meeting":
            assert launcher.stdout.readline() == "meeting\n"
        time.sleep(1.5)
        assert not ended(worker)  # with its launcher there, it goes on meeting
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while not ended(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ended(worker)
    finally:
        launcher.kill()
        if not ended(worker):
            os.kill(worker, 9)


def test_a_process_forked_after_the_import_meets_the_others_with_its_launcher_there(monkeypatch):
    """accelerate's notebook_launcher forks its processes from the notebook, where uncond was imported: they
    watched the notebook's own parent, took it for a launcher gone, and each was sent SIGTERM as they met
    (trial 58 F1)."""
    import multiprocessing

    from uncond import environment

    def meet() -> None:
        with environment.sigterm_ends_while_processes_meet():
            time.sleep(1.5)  # three looks at the parent

    monkeypatch.setenv("WORLD_SIZE", "2")
    process = multiprocessing.get_context("fork").Process(target=meet)
    process.start()
    process.join(timeout=30)
    assert process.exitcode == 0  # -15 when SIGTERM ended it


@pytest.mark.parametrize("killed_rank", ["1", "0"])
def test_a_process_killed_mid_run_leaves_the_others_one_line_and_whole_checkpoints(color_folder, tiny_unet, tmp_path,
                                                                                    killed_rank):
    """A process killed (the kernel's out-of-memory killer, kill -9): the one left printed a 50-line gloo traceback
    ("Connection reset by peer") and no word of uncond's on what was kept; the main process's stderr can be the
    only log a job keeps. The next run resumes from the last whole checkpoint."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "1", "--max_train_steps", "8",
                           "--checkpointing_steps", "2", "--logging_steps", "100")
    result = launch_processes(TESTS / "stop_worker.py", *args, STOP_RANK=killed_rank, STOP_AT="4",
                              STOP_SIGNAL="SIGKILL")
    assert result.returncode != 0
    said = [line for line in result.stderr.splitlines() if line.startswith("uncond: stopped:")]
    assert len(said) == 1, result.stderr
    assert "another process of the launch ended or lost its connection" in said[0] and \
        "the checkpoints written before are intact" in said[0], result.stderr[-3000:]
    assert not re.search(r"\[rank\d\]: Traceback", result.stderr), result.stderr[-3000:]  # the launcher's own stays
    result = launch_processes("-m", "uncond", *args)
    assert result.returncode == 0 and "resuming from checkpoint-2 at step 2" in result.stderr, result.stderr[-3000:]


def test_a_stop_during_an_epochs_preview_stops_there_and_the_resume_makes_it(color_folder, tiny_unet, tmp_path):
    """Agreed one step late, the processes stopped after the next step, and the checkpoint went on without the
    given-up preview of the epoch's end (the resume then drew a grid of the wrong step)."""
    out = tmp_path / "run"  # 12 images, 2 processes x batch 2: 3 steps an epoch, a grid at each epoch's end
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "2", "--max_train_steps", "6",
                           "--save_images_epochs", "1", "--logging_steps", "100")
    result = launch_processes(TESTS / "stop_worker.py", *args, STOP_RANK="0", STOP_AT="preview")
    assert stopped_processes(result) == ["0"], result.stderr[-3000:]
    assert "the sample grid of step 3 is left out" in result.stderr
    assert "stopped by SIGTERM at step 3, checkpoint-3 saved" in result.stderr
    result = launch_processes("-m", "uncond", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]


def test_a_resume_inside_a_logging_window_logs_the_uninterrupted_runs_losses(color_folder, tiny_unet, tmp_path):
    """Each process goes on from its own sum of the window's losses: from their mean (what checkpoints kept), the
    sums were rounded in another order and the window's log line differed in its last bits (trial 55 F3)."""
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--gradient_accumulation_steps", "2", "--max_train_steps",
                           "12", "--logging_steps", "3", "--checkpointing_steps", "4", "--save_images_epochs", "100",
                           "--seed", "1")  # (seeds 0 and 2 happen to round alike)
    assert launch_processes("-m", "uncond", *args).returncode == 0
    uninterrupted = metrics(out)
    result = launch_processes("-m", "uncond", *args, "--resume_from_checkpoint", "checkpoint-8")  # steps 9 to 12 again
    assert result.returncode == 0, result.stderr[-3000:]
    timeless = [[{key: value for key, value in record.items() if key != "images_per_sec"} for record in records]
                for records in (uninterrupted, metrics(out))]
    assert timeless[0] == timeless[1]


def stopped_processes(result: subprocess.CompletedProcess) -> list[str]:
    """The ranks that exited with SIGTERM's status (143), as the launcher reports them: a stopped run is not a
    finished one. The main process says it, last (a launcher ends the others once one fails)."""
    return re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*143\b", result.stderr) \
        if result.returncode else []


def checkpoints_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("checkpoint-*"))


def test_machines_holding_different_images_stop_at_once(color_folder, tiny_unet, tmp_path):
    """Instead of training on overlapping shards (here, where both counts give 2 batches per epoch) or waiting
    for the 2-hour time-out (where the epochs' lengths differ). Without the check this run ends with status 0."""
    result = launch_processes("tests/uneven_cache_launch.py",
                              *fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "4"),
                              timeout=120)
    assert result.returncode != 0
    assert "uncond: stopped: the processes hold different numbers of images (12, 11, by process)" in result.stderr


def test_machines_given_different_settings_are_refused_before_any_work(color_folder, tiny_unet, tmp_path):
    """Each machine types its own command: a different --max_train_steps crashed the run in a collective at the
    first machine's last step, and a different --learning_rate trained on silently."""
    out = tmp_path / "run"
    result = launch_processes("tests/rank_arguments_launch.py",
                              *fast_train_args(color_folder, tiny_unet, out, "--max_train_steps", "4"),
                              "--rank1", "--max_train_steps", "6", "--learning_rate", "0.01", timeout=120)
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("uncond: error:")]
    assert error == ["uncond: error: the processes were started with different settings (--max_train_steps 4, 6; "
                     "--learning_rate 0.0001, 0.01, by process): give every machine the same command, its rank "
                     "aside"]
    assert not out.exists()  # before the output folder and the data


def test_one_process_batch_8_equals_two_processes_batch_4(tmp_path):
    """Same images, noise and timesteps: the loss and the DDP-averaged gradients of 2 x 4 match 1 x 8."""
    result = launch_processes(TESTS / "ddp_worker.py", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1)]
    assert all(int(r["num_processes"]) == 2 for r in ranks)

    unet, scheduler = ddp_worker.unet_and_scheduler()
    loss = ddp_worker.shard_loss(unet, scheduler, slice(0, 8))
    loss.backward()
    whole_batch = {name: p.grad for name, p in unet.named_parameters()}
    unet.zero_grad()
    ddp_worker.shard_loss(unet, scheduler, slice(0, 4)).backward()
    first_half = {name: p.grad for name, p in unet.named_parameters()}

    for r in ranks:
        torch.testing.assert_close(r["loss"][0], loss.detach(), rtol=1e-6, atol=0)
        for name, gradient in whole_batch.items():
            torch.testing.assert_close(r[name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    # and the averaging is what made them equal: one process's own half differs
    assert max((first_half[n] - whole_batch[n]).abs().max() for n in whole_batch) > 1e-3


def test_fsdp_trains_the_same_model_as_ddp_and_resumes_on_three_processes(color_folder, tiny_unet, tmp_path):
    """uncond's fsdp.yaml on CPU processes (through fsdp_launch.py, which takes accelerate's FSDP
    path there as it does on GPUs): two FSDP2 processes, accumulating gradients over two micro-batches, train
    the same weights and EMA as two DDP processes with the same data and noise, and their checkpoint resumes
    on three processes (uneven shards), again as DDP's does."""
    runs = {"ddp": tmp_path / "ddp", "fsdp": tmp_path / "fsdp"}

    def train(kind: str, processes: int, steps: int) -> str:
        args = fast_train_args(color_folder, tiny_unet, runs[kind], "--train_batch_size", "2", "--use_ema",
                               "--gradient_accumulation_steps", "2",
                               "--lr_scheduler", "constant", "--learning_rate", "1e-3", "--checkpointing_steps", "2",
                               "--logging_steps", "1", "--max_train_steps", str(steps),
                               *["--eval_every_steps", "2", "--eval_num_images", "6"] * (processes == 2))
        program = [TESTS / ("fsdp_launch.py" if kind == "fsdp" else "eval_worker.py")]
        result = launch_processes(*program, *args, processes=processes, fsdp=kind == "fsdp")
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    def assert_same_weights(folder: str) -> None:
        ddp, fsdp = (load_file(runs[kind] / folder / "diffusion_pytorch_model.safetensors") for kind in runs)
        assert ddp.keys() == fsdp.keys()
        for name in ddp:
            # Attention's key bias shifts every logit of a row equally, which softmax ignores: its gradient is
            # rounding noise (1e-11), which AdamW's normalisation turns into updates of up to ~1e-5 a step.
            atol = 1e-4 if name.endswith("to_k.bias") else 1e-5
            torch.testing.assert_close(fsdp[name], ddp[name], rtol=1e-4, atol=atol, msg=f"{folder}: {name}")

    log = train("fsdp", 2, 4)
    assert "2 processes on cpu, weights sharded with FSDP2" in log
    train("ddp", 2, 4)
    out = runs["fsdp"]
    assert (out / "checkpoint-4" / "pytorch_model_fsdp.bin").is_file()
    for folder in ("checkpoint-2/unet", "checkpoint-4/unet", "checkpoint-4/unet_ema", "unet"):
        assert_same_weights(folder)
    for key in ("loss", "fid"):  # the evaluations, too, sample the same images from the gathered EMA weights
        assert [r[key] for r in metrics(out) if key in r] == \
            pytest.approx([r[key] for r in metrics(runs["ddp"]) if key in r], rel=1e-4), key
    assert len([r for r in metrics(out) if "fid" in r]) == 2
    assert json.loads((out / "checkpoint-4" / "unet_ema" / "config.json").read_text())["optimization_step"] == 4
    for name in ("loss.png", "samples/step-0000004.png"):
        assert (out / name).is_file(), name
    # the launch's own config file, by a path that works from any folder
    card = (out / "README.md").read_text()
    assert f"accelerate launch --config_file {FSDP_CONFIG} --num_processes 2 --mixed_precision no " in card
    assert " -m uncond train " in card
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert pipeline(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)

    # 2 -> 3 processes: the checkpoint's shards are cut again (the tiny UNet's sizes do not divide by 3)
    log = train("fsdp", 3, 6)
    assert "resuming from checkpoint-4" in log and "going on with 3 processes" in log
    train("ddp", 3, 6)
    for folder in ("checkpoint-6/unet", "checkpoint-6/unet_ema"):
        assert_same_weights(folder)


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
                                            ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")])
def test_unsupported_launches_are_refused_before_any_work(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch,
                                                          variable, name):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch` sets for a DeepSpeed or Megatron-LM config
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out))
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and f"this launch asks for {name}" in lines[0] and "fsdp.yaml" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("fsdp_version, state_dict_type, flag, message", [
    ("1", "FULL_STATE_DICT", None, "set fsdp_version: 2"),
    ("2", "SHARDED_STATE_DICT", None, "set fsdp_state_dict_type: FULL_STATE_DICT"),
    ("2", "FULL_STATE_DICT", "--compile", "--compile does not work with FSDP"),
    ("2", "FULL_STATE_DICT", "--channels_last", "--channels_last does not work")])
def test_fsdp_launches_uncond_cannot_train_are_refused(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch,
                                                       fsdp_version, state_dict_type, flag, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    monkeypatch.setenv("FSDP_VERSION", fsdp_version)
    monkeypatch.setenv("FSDP_STATE_DICT_TYPE", state_dict_type)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out, *[flag] * bool(flag)))
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not out.exists()


def test_fsdp_units_missing_from_the_unet_are_refused_before_any_work(run_cli, color_folder, tmp_path, monkeypatch):
    from conftest import TINY_UNET

    unet_config = tmp_path / "no_attention.json"  # no attention anywhere: fsdp.yaml's Attention units do not exist
    unet_config.write_text(json.dumps({**TINY_UNET, "down_block_types": ["DownBlock2D", "DownBlock2D"],
                                       "up_block_types": ["UpBlock2D", "UpBlock2D"], "add_attention": False}))
    launch = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
              "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResnetBlock2D,Attention"}
    for variable, value in launch.items():  # what a launch with fsdp.yaml sets
        monkeypatch.setenv(variable, value)
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, unet_config, out))
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and "names Attention, which this UNet does not have" in lines[0], err
    assert not out.exists()
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "ResnetBlock2D")
    assert run_cli(*fast_train_args(color_folder, unet_config, out, "--dry_run"))[0] == 0


def test_fsdp_on_cpu_processes_and_checkpoints_of_the_other_kind_are_refused(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from uncond.config import TrainConfig, UsageError
    from uncond.plan import Plan, check_processes

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 4, "fsdp": True}))
    plan = Plan(TrainConfig(), {}, None, checkpoint, "")
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2, device=torch.device("cuda"))
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, device=torch.device("cpu"))
    check_processes(plan, fsdp)  # an FSDP checkpoint resumes under FSDP
    with pytest.raises(UsageError, match="written by an FSDP run"):
        check_processes(plan, ddp)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="accelerate runs cpu processes data-parallel"):
        check_processes(plan, ddp)  # accelerate 1.15 quietly gives DDP to CPU processes under an FSDP launch
    (checkpoint / "training_state.json").write_text(json.dumps({"step": 4}))  # a DDP (or the seed's) checkpoint
    with pytest.raises(UsageError, match="written by a data-parallel or one-process run"):
        check_processes(plan, fsdp)


@pytest.mark.parametrize("name, machines, kind", [("multi_gpu", 1, "MULTI_GPU"), ("multi_node", 2, "MULTI_GPU"),
                                                  ("fsdp", 1, "FSDP")])
def test_the_accelerate_configs_uncond_ships_load(name, machines, kind):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(config_path(name)))  # as `accelerate launch --config_file` reads it
    assert config.distributed_type == DistributedType[kind] and config.num_machines == machines
    assert config.num_processes >= 2 * machines
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_only_a_failed_exchange_with_a_gone_process_is_said_to_be_one(monkeypatch):
    """The one line for a process that ended names the other process; a timeout (the other may be alive, stuck on a
    hung disk) or any other error keeps its own traceback."""
    from uncond.cli import lost_another_process

    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:29500: "
                         "Connection reset by peer. This is typically caused by a remote worker hanging")
    timeout = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                           "3000ms for recv operation to complete")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_another_process(reset)
    assert not lost_another_process(timeout) and not lost_another_process(RuntimeError("shapes do not match"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not lost_another_process(reset)
