"""Decoding JPEGs at a reduced DCT scale (decoding.decode_record's Image.draft) against decoding them whole.

Times one image at a time on one thread (the cache's pool runs several such decodes at once), the two ways in
turn for each image, and compares their pixels. The photos are synthetic (smooth colour fields, edges and sensor-
like noise, saved at JPEG quality 90), since the machines measured have no photographs to spare; a JPEG's decode
time depends on its size and entropy more than on what it shows.

    python benchmarks/jpeg_draft.py                          # 12, 2 and 0.3 megapixel photos, 64 and 256 px
    python benchmarks/jpeg_draft.py --images 4 --resolutions 64
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image, JpegImagePlugin

from uncond import decoding
from uncond.sources import Record

SIZES = {"12 MP (4000x3000)": (4000, 3000), "2 MP (1920x1080)": (1920, 1080), "0.3 MP (640x480)": (640, 480)}


def photo_like(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = max(width, height) / 10
    channels = [128 + 90 * np.sin(x / scale + rng.uniform(0, 6)) * np.cos(y / (0.7 * scale) - rng.uniform(0, 6))
                for _ in range(3)]
    image = np.stack(channels, -1)
    image[(x // (scale / 2) + y // (scale / 3)) % 7 == 0] *= 0.6  # hard edges
    image += rng.normal(0, 8, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode(data: bytes, resolution: int, whole: bool) -> tuple[float, np.ndarray]:
    original = JpegImagePlugin.JpegImageFile.draft
    if whole:
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None  # as before the change
    try:
        started = time.perf_counter()
        result = decoding.decode_record(Record("photo.jpg", lambda: Image.open(io.BytesIO(data))), resolution, False)
        seconds = time.perf_counter() - started
    finally:
        JpegImagePlugin.JpegImageFile.draft = original
    assert not isinstance(result, str), result
    return seconds, result[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6, help="photos of each size, each decoded both ways")
    parser.add_argument("--resolutions", default="64,256")
    args = parser.parse_args()
    print(f"{args.images} photos of each size, one thread, both ways in turn; ms per image (median)")
    print("| photo | resolution | whole | drafted | speed-up (per photo: min, max) "
          "| pixels: largest, mean difference |")
    print("|---|---|---|---|---|---|")
    for name, (width, height) in SIZES.items():
        photos = [photo_like(width, height, seed) for seed in range(args.images)]
        for resolution in map(int, args.resolutions.split(",")):
            decode(photos[0], resolution, whole=True)  # warm-up: libjpeg, the allocator
            times, ratios, largest, means = {True: [], False: []}, [], 0, []
            for index, photo in enumerate(photos):
                order = (True, False) if index % 2 == 0 else (False, True)
                results = {whole: decode(photo, resolution, whole) for whole in order}
                for whole, (seconds, _) in results.items():
                    times[whole].append(seconds)
                ratios.append(results[True][0] / results[False][0])
                difference = np.abs(results[True][1].astype(int) - results[False][1].astype(int))
                largest, means = max(largest, int(difference.max())), means + [float(difference.mean())]
            whole_ms, drafted_ms = (statistics.median(times[whole]) * 1000 for whole in (True, False))
            print(f"| {name} | {resolution} px | {whole_ms:.1f} | {drafted_ms:.1f} | {whole_ms / drafted_ms:.2f}x "
                  f"({min(ratios):.2f}, {max(ratios):.2f}) | {largest}, {statistics.mean(means):.2f} |")


if __name__ == "__main__":
    main()
