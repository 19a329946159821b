"""Several processes through accelerate, on the CPU (gloo): a two-process run to completion, resuming
with another process count, and one process x 8 images = two processes x 4 images.

`accelerate launch --cpu --num_processes 2` starts only one process in accelerate 1.15 (`--cpu` takes
its single-process launcher; several CPU processes need MPI there), so these tests launch with
`--multi_gpu --num_processes 2` on a machine with CUDA hidden: uncond then asks accelerate for CPU
processes, which talk over gloo. The tests check that two processes really ran.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import ddp_worker
from conftest import fast_train_args
from hub_standin import HubStandIn

TESTS = Path(__file__).parent


def free_port() -> int:
    """Another test run on this machine may hold accelerate's default port 29500."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_processes(*args: object, timeout: float = 300, **env_vars: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 ARGS` on the CPU; returns the finished process."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS),
           "HF_HUB_OFFLINE": "1", **env_vars}
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *[str(a) for a in args]]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=TESTS.parent)


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
        result = launch_two_processes("-m", "uncond", *args, "--max_train_steps", "4", "--push_to_hub",
                                      "--hub_token", "hf_standin_token", HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    assert result.returncode == 0, result.stderr[-3000:]
    # one upload per export (after epoch 0 and at the end), from the main process only
    assert len(hub.created) == 1 and [c.message for c in hub.commits] == ["uncond: step 2", "uncond: step 4"]
    assert not [path for path in out.rglob("*") if path.is_file() and b"hf_standin_token" in path.read_bytes()]
    log = result.stderr
    assert "2 process(es) on cpu" in log and "batch 2 per device x 2 processes x 2 accumulation = 8" in log
    assert "2 per epoch" in log  # 12 images: 6 per process, 3 micro-batches of 2, 2 optimizer steps
    for rank in (0, 1):  # each process saved its own random state: two processes really ran
        assert (out / "checkpoint-4" / f"random_states_{rank}.pkl").is_file()
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by the main process
    assert records[-1]["images_seen"] == 32
    # the schedule moved once per optimizer step, not once per process or micro-batch
    assert [r["lr"] for r in records] == pytest.approx(lr_schedule(4), abs=1e-12)
    writers = {path.name.split(".")[-2] for path in (out / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1  # TensorBoard files of one process id only
    for name in ("README.md", "loss.png", "samples/step-0000004.png"):
        assert (out / name).is_file(), name
    assert "accelerate launch --multi_gpu --num_processes 2 -m uncond train" in (out / "README.md").read_text()
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert pipeline(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)

    # The two-process checkpoint goes on in one process, after the 12 images (one epoch) already seen.
    code, _, err = run_cli(*args, "--max_train_steps", "6")
    assert code == 0, err
    assert "checkpoint-4 was written by 2 process(es) with a global batch of 8; going on with 1 process(es)" in err
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["epoch"] for r in records[-2:]] == [2, 2] and records[-1]["images_seen"] == 32 + 2 * 4


def test_one_process_checkpoint_resumes_on_two(run_cli, color_folder, tiny_unet, tmp_path):
    out = tmp_path / "run"
    args = fast_train_args(color_folder, tiny_unet, out, "--train_batch_size", "2", "--checkpointing_steps", "3",
                           "--logging_steps", "1")
    assert run_cli(*args, "--max_train_steps", "3")[0] == 0
    assert not (out / "checkpoint-3" / "random_states_1.pkl").exists()
    result = launch_two_processes("-m", "uncond", *args, "--max_train_steps", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint-3" in result.stderr and "going on with 2 process(es)" in result.stderr
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
    result = launch_two_processes(TESTS / "eval_worker.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluation at step 2 (6 images from 2 process(es)" in result.stderr
    [evaluation] = [r for r in metrics(out) if "fid" in r]
    assert evaluation["eval_images"] == 6

    unet = UNet2DModel.from_pretrained(out / "unet")  # the EMA weights at step 2, the last one
    scheduler = sampling.make_sampler("sde-dpmsolver++", DDPMScheduler.from_pretrained(out / "scheduler").config)
    batches = sampling.sample_batches(unet, scheduler, num_images=6, num_steps=2, seed=0, batch_size=4)
    features = uncond_metrics.extract_features(make_tiny_extractor(), batches)
    reference = uncond_metrics.load_stats(out / "fid_reference.npz")
    scores = uncond_metrics.compare(features, reference, torch.device("cpu"))
    assert evaluation["fid"] == pytest.approx(scores.fid, rel=1e-3)


def test_one_process_batch_8_equals_two_processes_batch_4(tmp_path):
    """Same images, noise and timesteps: the loss and the DDP-averaged gradients of 2 x 4 match 1 x 8."""
    result = launch_two_processes(TESTS / "ddp_worker.py", tmp_path)
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


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launches_are_refused_before_any_work(run_cli, color_folder, tiny_unet, tmp_path, monkeypatch,
                                                      variable, name):
    monkeypatch.setenv(variable, "true")  # what `accelerate launch` sets for an FSDP or DeepSpeed config
    out = tmp_path / "run"
    code, _, err = run_cli(*fast_train_args(color_folder, tiny_unet, out))
    lines = [line for line in err.splitlines() if line.startswith("uncond: error:")]
    assert code == 2 and len(lines) == 1 and f"this launch asks for {name}" in lines[0] and "--multi_gpu" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name, machines", [("multi_gpu", 1), ("multi_node", 2)])
def test_example_accelerate_configs_load(name, machines):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(TESTS.parent / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_machines == machines
    assert config.num_processes >= 2 * machines
