"""Operations uncond's training step dispatches, phase by phase: what a GPU must launch per step.

    python benchmarks/step_ops.py                        # seed UNet, bf16 autocast, on this machine's CPU
    python benchmarks/step_ops.py --preset tiny --precision no

Where a GPU step is bound by launching kernels (benchmarks/bare_step.py: batch 1 costs nearly what
batch 64 does), its time follows the number of operations dispatched, not their size, so counting them
on a CPU shows what each phase adds to the bare forward and backward pass. Counted with a
TorchDispatchMode (every ATen operation, views and casts included), on a Run built as `uncond train`
builds it (parts.build_run), at a small resolution since the count does not depend on it. Then times
torch's three AdamW implementations on the same parameters (per tensor, foreach, fused).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from uncond import parts, train
from uncond.config import TrainConfig
from uncond.objective import training_loss
from uncond.plan import plan_run

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import prepare_data  # noqa: E402 - the same photos the throughput benchmark trains on


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="uncond-step-ops-"))
    data = prepare_data("photos", work / "photos", count=8)
    config = TrainConfig(train_data_dir=str(data), output_dir=str(work / "run"), model_preset=args.preset,
                         resolution=args.resolution, train_batch_size=2, mixed_precision=args.precision,
                         use_ema=True, logger="none", seed=0, max_train_steps=10**6, checkpointing_steps=10**9)
    (work / "run").mkdir()
    plan = plan_run(config, explicit={"resolution"})
    run = parts.build_run(plan, parts.make_accelerator(plan.config, work / "run"))
    accelerator, unet = run.accelerator, run.unet
    micro_batches = next(train.optimizer_steps(run))
    train.train_step(run, micro_batches)  # the first step allocates the optimizer's state
    run.step += 1

    print(f"{args.preset} UNet, {args.precision}, {sum(1 for _ in unet.parameters())} parameter tensors, "
          f"AdamW fused: {bool(run.optimizer.defaults.get('fused'))}")

    def count(name: str, phase):
        with CountOps() as counter:
            result = phase()
        top = ", ".join(f"{op} {n}" for op, n in counter.counts.most_common(4))
        print(f"{name:<18} {sum(counter.counts.values()):6,d} operations   ({top})")
        return result

    images = micro_batches[0].to(accelerator.device)
    loss = count("forward and loss",
                 lambda: training_loss(unet, run.noise_scheduler, images, run.objective, run.noise_generator))
    count("backward", lambda: accelerator.backward(loss))
    count("gradient clipping", lambda: accelerator.clip_grad_norm_(unet.parameters(), 1.0))
    count("AdamW", run.optimizer.step)
    count("EMA", lambda: run.ema.step(unet.parameters()))
    run.optimizer.zero_grad(set_to_none=True)
    with CountOps() as counter:
        train.train_step(run, micro_batches)
    print(f"{'whole train_step':<18} {sum(counter.counts.values()):6,d} operations")
    time_adamw(list(unet.parameters()), run.config)


def time_adamw(parameters: list[torch.Tensor], config: TrainConfig, steps: int = 5) -> None:
    """Milliseconds per AdamW step of torch's three implementations, on these parameters and their gradients."""
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter) * 1e-3
    implementations = {"per tensor": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    for name, choice in implementations.items():
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, **parts.adam_settings(config), **choice)
        optimizer.step()  # allocates the state
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        print(f"AdamW, {name:<10} {(time.perf_counter() - start) / steps * 1000:7.1f} ms per step")


if __name__ == "__main__":
    main()
