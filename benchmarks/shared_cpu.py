"""The demo's training speed on a CPU shared with another busy process, with uncond's thread governor (the
default: fewer threads while other processes keep cores busy, cpu_threads.py) against the same run with its
threads fixed (OMP_NUM_THREADS set to the default count, which turns the governor off), alone and beside a
neighbour, in one run. The neighbour is the demo's bare training step in a loop with OpenMP's defaults
(benchmarks/openmp_neighbour.py), as a second training or an evaluation would be.

    python benchmarks/shared_cpu.py [--steps 150] [--repeats 1]

Each measurement is a whole `uncond train --demo --max_train_steps STEPS` in a fresh folder (the decoded digits
come from the cache after the first); its training images/s is read from its metrics.jsonl (the time of the
steps, previews left out). Printed: each measurement, then the median of each setting and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
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


def train(steps: int, fixed_threads: int | None, work: Path) -> tuple[float, int]:
    """The run's training images/s, and how many times it changed its thread count (its log says each)."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if fixed_threads is not None:
        env["OMP_NUM_THREADS"] = str(fixed_threads)
    folder = Path(tempfile.mkdtemp(dir=work))
    finished = subprocess.run([sys.executable, "-m", "uncond", "train", "--demo", "--max_train_steps", str(steps),
                               "--logging_steps", "10", "--output_dir", str(folder / "run")], env=env, check=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    changes = sum(" threads" in line and "training on " in line for line in finished.stderr.splitlines())
    return images_per_second(folder / "run"), changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps of each demo run")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    settings = {"governor (default)": None, f"OMP_NUM_THREADS={threads} (fixed)": threads}
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="uncond-bench-") as work:
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
                        speed, changes = train(args.steps, fixed, Path(work))
                        results.setdefault((where, name), []).append(speed)
                        print(f"  {where}, {name}: {speed:.1f} images/s, thread count changed {changes} times",
                              flush=True)
            finally:
                if neighbour is not None:
                    neighbour.kill()
                    neighbour.wait()
    print(f"{os.cpu_count()} CPUs, {threads} torch threads by default; demo, {args.steps} steps, median of "
          f"{args.repeats}")
    governor, fixed = settings
    for where in ("alone", "beside a neighbour"):
        ours, theirs = statistics.median(results[where, governor]), statistics.median(results[where, fixed])
        print(f"{where:<19} {governor}: {ours:6.1f} images/s | {fixed}: {theirs:6.1f} images/s | "
              f"{ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
