"""What keeping freed memory (uncond.environment.keep_freed_memory) is worth on a CPU: the bare training step
with glibc's default allocator settings against uncond's, in alternating processes.

    python benchmarks/cpu_allocator.py                          # the seed's UNet, 64 px, batch 16, fp32
    python benchmarks/cpu_allocator.py --preset tiny --resolution 28 --batch 64

Each measurement is a fresh process (the allocator setting is process-wide and cannot be undone) that times
the step of benchmarks/bare_step.py (forward, loss, backward, fused AdamW; random inputs) and counts the
minor page faults per step: with glibc's defaults, large activation buffers are unmapped when freed and
faulted in again on the next step. Printed: ms/step and faults/step for each, and the ratio per pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

SETTINGS = ("glibc-default", "keep-freed-memory")


def measure(setting: str, preset: str, resolution: int, batch: int, steps: int) -> dict:
    """In this process: apply `setting`, then time the bare step and count its page faults (after 2 untimed
    steps, which build the weights, the optimizer's state and the allocator's pools)."""
    from bare_step import time_step

    if setting == "keep-freed-memory":
        from uncond.environment import keep_freed_memory

        assert keep_freed_memory(), "not glibc: nothing to compare"
    seconds, faults = time_step(preset, resolution, batch, "cpu", "no", False, None, steps=steps, warmup=2)
    return {"ms_per_step": seconds * 1000, "faults_per_step": faults}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of processes")
    parser.add_argument("--worker", choices=SETTINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.preset, args.resolution, args.batch, args.steps)))
        return

    print(f"{args.preset} UNet, {args.resolution} px, batch {args.batch}, fp32, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps per process, {args.repeats} pairs")
    results: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
    for repeat in range(args.repeats):
        for setting in SETTINGS:
            command = [sys.executable, __file__, "--worker", setting, "--preset", args.preset, "--resolution",
                       str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            results[setting].append(result)
            print(f"  pair {repeat + 1}  {setting:<18} {result['ms_per_step']:8.1f} ms/step "
                  f"{result['faults_per_step']:10.0f} page faults/step", flush=True)
    default = [r["ms_per_step"] for r in results["glibc-default"]]
    kept = [r["ms_per_step"] for r in results["keep-freed-memory"]]
    ratios = [d / k for d, k in zip(default, kept)]
    for setting in SETTINGS:
        times = [r["ms_per_step"] for r in results[setting]]
        faults = [r["faults_per_step"] for r in results[setting]]
        print(f"{setting:<18} median {statistics.median(times):8.1f} ms/step, "
              f"{statistics.median(faults):10.0f} page faults/step")
    print(f"speed-up of keeping freed memory: {statistics.median(ratios):.3f}x "
          f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
