"""The demo's training (or sampling) speed on a CPU shared with another busy process, with uncond's thread
governor (the default: fewer threads while other processes keep cores busy, cpu_threads.py) against the same
command with its threads fixed (OMP_NUM_THREADS set to the default count, which turns the governor off), alone
and beside a neighbour, in one run. The neighbour is the demo's bare training step in a loop with OpenMP's
defaults (benchmarks/openmp_neighbour.py), as a second training or an evaluation would be.

    python benchmarks/shared_cpu.py [--steps 150] [--repeats 1]
    python benchmarks/shared_cpu.py --work sample [--images 64] [--repeats 1]

Training: each measurement is a whole `uncond train --demo --max_train_steps STEPS` in a fresh folder (the
decoded digits come from the cache after the first); its training images/s is read from its metrics.jsonl (the
time of the steps, previews left out). Sampling: a demo model trained for a few steps first, then each
measurement is `uncond sample` of IMAGES images (its default sampler and steps) into a fresh folder, its
images/s read from the line it ends with (the time of the sampling, loading left out). Printed: each
measurement, then the median of each setting and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent


def images_per_second(folder: Path) -> float:
    """Images over seconds of training, summed over the run's log intervals."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    records = [record for record in records if "images_per_sec" in record]
    seen, seconds, last = 0, 0.0, 0
    for record in records:
        images = record["images_seen"] - last
        seen, seconds, last = seen + images, seconds + images / record["images_per_sec"], record["images_seen"]
    return seen / seconds


def uncond(args: list[str], fixed_threads: int | None) -> str:
    """`uncond ARGS` run to its end; its log."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if fixed_threads is not None:
        env["OMP_NUM_THREADS"] = str(fixed_threads)
    return subprocess.run([sys.executable, "-m", "uncond", *args], env=env, check=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True).stderr


def thread_changes(log: str, doing: str) -> int:
    """How many times the command changed its thread count (its log says each)."""
    return sum(" threads" in line and f"{doing} on " in line for line in log.splitlines())


def train(steps: int, fixed_threads: int | None, work: Path) -> tuple[float, int]:
    """The run's training images/s, and how many times it changed its thread count."""
    folder = Path(tempfile.mkdtemp(dir=work))
    log = uncond(["train", "--demo", "--max_train_steps", str(steps), "--logging_steps", "10", "--output_dir",
                  str(folder / "run")], fixed_threads)
    return images_per_second(folder / "run"), thread_changes(log, "training")


def sample(model: Path, images: int, fixed_threads: int | None, work: Path) -> tuple[float, int]:
    """`uncond sample`'s images/s, and how many times it changed its thread count."""
    folder = Path(tempfile.mkdtemp(dir=work))
    log = uncond(["sample", str(model), "--num_images", str(images), "--device", "cpu", "--output_dir",
                  str(folder / "images")], fixed_threads)
    return float(re.search(r"\(([\d.]+) images/s", log).group(1)), thread_changes(log, "sampling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", choices=("train", "sample"), default="train")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of each demo run")
    parser.add_argument("--images", type=int, default=64, help="images of each `uncond sample`")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    settings = {"governor (default)": None, f"OMP_NUM_THREADS={threads} (fixed)": threads}
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="uncond-bench-") as work:
        model = Path(work) / "model"
        if args.work == "sample":  # what is sampled from: the demo's model, a few steps in
            uncond(["train", "--demo", "--max_train_steps", "20", "--output_dir", str(model)], None)
        for where in ("alone", "beside a neighbour"):
            neighbour = None
            if where != "alone":  # a separate program, as another user's job is: not a child of the run
                neighbour = subprocess.Popen([sys.executable, str(HERE / "openmp_neighbour.py"), "--neighbour",
                                              "3600"], env={k: v for k, v in os.environ.items()
                                                            if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT")})
                time.sleep(5)
            try:
                for _ in range(args.repeats):
                    for name, fixed in settings.items():
                        speed, changes = train(args.steps, fixed, Path(work)) if args.work == "train" else \
                            sample(model, args.images, fixed, Path(work))
                        results.setdefault((where, name), []).append(speed)
                        print(f"  {where}, {name}: {speed:.1f} images/s, thread count changed {changes} times",
                              flush=True)
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    what = f"training, {args.steps} steps" if args.work == "train" else f"sampling {args.images} images"
    print(f"{os.cpu_count()} CPUs, {threads} torch threads by default; demo, {what}, median of {args.repeats}")
    governor, fixed = settings
    for where in ("alone", "beside a neighbour"):
        ours, theirs = statistics.median(results[where, governor]), statistics.median(results[where, fixed])
        print(f"{where:<19} {governor}: {ours:6.1f} images/s | {fixed}: {theirs:6.1f} images/s | "
              f"{ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
