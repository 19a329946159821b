"""What a shorter OpenMP spin (GOMP_SPINCOUNT=10000, against GNU OpenMP's 300,000) is worth on a CPU: the training
step of the demo preset, alone and beside a neighbour process training the same way with OpenMP's defaults (a
second run, an evaluation), in one run. PyTorch's CPU wheels use GNU OpenMP, whose idle threads spin after each
parallel region before they sleep; beside another such process, the spinning threads of each take the cores the
other's working threads need. uncond sets nothing (docs/benchmarks.md: the shorter spin cost a step alone more
than it saved beside a neighbour, here); this measures the trade on another machine.

    python benchmarks/openmp_neighbour.py [--steps 6] [--repeats 3]

Each measurement is its own process (OpenMP reads the setting when torch loads), the settings in turn; the
neighbour runs through every "beside" measurement. Printed: the median step time of each, and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"OpenMP default (300,000 spins)": None, "10,000 spins": "10000"}


def train_steps(steps: int, seconds: float | None) -> None:
    """The demo preset's step (forward, backward, AdamW) at batch 64: `steps` timed ones printed in ms, or
    (the neighbour) steps for `seconds`."""
    import torch
    from diffusers import UNet2DModel

    from uncond.models import PRESETS

    torch.manual_seed(0)
    unet = UNet2DModel(**PRESETS["tiny"].unet, sample_size=28, in_channels=1, out_channels=1)
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
    images = torch.randn(64, 1, 28, 28)

    def step() -> None:
        timesteps = torch.randint(0, 1000, (64,))
        unet(images, timesteps).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    if seconds is not None:
        end = time.time() + seconds
        while time.time() < end:
            step()
        return
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print("MS " + " ".join(f"{t * 1e3:.1f}" for t in times))


def openmp_defaults() -> dict[str, str]:
    """This environment without an OpenMP waiting setting of its own."""
    return {key: value for key, value in os.environ.items() if key not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}


def measure(spin_count: str | None, steps: int) -> float:
    env = openmp_defaults()
    if spin_count is not None:
        env["GOMP_SPINCOUNT"] = spin_count
    finished = subprocess.run([sys.executable, __file__, "--worker", str(steps)], env=env, capture_output=True,
                              text=True, check=True)
    times = [float(t) for line in finished.stdout.splitlines() if line.startswith("MS ") for t in line.split()[1:]]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--neighbour", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None or args.neighbour is not None:
        train_steps(args.worker or 0, args.neighbour)
        return

    results: dict[tuple[str, str], list[float]] = {}
    for where in ("alone", "beside a neighbour"):
        neighbour = None
        if where != "alone":  # OpenMP's defaults, as another program has them
            neighbour = subprocess.Popen([sys.executable, __file__, "--neighbour", "3600"], env=openmp_defaults())
            time.sleep(5)
        try:
            for _ in range(args.repeats):
                for name, spin_count in SETTINGS.items():
                    results.setdefault((where, name), []).append(measure(spin_count, args.steps))
                    print(f"  {where}, {name}: {results[where, name][-1]:.0f} ms a step", flush=True)
        finally:
            if neighbour is not None:
                neighbour.kill()
                neighbour.wait()
    print(f"{os.cpu_count()} CPUs, torch threads: the default; median of {args.repeats} measurements of "
          f"{args.steps} steps (demo preset, batch 64)")
    medians = {key: statistics.median(values) for key, values in results.items()}
    default, ours = SETTINGS
    for where in ("alone", "beside a neighbour"):
        print(f"{where:<19} {default}: {medians[where, default]:7.0f} ms | {ours}: {medians[where, ours]:7.0f} ms "
              f"| 10,000 spins {medians[where, default] / medians[where, ours]:.2f}x as fast")


if __name__ == "__main__":
    main()
