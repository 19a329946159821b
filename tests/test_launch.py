"""How uncond reads its launch (accelerate launch, torchrun, SLURM) and says it: the commands that reproduce and
resume a run, launches that start fewer processes than asked, machines given different settings, and the
lines every machine's log must show. The launches themselves run in test_distributed.py."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def test_reproduce_command_names_the_launcher_and_the_random_seed(monkeypatch, tmp_path):
    from uncond.outputs import Launch, reproduce_command

    assert reproduce_command(["train", "--train_data_dir", "my cats"], Launch(), None) == \
        "uncond train --train_data_dir 'my cats'"
    assert reproduce_command(["train", "--use_ema"], Launch(2), 1234) == \
        "accelerate launch --multi_gpu --num_processes 2 -m uncond train --use_ema --seed 1234"
    # Two machines of 4 processes, as torchrun (under accelerate launch) describes them: the command named
    # 8 processes on one machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert reproduce_command(["train"], Launch.of_this_run(8, sharded=False), None) == (
        "accelerate launch --multi_gpu --num_machines 2 --machine_rank $MACHINE_RANK --main_process_ip 10.0.0.1 "
        "--main_process_port 29501 --num_processes 8 -m uncond train")
    # FSDP's, where the launch as typed is not known: the config installed with uncond, by a path that works from
    # any folder (it was examples/accelerate/fsdp.yaml, which only a checkout has, relative to its root)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    words = shlex.split(Launch.of_this_run(2, sharded=True).launcher())
    assert words[:3] + words[4:] == ["accelerate", "launch", "--config_file", "--num_processes", "2", "-m", "uncond"]
    assert Path(words[3]).is_absolute() and "fsdp_version: 2" in Path(words[3]).read_text()


def typed_launch_of(program: Path, typed: list[str], monkeypatch) -> tuple[str, ...] | None:
    """What uncond reads of a launcher's command line: a stand-in named as the launcher, which only waits, is
    made this process's parent."""
    from uncond.environment import typed_launch

    program.write_text("import time\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(program), *typed], cwd=program.parent)
    try:
        monkeypatch.setattr("os.getppid", lambda: parent.pid)
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{parent.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)  # exec gives the process its new command line a moment after Popen returns
        return typed_launch()
    finally:
        parent.kill()
        parent.wait()


def test_resume_command_repeats_the_launchers_options_as_typed(tmp_path, monkeypatch):
    """The options are read from the launcher's command line (the parent process's): a config file by its full
    path, whatever else was typed kept, and a machine's rank left to each machine."""
    from uncond.environment import typed_launch
    from uncond.outputs import Launch

    typed = typed_launch_of(tmp_path / "accelerate", [
        "launch", "--config_file", "my fsdp.yaml", "--num_processes", "2", "--gpu_ids", "0,1", "-m", "uncond",
        "train", "--use_ema"], monkeypatch)
    assert typed == ("accelerate", "launch", "--config_file", str(tmp_path / "my fsdp.yaml"), "--num_processes", "2",
                     "--gpu_ids", "0,1")
    assert Launch(2, sharded=True, typed=typed).launcher() == \
        f"accelerate launch --config_file '{tmp_path / 'my fsdp.yaml'}' --num_processes 2 --gpu_ids 0,1 -m uncond"
    several = Launch(8, num_machines=2, typed=("accelerate", "launch", "--num_machines", "2", "--machine_rank", "0",
                                               "--machine_rank=0"))
    assert several.launcher() == "accelerate launch --num_machines 2 --machine_rank $MACHINE_RANK " \
                                 "--machine_rank=$MACHINE_RANK -m uncond"
    # the rank in an accelerate config file: each machine's own, given on the command line
    from_a_file = Launch(8, num_machines=2, typed=("accelerate", "launch", "--config_file", "/jobs/two-machines.yaml"))
    assert from_a_file.launcher() == \
        "accelerate launch --config_file /jobs/two-machines.yaml --machine_rank $MACHINE_RANK -m uncond"
    # torchrun on the second of two machines, running uncond's console script: its options kept, the rank left
    # to each machine, and uncond run as a module
    typed = typed_launch_of(tmp_path / "torchrun", [
        "--nnodes", "2", "--node_rank", "1", "--nproc-per-node=4", "--rdzv_endpoint", "10.0.0.1:29400",
        "--no-python", "uncond", "train", "--use_ema"], monkeypatch)
    assert Launch(8, num_machines=2, typed=typed).launcher() == (
        "torchrun --nnodes 2 --node_rank $MACHINE_RANK --nproc-per-node=4 --rdzv_endpoint 10.0.0.1:29400 -m uncond")
    monkeypatch.setattr("os.getppid", lambda: os.getpid())  # pytest: no launcher above it
    assert typed_launch() is None


def test_a_cpu_launch_asking_for_several_processes_and_getting_one_is_told_how_to_get_them(tmp_path, monkeypatch,
                                                                                          caplog):
    """accelerate 1.15 starts `accelerate launch --cpu --num_processes 2` as one process: the run says so."""
    from uncond import environment, plan

    typed = typed_launch_of(tmp_path / "accelerate", ["launch", "--cpu", "--num_processes", "2", "-m", "uncond",
                                                      "train"], monkeypatch)
    monkeypatch.setattr(environment, "typed_launch", lambda: typed)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING, logger="uncond"):
        plan.warn_one_cpu_process()
    assert "accelerate launch --cpu --num_processes 2 started one process" in caplog.text
    assert "--multi_gpu --num_processes 2" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")  # two processes were started: nothing to say
    with caplog.at_level(logging.WARNING, logger="uncond"):
        plan.warn_one_cpu_process()
    assert not caplog.text
    monkeypatch.delenv("WORLD_SIZE")  # without --cpu, on a machine without GPUs: one process too
    monkeypatch.setattr(environment, "typed_launch", lambda: ("accelerate", "launch", "--num_processes", "3"))
    with caplog.at_level(logging.WARNING, logger="uncond"):
        plan.warn_one_cpu_process()
    assert "accelerate launch --num_processes 3 started one process" in caplog.text


def test_the_same_folder_named_two_ways_is_the_same_setting(tmp_path, monkeypatch):
    """Each machine compares its settings with the others'; `run` and /path/to/run are one output folder."""
    from types import SimpleNamespace

    from uncond import plan
    from uncond.config import TrainConfig

    def sent_by(output_dir: str) -> dict:  # what a process given this --output_dir sends the others to compare
        sent = []
        monkeypatch.setattr(plan, "gather_object", lambda mine: sent.extend(mine) or mine * 2)
        plan.check_same_settings(plan.Plan(TrainConfig(output_dir=output_dir), {}, None, None, ""),
                                 SimpleNamespace(num_processes=2))
        return sent[0]

    monkeypatch.chdir(tmp_path)
    assert sent_by("run") == sent_by(str(tmp_path / "run")) != sent_by(str(tmp_path / "other"))


def test_slurm_tasks_without_a_launcher_are_told_how_to_make_one_run(monkeypatch, caplog):
    """`srun -n 2 uncond train` ran two one-process runs; the second stopped on the folder the first had locked."""
    from uncond import plan

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    with caplog.at_level(logging.WARNING, logger="uncond"):
        plan.warn_slurm_tasks_without_launcher()
    assert "SLURM started 2 tasks, each a run of one process" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")  # srun with RANK and WORLD_SIZE set for each task: one run
    with caplog.at_level(logging.WARNING, logger="uncond"):
        plan.warn_slurm_tasks_without_launcher()
    assert not caplog.text


def test_errors_and_the_resume_command_reach_every_machines_log(run_cli, tmp_path, monkeypatch, capsys):
    """The second machine of a launch printed nothing of why the run stopped, nor the command that resumes it."""
    from uncond import cli
    from uncond.config import EVERY_MACHINE
    from uncond.outputs import Launch, reproduce_section

    monkeypatch.setenv("RANK", "2")  # the first process of the second machine
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, _, err = run_cli("train", "--output_dir", tmp_path / "run")
    assert code == 2 and "uncond: error: no dataset given" in err
    cli.setup_logging()  # as a command sets it up (and puts back as it was, after)
    logging.getLogger("uncond").info("said on every machine", extra=EVERY_MACHINE)
    logging.getLogger("uncond").info("said by the main process")
    err = capsys.readouterr().err
    assert "said on every machine" in err and "said by the main process" not in err
    monkeypatch.setenv("LOCAL_RANK", "1")  # any other process of that machine: silent
    code, _, err = run_cli("train", "--output_dir", tmp_path / "run")
    assert code == 2 and "uncond: error" not in err
    # the model card says what $MACHINE_RANK is
    command = Launch(4, num_machines=2, typed=("accelerate", "launch", "--machine_rank", "1")).launcher()
    card = reproduce_section([{"from_step": 0, "command": f"{command} train"}], 10)
    assert "--machine_rank $MACHINE_RANK" in card and "with the machine's rank in `MACHINE_RANK`" in card


def test_launch_config_prints_the_configs_installed_with_uncond_which_accelerate_reads(run_cli, tmp_path,
                                                                                    monkeypatch):
    """The example launch configs were in the checkout's examples/ only: a wheel had none, and the errors and
    resume commands named files its users did not have. `uncond launch-config NAME` prints an installed file's
    path, from any folder, for `accelerate launch --config_file "$(uncond launch-config NAME)"`."""
    import tomllib

    monkeypatch.chdir(tmp_path)
    code, listing, _ = run_cli("launch-config")
    assert code == 0
    for name in ("multi_gpu", "multi_node", "fsdp"):  # their contents: test_distributed.py
        code, out, _ = run_cli("launch-config", name)
        path = Path(out.strip())
        assert code == 0 and out.count("\n") == 1 and path.is_absolute() and str(path) in listing
        assert f"uncond launch-config {name}" in path.read_text()  # its own comment says how to launch with it
    code, _, err = run_cli("launch-config", "fdsp")
    assert code == 2 and err.count("\n") == 1 and "invalid choice: 'fdsp'" in err
    # and a wheel carries them: the package data names them
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["uncond"]
    package = path.parents[1]
    for config_file in package.glob("accelerate_configs/*.yaml"):
        assert any(config_file.relative_to(package).match(pattern) for pattern in shipped), config_file.name
