"""Host time of uncond's training step against the bare step, where the compute is negligible.

    python benchmarks/host_time.py            # the seed UNet's architecture at 1/16 of its width, batch 1

An eager step on a GPU is bound by the host's time to dispatch it (benchmarks/bare_step.py: on an H100,
batch 1 costs nearly what batch 64 does), so every millisecond of Python the loop adds to the bare
forward, backward and AdamW is a millisecond per step there. This measures that on a CPU, where no
GPU is needed: the seed's UNet with every layer kept and its channels cut to 1/16 (8 to 32), at
batch 1 and one thread, so that the step's time is its dispatch and Python time, short of CUDA's
own launch cost. The two steps are timed in alternating rounds in one process; printed are the
median and the minimum over rounds, the difference, and the host time of each phase of uncond's step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DModel

from uncond import parts, sharding, train
from uncond.config import TrainConfig
from uncond.models import PRESETS
from uncond.objective import training_loss
from uncond.plan import plan_run

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import prepare_data  # noqa: E402 - the same photos the throughput benchmark trains on


def narrow_seed_unet(divisor: int) -> dict:
    """The seed UNet's config with its channels divided by `divisor`: the same layers, so the same operations."""
    unet = dict(PRESETS["seed"].unet)
    unet["block_out_channels"] = [channels // divisor for channels in unet["block_out_channels"]]
    unet["norm_num_groups"] = min(32, min(unet["block_out_channels"]))  # 32: UNet2DModel's default
    return {**unet, "sample_size": 64, "in_channels": 3, "out_channels": 3}


def bare_step(unet_config: dict, batch: int) -> Callable[[], None]:
    """benchmarks/bare_step.py's step (fp32): forward, loss, backward, fused AdamW, on random inputs."""
    torch.manual_seed(0)
    unet = UNet2DModel(**unet_config)
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
    images = torch.randn(batch, 3, 64, 64)
    timesteps = torch.randint(0, 1000, (batch,))

    def step() -> None:
        (unet(images, timesteps).sample.float() - images).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def uncond_run(unet_config: dict, batch: int, work: Path) -> parts.Run:
    """A Run as `uncond train` builds it (EMA and gradient clipping on, as in the throughput benchmark)."""
    data = prepare_data("photos", work / "photos", count=16)
    (work / "unet.json").write_text(json.dumps(unet_config))
    config = TrainConfig(train_data_dir=str(data), output_dir=str(work / "run"), resolution=64,
                         model_config_name_or_path=str(work / "unet.json"), train_batch_size=batch,
                         use_ema=True, logger="none", seed=0, max_train_steps=10**6, checkpointing_steps=10**9)
    (work / "run").mkdir()
    plan = plan_run(config, explicit={"resolution"})
    return parts.build_run(plan, parts.make_accelerator(plan.config, work / "run"))


def uncond_step(run: parts.Run, micro_batches: list[torch.Tensor]) -> Callable[[], None]:
    """The loop's body as train_throughput.py times it, on one batch held in memory (no loader)."""
    def step() -> None:
        loss = train.train_step(run, micro_batches)
        run.step += 1
        run.running_loss.add(loss)
        if run.step % run.config.logging_steps == 0:
            run.running_loss.pop().item()
    return step


def milliseconds(work: Callable[[], object], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - start) / repeats * 1000


def phase_times(run: parts.Run, images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Milliseconds of host time per phase of uncond's step (each phase timed alone, repeated)."""
    accelerator, unet = run.accelerator, run.unet
    times = {}
    times["forward and loss"] = milliseconds(
        lambda: training_loss(unet, run.noise_scheduler, images, run.objective, run.noise_generator), repeats)

    def forward_backward() -> None:
        accelerator.backward(training_loss(unet, run.noise_scheduler, images, run.objective, run.noise_generator))
    times["backward"] = milliseconds(forward_backward, repeats) - times["forward and loss"]
    times["gradient clipping"] = milliseconds(lambda: accelerator.clip_grad_norm_(run.parameters, 1.0), repeats)
    times["AdamW"] = milliseconds(run.optimizer.step, repeats)
    times["EMA"] = milliseconds(lambda: run.ema.step(sharding.local_tensors(run.parameters)), repeats)
    times["LR schedule, zero_grad"] = milliseconds(
        lambda: (run.lr_scheduler.step(), run.optimizer.zero_grad(set_to_none=True)), repeats)
    times["unet.parameters() walked once"] = milliseconds(lambda: list(unet.parameters()), repeats)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--divisor", type=int, default=16, help="the seed UNet's channels divided by this")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds of 5 steps each")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a GPU host dispatches from one thread
    unet_config = narrow_seed_unet(args.divisor)
    run = uncond_run(unet_config, args.batch, Path(tempfile.mkdtemp(prefix="uncond-host-time-")))
    micro_batches = next(train.optimizer_steps(run))
    steps = {"bare": bare_step(unet_config, args.batch), "uncond": uncond_step(run, micro_batches)}
    for step in steps.values():  # warm-up: the optimizer's state, the allocator's caches
        milliseconds(step, 5)
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rounds[name].append(milliseconds(step, 5))
    print(f"seed UNet architecture, channels {tuple(unet_config['block_out_channels'])}, batch {args.batch}, "
          f"{len(run.parameters)} parameter tensors, 1 thread, {args.rounds} rounds of 5 steps")
    summary = {name: (statistics.median(times), min(times)) for name, times in rounds.items()}
    for name, (median, least) in summary.items():
        print(f"{name:<8} step: median {median:6.1f} ms, min {least:6.1f} ms")
    print(f"uncond adds: median {summary['uncond'][0] - summary['bare'][0]:+.1f} ms, "
          f"min {summary['uncond'][1] - summary['bare'][1]:+.1f} ms "
          f"(uncond / bare: {summary['uncond'][0] / summary['bare'][0]:.2f}x by medians)")
    print("uncond's step by phase (host time):")
    for name, ms in phase_times(run, micro_batches[0], repeats=20).items():
        print(f"  {name:<30} {ms:6.2f} ms")


if __name__ == "__main__":
    main()
