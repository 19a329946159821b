"""A CPU run beside other busy processes: PyTorch's OpenMP threads wait for each other in lockstep, so a step beside
one busy process took many times as long as alone (20 times in a user's trial). The run trains on the cores the
others leave free while they are busy (cpu_threads.py), and on all of them again once they are done."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fast_train_args
from uncond import cpu_threads

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc")


def test_other_processes_busy_cores_are_measured_apart_from_the_runs_own(tmp_path):
    neighbours = cpu_threads.CpuNeighbours()
    time.sleep(1)
    if (already := neighbours.busy_cores()) > 0.3:  # (it failed beside other work, as its measure is right to)
        pytest.skip(f"other processes keep {already:.1f} cores busy: the measure is checked on a quiet machine")
    # a busy process that is not this one's child: another program
    started = subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    other = int(started.stdout)
    try:
        time.sleep(0.5)
        neighbours.busy_cores()
        time.sleep(2)
        assert 0.6 < neighbours.busy_cores() < 1.4
    finally:
        os.kill(other, signal.SIGKILL)
    # this process's own work and its children's (DataLoader workers) are not others'
    worker = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        neighbours.busy_cores()
        end = time.monotonic() + 2
        while time.monotonic() < end:
            pass
        assert neighbours.busy_cores() < 0.4
    finally:
        worker.kill()
        worker.wait()


class Neighbours:
    """Stands in for CpuNeighbours: the busy cores each look returns, in turn."""

    def __init__(self, *busy: float) -> None:
        self.cpus, self.busy, self.looks = {0, 1}, list(busy), 0

    def busy_cores(self) -> float:
        self.looks += 1
        return self.busy.pop(0)


def test_threads_follow_the_cores_others_leave_free_after_two_agreeing_checks(monkeypatch, caplog):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.__setitem__(0, n))
    threads, now = [2], [0.0]
    neighbours = Neighbours(1.3, 0.2, 1.3, 1.4, 0.3, 0.1, 0.0)
    governor = cpu_threads.ThreadGovernor(neighbours, clock=lambda: now[0])
    seen = []
    with caplog.at_level(logging.INFO, logger="uncond"):
        for second in range(0, 80, 2):  # a step every 2 s: a look every 10 s
            now[0] = second
            governor.adjust()
            seen.append(threads[0])
    assert neighbours.looks == 7
    # looks at 10 s (1.3 busy: wants 1), 20 s (0.2: wants 2), 30 s and 40 s (wants 1, twice: 1 thread),
    # 50 s (0.3: wants 2), 60 s (0.1: 2 threads again), 70 s
    assert seen[:20] == [2] * 20 and seen[20:30] == [1] * 5 + [1] * 5 and seen[30:] == [2] * 10
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("other processes keep 1.4 of this run's 2 cores busy: training on 1 of 2 threads")
    assert "OMP_NUM_THREADS=2 keeps 2" in lines[0]
    assert lines[1] == "the other processes left cores free: training on 2 of 2 threads"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads to give one up")
def test_a_cpu_run_beside_busy_processes_trains_on_fewer_threads_and_gives_them_back(
        run_cli, color_folder, tiny_unet, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "CHECK_EVERY_SECONDS", 0.0)  # a look at every step
    monkeypatch.setattr(cpu_threads.CpuNeighbours, "busy_cores", lambda self: len(self.cpus) - 0.8)
    during = []
    monkeypatch.setattr(cpu_threads.ThreadGovernor, "adjust",  # the training steps' (not the previews')
                        lambda self, adjust=cpu_threads.ThreadGovernor.adjust: adjust(self) or
                        self.doing != "training" or during.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "run", "--max_train_steps", "4"))
    assert code == 0, err
    assert "fewer CPU threads while other processes keep cores busy" in err
    assert during == [before, 1, 1, 1] and f"training on 1 of {before} threads while they do" in err
    assert torch.get_num_threads() == before  # given back when the run ends (a notebook goes on with them)
    # the card offers the thread count as one that bitwise equal weights need: it says the run gave some up (it
    # named the count it started with alone; trial 61 F3)
    assert f"cpu, {before} threads, down to 1 while other processes kept cores busy. " in (
        tmp_path / "run" / "README.md").read_text()
    # threads the user chose are left alone
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    during.clear()
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, tmp_path / "chosen", "--max_train_steps", "4"))
    assert code == 0 and "fewer CPU threads" not in err and during == [before] * 4
    assert f"cpu, {before} threads. " in (tmp_path / "chosen" / "README.md").read_text()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads to give one up")
def test_sampling_beside_busy_processes_runs_on_fewer_threads_and_gives_them_back(run_cli, tmp_path, monkeypatch):
    """`uncond sample` (and previews, `uncond evaluate`) on a CPU beside another job: every network evaluation
    waited for the thread that lost its core, as training's steps did."""
    from conftest import save_tiny_pipeline
    from uncond import sampling

    pipeline = save_tiny_pipeline(tmp_path / "pipeline")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "CHECK_EVERY_SECONDS", 0.0)  # a look at every network evaluation
    monkeypatch.setattr(cpu_threads.CpuNeighbours, "busy_cores", lambda self: len(self.cpus) - 0.8)
    during = []
    monkeypatch.setattr(sampling, "to_uint8", lambda sample, to_uint8=sampling.to_uint8: during.append(
        torch.get_num_threads()) or to_uint8(sample))  # the count each batch was sampled on
    before = torch.get_num_threads()
    code, _, err = run_cli("sample", pipeline, "--num_images", 4, "--batch_size", 2, "--steps", 3, "--device", "cpu",
                           "--output_dir", tmp_path / "images")
    assert code == 0, err
    assert during == [1, 1] and f"sampling on 1 of {before} threads while they do" in err, err
    assert torch.get_num_threads() == before  # given back (a notebook goes on with them)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads to give one up")
def test_evaluates_feature_network_runs_on_fewer_threads_beside_busy_processes(run_cli, stand_in_inception, tmp_path,
                                                                              monkeypatch):
    """`uncond evaluate` of image folders on a CPU beside another job: InceptionV3 over every image, with all the
    threads, waited for the one that lost its core at each batch, as sampling did before its governor."""
    from conftest import write_images
    from uncond import metrics

    images = write_images(tmp_path / "images", 12, size=(20, 24))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "CHECK_EVERY_SECONDS", 0.0)  # a look after every batch
    monkeypatch.setattr(cpu_threads.CpuNeighbours, "busy_cores", lambda self: len(self.cpus) - 0.8)
    extractor, during = metrics.inception_extractor, []  # the stand-in

    def counting(*args, **kwargs):  # the thread count each batch's features were computed on
        loaded = extractor(*args, **kwargs)
        network = loaded.network
        return dataclasses.replace(loaded, network=lambda pixels: during.append(torch.get_num_threads()) or
                                   network(pixels))

    monkeypatch.setattr(metrics, "inception_extractor", counting)
    before = torch.get_num_threads()
    code, _, err = run_cli("evaluate", images, "--reference", images, "--resolution", "16", "--batch_size", "2")
    assert code == 0, err
    assert during[-3:] == [1, 1, 1] and f"measuring features on 1 of {before} threads while they do" in err, err
    assert torch.get_num_threads() == before  # given back (a notebook goes on with them)
