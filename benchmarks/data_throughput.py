"""Images per second delivered to the training step: train_unconditional.py's data pipeline against uncond's.

    pip install -e ".[bench]"                       # scikit-image, whose photographs the benchmark uses
    python benchmarks/data_throughput.py            # 1,000 photos, 32/64/128 px

Both pipelines end in the same place: a float batch of shape (16, 3, res, res) in [-1, 1], randomly
cropped and flipped, ready for the UNet. Each figure is images delivered over wall-clock time.

The seed's pipeline (a), reproduced without torchvision, which is not installable here:
  dataset = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
  dataset.set_transform(lambda batch: {"input": [augmentations(image.convert("RGB")) ...]})
  DataLoader(dataset, batch_size=16, shuffle=True, num_workers=0)  -- the seed's defaults
  augmentations = Compose([Resize(res, BILINEAR), RandomCrop(res), RandomHorizontalFlip(), ToTensor(),
                           Normalize([0.5], [0.5])])
as torchvision implements them for PIL images: Resize makes the shorter side `res` and the longer
int(res * long / short) and calls PIL's resize with BILINEAR; RandomCrop draws its offsets with
torch.randint(0, h - res + 1) and torch.randint(0, w - res + 1); RandomHorizontalFlip transposes when
torch.rand(1) < 0.5; ToTensor turns HWC uint8 into CHW float / 255; Normalize subtracts 0.5 and divides
by 0.5 on a copy. The same loader with 2 worker processes is shown too (what the seed's users did).

uncond's pipeline (b): `cold` is the first run, which decodes every image once into the cache (threads
over all cores); `warm` is every later epoch and run: data.CachedBatches reading the memory-mapped cache,
cropping, flipping and converting in its background thread.

The photos are real photographs that installed packages ship: scikit-image's skimage/data (astronaut,
chelsea, coffee, rocket, motorcycle_left, motorcycle_right, hubble_deep_field, retina, ihc) and
matplotlib's sample_data/grace_hopper.jpg. The benchmark cuts each of its images from one of them at
random (aspect ratio 3:4 to 16:9, at least half the photo's shorter side) and resizes the cut to a
random shorter side of 300-500 px, about the size of the images in common datasets (flowers-102,
for one), saving them alternately as JPEG (quality 90) and PNG.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from uncond import data, decoding, sources
from uncond.config import TrainConfig

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
BATCH_SIZE = 16  # the seed's --train_batch_size default


def photographs() -> list[Path]:
    try:
        import skimage
    except ImportError:
        raise SystemExit('the benchmark\'s photos come with scikit-image: pip install -e ".[bench]"') from None
    import matplotlib

    folder = Path(skimage.__file__).parent / "data"
    grace_hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return [folder / name for name in SKIMAGE_PHOTOS] + [grace_hopper]


def prepare_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEG and PNG images cut from the photographs (kept when the folder already has them)."""
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(path).convert("RGB") for path in photographs()]
    for i in range(count):
        photo = photos[rng.integers(len(photos))]
        aspect = rng.uniform(3 / 4, 16 / 9)  # width / height
        height = rng.uniform(0.5, 1.0) * min(photo.height, photo.width / aspect)
        width = height * aspect
        left, top = rng.uniform(0, photo.width - width), rng.uniform(0, photo.height - height)
        cut = photo.crop((int(left), int(top), int(left + width), int(top + height)))
        shorter = rng.integers(300, 501)
        scale = shorter / min(cut.size)
        cut = cut.resize((round(cut.width * scale), round(cut.height * scale)), Image.BICUBIC)
        if i % 2:
            cut.save(folder / f"photo_{i:05d}.png")
        else:
            cut.save(folder / f"photo_{i:05d}.jpg", quality=90)
    return folder


# ------------------------------------------------------------------------------------ (a) the seed's pipeline


class SeedAugmentations:
    """Compose([Resize(res, BILINEAR), RandomCrop(res), RandomHorizontalFlip(), ToTensor(),
    Normalize([0.5], [0.5])]) on a PIL image, as torchvision implements each."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.resolution
        image = image.resize(decoding.resized_size(*image.size, size), Image.BILINEAR)  # torchvision's size rule
        top = int(torch.randint(0, image.height - size + 1, size=(1,)))
        left = int(torch.randint(0, image.width - size + 1, size=(1,)))
        image = image.crop((left, top, left + size, top + size))
        if torch.rand(1) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).view(size, size, 3)
        tensor = tensor.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        mean, std = torch.as_tensor([0.5]).view(-1, 1, 1), torch.as_tensor([0.5]).view(-1, 1, 1)
        return tensor.clone().sub_(mean).div_(std)


def seed_images_per_second(folder: Path, resolution: int, workers: int, cache_dir: str) -> float:
    import datasets

    dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir, split="train")
    augmentations = SeedAugmentations(resolution)
    dataset.set_transform(lambda examples: {"input": [augmentations(image.convert("RGB"))
                                                      for image in examples["image"]]})
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers)
    started, seen = time.perf_counter(), 0
    for batch in loader:  # one epoch, as the seed's loop sees it (worker start-up included)
        seen += len(batch["input"])
    return seen / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------ (b) uncond's pipeline


def ours_images_per_second(folder: Path, resolution: int, cache_dir: str, min_seconds: float,
                           device: torch.device) -> tuple[float, float]:
    """(cold: decoding into the cache, warm: batches from it, repeated for at least `min_seconds`)."""
    config = TrainConfig(train_data_dir=str(folder), resolution=resolution, random_flip=True,
                         train_batch_size=BATCH_SIZE, cache_dir=cache_dir, seed=0)
    source = sources.open_source(config)
    started = time.perf_counter()
    cache = data.load_images(source, config, progress=False)
    cold = len(cache) / (time.perf_counter() - started)
    batches = data.CachedBatches(cache, config, channels=3, pin_memory=device.type == "cuda")
    started, seen, epoch = time.perf_counter(), 0, 0
    while time.perf_counter() - started < min_seconds:
        for _, clean_images in batches.epoch(epoch):
            seen += len(clean_images.to(device, non_blocking=True))  # what train_step does with them
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cold, seen / (time.perf_counter() - started)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cores} cores of {cpu}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f} at start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="photos in the benchmark's folder")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--folder", type=Path, default=None, help="keep the photos here (default: a temporary folder)")
    parser.add_argument("--seconds", type=float, default=3.0, help="least time spent measuring each warm figure")
    parser.add_argument("--seed_workers", type=int, default=2, help="also run the seed's loader with this many "
                                                                   "worker processes (0: skip)")
    parser.add_argument("--device", default="cpu", help="where ours delivers the batches (cuda: pinned memory)")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as scratch:
        folder = prepare_folder(args.folder or Path(scratch) / "photos", args.images)
        print(f"machine: {machine()}")
        print(f"folder: {args.images} photos (JPEG and PNG, shorter side 300-500 px) in {folder}; batch {BATCH_SIZE}; "
              f"ours delivers to {device}")
        header = ["res", "seed (0 workers)"] + ([f"seed ({args.seed_workers} workers)"] if args.seed_workers else [])
        header += ["ours cold (decode once)", "ours warm", "warm / seed"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for resolution in args.resolutions:
            cache_dir = tempfile.mkdtemp(dir=scratch)  # every resolution starts with an empty cache
            seed = seed_images_per_second(folder, resolution, 0, cache_dir)
            row = [f"{resolution}", f"{seed:,.0f}"]
            if args.seed_workers:
                row.append(f"{seed_images_per_second(folder, resolution, args.seed_workers, cache_dir):,.0f}")
            cold, warm = ours_images_per_second(folder, resolution, cache_dir, args.seconds, device)
            row += [f"{cold:,.0f}", f"{warm:,.0f}", f"{warm / seed:,.0f}x"]
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
