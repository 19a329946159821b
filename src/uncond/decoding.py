"""One image (a Record of a source) to the array training reads: turned upright (EXIF), converted to grayscale
or RGB, and resized so its shorter side is the training resolution, as train_unconditional.py's
`Resize(resolution, BILINEAR)` does it; many at once in threads. A bad file is skipped with its reason."""

from __future__ import annotations

import errno
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from .config import RunFailed
from .sources import Record


GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
Decoded = tuple[np.ndarray, bool, bool]  # (HWC array, is_gray, was_upscaled)
DRAFT_GAP = 2  # a JPEG is decoded at a DCT scale keeping both sides at least this many times the resolution


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes `resolution`, the longer keeps the aspect ratio."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite a transparent image over white: transparent pixels carry arbitrary colour otherwise."""
    gray = image.mode in ("LA", "La")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(background, rgba).convert("RGB")
    return flat.convert("L") if gray else flat


def flatten_colour_key(image: Image.Image) -> Image.Image:
    """An image whose colour `info["transparency"]` (palette entries, for "P") is transparent, as an alpha channel
    would say: with an alpha channel, which flatten_alpha makes white; 16-bit gray made white directly, keeping its
    16 bits (Pillow's LA would clip it to 8)."""
    key = image.info["transparency"]
    if image.mode in ("RGB", "P", "L", "1"):
        return image.convert("RGBA" if image.mode in ("RGB", "P") else "LA")
    if image.mode in SIXTEEN_BIT_MODES - {"I"} and isinstance(key, int):
        values = np.array(image)
        values[values == key] = np.iinfo(values.dtype).max
        return Image.fromarray(values)
    return image


def decode_image(image: Image.Image, resolution: int, preserve_precision: bool) -> Decoded:
    """One opened image -> (HWC array, is_gray, was_upscaled). Gray images have one channel, others three."""
    image = ImageOps.exif_transpose(image)
    if "transparency" in image.info:  # a palette's transparent entries, or a PNG's colour key (tRNS)
        image = flatten_colour_key(image)
    if image.mode == "P":
        image = image.convert("RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        image = flatten_alpha(image)
    gray = image.mode in GRAY_MODES
    width, height = image.size
    size = resized_size(width, height, resolution)
    upscaled = min(width, height) < resolution
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "F":
        return resize_high_precision(image, size, preserve_precision), True, upscaled
    if not gray and image.mode != "RGB":
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV
    if image.mode == "1":
        image = image.convert("L")
    array = np.asarray(image.resize(size, Image.BILINEAR))
    if not gray and array.shape[-1] == 3 and palette_is_gray(array):
        array, gray = array[..., :1], True
    array = array[..., None] if array.ndim == 2 else array
    if preserve_precision:
        array = array.astype(np.uint16) * 257
    return np.ascontiguousarray(array), gray, upscaled


def palette_is_gray(array: np.ndarray) -> bool:
    """RGB pixels that are all gray (a converted grayscale palette image)."""
    return bool((array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all())


def resize_high_precision(image: Image.Image, size: tuple[int, int], preserve_precision: bool) -> np.ndarray:
    """16-bit (and float) grayscale, resized in float so no precision is lost on the way.

    train_unconditional.py converts these with .convert("RGB"), which clips every value above 255 to white.
    (Pillow reads 16-bit *colour* PNG and TIFF files at 8 bits per channel; those arrive here as RGB.)
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":  # floats in [0, 1], [0, 255] or already 16-bit [0, 65535]
        high = values.max()
        values = values * 65535.0 if high <= 1.0 else values * 257.0 if high <= 255.0 else values
    resized = np.asarray(Image.fromarray(values.clip(0, 65535), mode="F").resize(size, Image.BILINEAR))
    if preserve_precision:
        return resized.round().clip(0, 65535).astype(np.uint16)[..., None]
    return (resized / 257.0).round().clip(0, 255).astype(np.uint8)[..., None]


# Errors of the storage or the machine, not of the file: skipping the image (and caching the skip) would lose
# it for good, and machines decoding their own copies would end up with different images.
MACHINE_ERRNOS = {errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.ENOMEM, errno.EMFILE, errno.ENFILE}


def decode_record(record: Record, resolution: int, preserve_precision: bool, draft: bool = True) -> Decoded | str:
    """Decode one record, or say in a few words why it cannot be: a bad file is skipped, never fatal. A failing
    disk or network share, or a machine out of memory or file handles, stops the run instead."""
    try:
        with record.open() as image:
            width, height = image.size  # read from the header; nothing is decoded yet
            if width * height > Image.MAX_IMAGE_PIXELS:  # Pillow only warns up to twice its limit
                raise Image.DecompressionBombError(f"{width}x{height} = {width * height:,} pixels, over its limit "
                                                   f"of {Image.MAX_IMAGE_PIXELS:,}")
            # `draft`: a JPEG is decoded at the smallest of its DCT scales (1/2 to 1/8) that keeps both sides at
            # least twice the resolution, as Pillow's thumbnail() does (reducing_gap 2), and then resized as any
            # other: 1.6 to 2.9 times faster for photos of 0.3 to 12 megapixels at 64 px, within 5 grey levels of
            # decoding them whole, 0.3 on average (benchmarks/jpeg_draft.py). A no-op for other formats. `uncond
            # evaluate` decodes whole, as FID's references are (it is sensitive to how images are resized).
            if draft:
                image.draft(None, (DRAFT_GAP * resolution, DRAFT_GAP * resolution))
            return decode_image(image, resolution, preserve_precision)
    except Image.DecompressionBombError as error:
        return (f"too large for Pillow's decompression-bomb guard ({str(error).rstrip('.')}); shrink it, or raise "
                "PIL.Image.MAX_IMAGE_PIXELS if you trust the file")
    except MemoryError:
        raise RunFailed(f"out of memory decoding {record.name}; nothing was cached, re-run with more memory "
                        "free") from None
    except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and reported
        if isinstance(error, OSError) and error.errno in MACHINE_ERRNOS:
            raise RunFailed(f"reading {record.name} failed ({os.strerror(error.errno)}): a fault of the storage or "
                            "the machine, not of the image; nothing was cached, re-run once it is fixed") from None
        return f"{type(error).__name__}: {error}".strip()


def decode_records(records: Iterable[Record], resolution: int, preserve_precision: bool, workers: int = 0,
                   draft: bool = True) -> Iterator[tuple[Record, Decoded | str]]:
    """Decode records in parallel threads (Pillow releases the GIL while it decodes and resizes), in
    order, with a bounded number in flight so memory stays bounded however many records there are. `draft`: as
    for decode_record."""
    # decode_record refuses images over the limit with a clearer message than this warning's.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    workers = workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    in_flight: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for record in records:
            in_flight.append((record, pool.submit(decode_record, record, resolution, preserve_precision, draft)))
            if len(in_flight) >= 4 * workers:
                record, future = in_flight.popleft()
                yield record, future.result()
        while in_flight:
            record, future = in_flight.popleft()
            yield record, future.result()
