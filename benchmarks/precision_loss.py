"""Does bf16 autocast change training? The demo trained in fp32 and in bf16, same seed, side by side.

    python benchmarks/precision_loss.py --steps 400 --plot docs/cpu-bf16-loss.png

Runs `uncond train --demo --max_train_steps N --mixed_precision {no,bf16}` one after the other, prints the
wall time and images/s of each (median of the log intervals) and the ratio, the mean loss over the last
quarter of the run, and draws both loss curves in one PNG. On a CPU without native bf16 (AVX512-BF16 or
AMX) the bf16 run is slower, not faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def train(precision: str, steps: int, folder: Path) -> dict:
    output = folder / f"demo-{precision}"
    command = [sys.executable, "-m", "uncond", "train", "--demo", "--max_train_steps", str(steps),
               "--mixed_precision", precision, "--output_dir", str(output), "--save_images_epochs", "1000",
               "--logger", "none", "--overwrite_output_dir"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    tail = records[len(records) * 3 // 4:]
    return {"precision": precision, "seconds": seconds, "records": records,
            "images_per_sec": statistics.median(r["images_per_sec"] for r in records[1:]),
            "late_loss": statistics.mean(r["loss"] for r in tail)}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from uncond.tracking import smooth

    figure, axis = plt.subplots(figsize=(7, 4))
    for run, colour in zip(runs, ("tab:blue", "tab:orange")):
        steps = [r["step"] for r in run["records"]]
        axis.plot(steps, smooth([r["loss"] for r in run["records"]]), color=colour,
                  label=f"{'fp32' if run['precision'] == 'no' else run['precision']}: "
                        f"{run['images_per_sec']:.0f} images/s")
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (smoothed)")
    axis.set_title("the demo in fp32 and with bf16 autocast, same seed")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--plot", type=Path, help="write both loss curves to this PNG")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = [train(precision, args.steps, Path(folder)) for precision in ("no", "bf16")]
    for run in runs:
        print(f"{'fp32' if run['precision'] == 'no' else 'bf16':>5}: {run['seconds']:6.1f} s wall, "
              f"{run['images_per_sec']:7.1f} images/s, mean loss over the last quarter {run['late_loss']:.4f}")
    print(f"bf16 / fp32 images/s: {runs[1]['images_per_sec'] / runs[0]['images_per_sec']:.2f}x")
    if args.plot:
        plot(runs, args.plot)
        print(f"loss curves: {args.plot}")


if __name__ == "__main__":
    main()
