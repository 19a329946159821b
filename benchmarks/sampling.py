"""Sampler speed and quality per step, on a trained demo model; docs/benchmarks.md keeps the figures.

For every sampler and step count: images/s, network evaluations (UNet calls) per image, and the
Fréchet distance (FD) between its samples and the demo digits in the feature space of a small digit
classifier that this script trains on the same digits: FID's method, with a network that needs no
download, so it runs offline. Every sampler starts from the same noise (seed 0), so the rows differ
by the sampler alone. DDPM with 1000 steps is the baseline: the summary names, for each sampler,
the fewest steps whose FD is within --tolerance of DDPM-1000's.

    python benchmarks/sampling.py                         # trains the demo model first (7 min on 2 cores)
    python benchmarks/sampling.py --model uncond-demo     # measures a model `uncond train` made
    python benchmarks/sampling.py --train_steps 400 --num_images 200 --steps 10,20 --samplers ddim,unipc
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from uncond import data, metrics, sampling, sources
from uncond.config import SAMPLER_NAMES


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a pipeline folder to measure (default: train the demo model)")
    parser.add_argument("--train_steps", type=int, default=1600, help="steps of the demo model trained without "
                        "--model (1600: the demo's)")
    parser.add_argument("--work_dir", default="bench-sampling", help="where the demo model is trained and kept")
    parser.add_argument("--samplers", default=",".join(SAMPLER_NAMES), help="comma-separated samplers")
    parser.add_argument("--steps", default="10,20,50,1000", help="comma-separated step counts")
    parser.add_argument("--baseline_steps", type=int, default=1000, help="DDPM steps of the baseline")
    parser.add_argument("--num_images", type=int, default=1000, help="images per sampler and step count")
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tolerance", type=float, default=0.10,
                        help="a sampler matches the baseline when its FD is at most (1 + tolerance) x the baseline's")
    parser.add_argument("--json", help="also write every measurement to this file")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------ model


def demo_model(work_dir: Path, train_steps: int) -> Path:
    """The demo model trained for `train_steps` (reused when already there)."""
    folder = work_dir / f"demo-{train_steps}-steps"
    if (folder / "model_index.json").is_file():
        print(f"model: {folder} (trained earlier)")
        return folder
    command = [sys.executable, "-m", "uncond", "train", "--demo", "--max_train_steps", str(train_steps),
               "--output_dir", str(folder), "--logger", "none", "--overwrite_output_dir"]
    print("training the demo model:", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"trained in {time.perf_counter() - started:.0f} s")
    return folder


# ------------------------------------------------------------------------------------------------ features


def labelled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The demo's 5,000 MNIST digits (uint8, N x 28 x 28) with their labels."""
    with gzip.open(sources.mnist_file(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    return table[:, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8), table[:, -1].astype(np.int64)


class DigitClassifier(nn.Module):
    """Two convolutions and a 128-unit layer whose activations are the features; 10-way output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) digits -> (N, 128)."""
        x = pixels[:, :1].float() / 255
        if x.shape[-2:] != (28, 28):
            x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", antialias=True)
        return self.body(x)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


def train_classifier(digits: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[DigitClassifier, float]:
    """4 epochs of Adam on 4,500 digits; returns the classifier and its accuracy on the other 500."""
    torch.manual_seed(0)
    order = np.random.default_rng(0).permutation(len(digits))
    train, held_out = order[:4500], order[4500:]
    pixels = torch.from_numpy(digits)[:, None].to(device)
    targets = torch.from_numpy(labels).to(device)
    classifier = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    for epoch in range(4):
        for start in range(0, len(train), 128):
            batch = torch.from_numpy(train[start:start + 128]).to(device)
            loss = nn.functional.cross_entropy(classifier(pixels[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    classifier.eval()
    with torch.no_grad():
        held = torch.from_numpy(held_out).to(device)
        accuracy = (classifier(pixels[held]).argmax(1) == targets[held]).float().mean().item()
    return classifier, accuracy


def classifier_extractor(classifier: DigitClassifier, device: torch.device) -> metrics.FeatureExtractor:
    return metrics.FeatureExtractor("demo-digit-classifier-128", classifier.features, device,
                                    "the 128 features of a small digit classifier trained on the demo digits")


# ------------------------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: sampling.Model, name: str, steps: int, args: argparse.Namespace, device: torch.device,
            extractor: metrics.FeatureExtractor, reference: metrics.FeatureStats) -> dict:
    """Generate with one sampler, timed, counting UNet calls; FD (and precision/recall) against the digits."""
    scheduler = sampling.make_sampler(name, model.scheduler_config)
    options = {"num_steps": steps, "seed": 0, "batch_size": args.batch_size, "device": device}
    sampling.generate(model.unet, scheduler, num_images=min(2, args.num_images), **{**options, "num_steps": 2})
    calls = []
    hook = model.unet.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    synchronize(device)
    started = time.perf_counter()
    images = sampling.generate(model.unet, scheduler, num_images=args.num_images, **options)
    synchronize(device)
    seconds = time.perf_counter() - started
    hook.remove()
    features = metrics.extract_features(extractor, [images[i:i + 1000] for i in range(0, len(images), 1000)])
    scores = metrics.compare(features, reference, device)
    return {"sampler": name, "steps": steps, "nfe": sum(calls) / args.num_images, "seconds": seconds,
            "images_per_s": args.num_images / seconds, "fd": scores.fid, "precision": scores.precision,
            "recall": scores.recall}


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    samplers = [name.strip() for name in args.samplers.split(",") if name.strip()]
    for name in samplers:
        sampling.check_sampler(name)
    steps = [int(value) for value in args.steps.split(",") if value.strip()]
    runs = [("ddpm", args.baseline_steps)]
    runs += [(name, count) for name in samplers for count in steps if (name, count) != runs[0]]
    return runs


def report(records: list[dict], real: dict, tolerance: float) -> None:
    baseline = records[0]
    print(f"\n| sampler | steps | UNet calls / image | images/s | FD | FD / DDPM-{baseline['steps']} | "
          f"speed x DDPM-{baseline['steps']} | precision | recall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| real digits ({real['count']}) | | | | {real['fd']:.2f} | {real['fd'] / baseline['fd']:.2f} | | "
          f"{real['precision']:.3f} | {real['recall']:.3f} |")
    for r in records:
        print(f"| {r['sampler']} | {r['steps']} | {r['nfe']:.0f} | {r['images_per_s']:.1f} | {r['fd']:.2f} | "
              f"{r['fd'] / baseline['fd']:.2f} | {r['images_per_s'] / baseline['images_per_s']:.0f} | "
              f"{r['precision']:.3f} | {r['recall']:.3f} |")
    print(f"\nMatching DDPM-{baseline['steps']} (FD within {tolerance:.0%} of its {baseline['fd']:.2f}), fewest steps:")
    for name in dict.fromkeys(r["sampler"] for r in records[1:]):
        matches = sorted((r["steps"], r["nfe"]) for r in records[1:]
                         if r["sampler"] == name and r["fd"] <= (1 + tolerance) * baseline["fd"])
        print(f"  {name}: " + (f"{matches[0][0]} steps ({matches[0][1]:.0f} UNet calls)" if matches
                               else "no step count tried"))


def main() -> None:
    args = parse_args()
    device = sampling.pick_device(args.device)
    runs = plan(args)
    model_path = Path(args.model) if args.model else demo_model(Path(args.work_dir), args.train_steps)
    model = sampling.load_model(str(model_path), device, torch.float32)
    digits, labels = labelled_digits()
    classifier, accuracy = train_classifier(digits, labels, device)
    extractor = classifier_extractor(classifier, device)
    reference = metrics.feature_stats(metrics.extract_features(extractor, [digits[..., None]]), extractor.name)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"torch {torch.__version__}")
    print(f"model: {model.description}; {args.num_images} images per row, batch {args.batch_size}, seed 0")
    print(f"features: {extractor.input_note} (held-out accuracy {accuracy:.3f}); reference: all {len(digits)} digits")
    sample = data.spread_choice(digits, args.num_images)
    real_scores = metrics.compare(metrics.extract_features(extractor, [np.stack(sample)[..., None]]), reference, device)
    real = {"count": len(sample), "fd": real_scores.fid, "precision": real_scores.precision,
            "recall": real_scores.recall}
    records = []
    for name, steps in runs:
        records.append(measure(model, name, steps, args, device, extractor, reference))
        r = records[-1]
        print(f"  {name:>22} {steps:>5} steps: {r['images_per_s']:8.1f} images/s, FD {r['fd']:.2f}", flush=True)
    report(records, real, args.tolerance)
    if args.json:
        Path(args.json).write_text(json.dumps({"real": real, "runs": records, "classifier_accuracy": accuracy,
                                               "model": str(model_path), "device": str(device)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
