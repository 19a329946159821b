"""How long FID's feature extraction takes here: InceptionV3 images/s through uncond's extractor, and what that
means for `uncond evaluate` (the reference set once, then cached; the generated set every time) and for
--eval_every_steps. The network's cost does not depend on its weights' values, so a random-valued file of the
standard file's shape stands in where the real one cannot be downloaded.

    python benchmarks/inception_features.py [--device cpu] [--images 96] [--batch 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from uncond import metrics


def random_inception_weights(folder: Path) -> Path:
    """A state dict of the FID InceptionV3's shapes with random values (torch-fidelity builds the network)."""
    module = metrics.torch_fidelity_inception()
    with mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, state, strict=True: None):
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = folder / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


def images_per_second(extractor: metrics.FeatureExtractor, images: np.ndarray, batch: int, repeats: int) -> float:
    batches = [images[start:start + batch] for start in range(0, len(images), batch)]
    metrics.extract_features(extractor, batches[:1])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        metrics.extract_features(extractor, batches)
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        extractor = metrics.inception_extractor(str(random_inception_weights(Path(folder))), device)
        print(f"device {device}, {torch.get_num_threads()} threads, batch {args.batch}, best of {args.repeats}")
        for size in (28, 64):  # every image is resized to 299x299 first: the cost hardly depends on the size
            images = rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
            speed = images_per_second(extractor, images, args.batch, args.repeats)
            print(f"{size}x{size} px: {speed:.1f} images/s; 5000 images {5000 / speed / 60:.1f} min, "
                  f"50000 images {50000 / speed / 60:.0f} min")


if __name__ == "__main__":
    main()
