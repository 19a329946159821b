"""RAM while training from a decoded-image cache: the cache is memory-mapped, so the process's own memory
stays at a few batches however large the dataset is.

    python benchmarks/data_memory.py --images 1000000      # 64 px RGB: 12.3 GB of cache on disk

The cache is written directly (random pixels, 64 x 64 RGB each, the size of a 64 px dataset's
images), not decoded from files: decoding is the cold cost that data_throughput.py measures. Then
the script reads one epoch of batches as training does (data.CachedBatches, 64 images a batch,
random crop and flip) and prints, every tenth of the epoch, the process's anonymous resident memory
(RssAnon: what it allocated itself, which must stay bounded) and its file-backed resident memory
(RssFile: pages of the cache file that the kernel keeps while it has room and drops when memory is
short). The cache is written to a temporary folder on --dir's disk and removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from uncond import data
from uncond.cache import CacheWriter, ImageCache
from uncond.config import TrainConfig


def resident_memory() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024


def write_cache(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 256, (256, size, size, 3), dtype=np.uint8)  # content does not matter here
    writer = CacheWriter(folder, np.uint8)
    for i in range(count):
        writer.append(pool[i % len(pool)])
    writer.finish({"skipped": [], "upscaled": 0, "resolution": size})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the temporary cache")
    args = parser.parse_args()
    gib = 2**30
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        folder = Path(scratch) / "entry"
        started = time.perf_counter()
        write_cache(folder, args.images, args.resolution)
        cache = ImageCache.open(folder)
        print(f"wrote {len(cache):,} images, {cache.nbytes / gib:.1f} GiB, in {time.perf_counter() - started:.0f} s")
        anonymous, file_backed = resident_memory()
        print(f"before training: RssAnon {anonymous / 2**20:,.0f} MiB, RssFile {file_backed / 2**20:,.0f} MiB")
        config = TrainConfig(train_data_dir=".", resolution=args.resolution, random_flip=True, train_batch_size=64,
                             seed=0)
        batches = data.CachedBatches(cache, config, channels=3)
        peak_anonymous, seen, started = anonymous, 0, time.perf_counter()
        report_every = max(1, batches.batches_per_epoch // 10)
        for batch_index, clean_images in batches.epoch(0):
            seen += len(clean_images)
            last = batch_index == batches.batches_per_epoch - 1
            if batch_index % 16 == 0 or batch_index % report_every == 0 or last:
                anonymous, file_backed = resident_memory()
                peak_anonymous = max(peak_anonymous, anonymous)
                if batch_index % report_every == 0 or last:
                    print(f"{seen:>10,} images read: RssAnon {anonymous / 2**20:,.0f} MiB, "
                          f"RssFile {file_backed / 2**20:,.0f} MiB", flush=True)
        elapsed = time.perf_counter() - started
        print(f"one epoch: {seen:,} images in {elapsed:.0f} s ({seen / elapsed:,.0f} images/s); "
              f"peak RssAnon {peak_anonymous / 2**20:,.0f} MiB for a {cache.nbytes / gib:.1f} GiB cache")


if __name__ == "__main__":
    main()
