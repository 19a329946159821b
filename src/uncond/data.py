"""Training images: from a source (sources.py: Hub, saved dataset, folder, built-in demo set) to batches.

Every image is decoded once (decoding.py), and the pixels go to an on-disk cache (cache.py) that later
epochs and later runs read memory-mapped, without decoding. Crops and flips are drawn per batch
from a generator seeded by (seed, epoch, batch, process), so the data order and the augmentation
are a pure function of the position in training: resuming needs no replay. `--streaming` sources
(streaming.py) are decoded on the fly instead, and share decoding.py and the augmentation here.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import queue
import shutil
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from .cache import (META_FILE, CacheWriter, EarlierImages, ImageCache, cache_root, decoding_alone, entry_folder,
                    mark_used, remove_entry)
from .config import RunFailed, RunStopped, TrainConfig, UsageError, counted, nearest_existing, size_text
from .decoding import GRAY_MODES, decode_records, resized_size
from .progress import progress_bar
from .sources import Source

logger = logging.getLogger("uncond")

REPORT_FILE = "data_report.json"
UPSCALED_NAMED = 100  # upscaled images named in data_report.json

# ---------------------------------------------------------------------------------------------- the cache


def load_images(source: Source, config: TrainConfig, progress: bool = True) -> ImageCache:
    """The decoded images of `source`: read from the cache, or decoded into it on the first run."""
    folder, settings = cache_entry(source, config)
    cache = ImageCache.open(folder)
    if cache is not None:
        return cache
    waiting = functools.partial(logger.info, f"another run is decoding these images into {folder}; waiting for it")
    with decoding_alone(folder, waiting):
        cache = ImageCache.open(folder)  # made by the run waited for
        if cache is not None:
            return cache
        earlier = EarlierImages(folder.parent, settings, source.folder)
        if warning := new_entry_outlook(source, config, folder, earlier).warning:
            logger.warning(warning)
        return build_cache(source, folder, config, earlier, progress)


def cache_entry(source: Source, config: TrainConfig) -> tuple[Path, dict[str, Any]]:
    """The folder of the entry holding `source`'s images decoded with `config`'s settings, and those settings."""
    settings = {"resolution": config.resolution, "preserve_input_precision": config.preserve_input_precision}
    return entry_folder(cache_root(config.cache_dir), source.fingerprint, settings), settings


LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # colour to gray as PIL's convert("L") weighs it (ITU-R 601)
SIZE_SAMPLE = 32  # images whose sizes (read from their headers) estimate the size of a new entry
INDEX_BYTES = 32  # an image's row in an entry's index (offset, height, width, channels as int64)


@dataclass
class CacheOutlook:
    """What a run will do with the decoded-image cache, as --dry_run says it, and what it will train on."""
    line: str
    warning: str | None  # a new entry that will not fit on its disk: said before the decoding, not when it is full
    # The images the run will train on: an earlier decode's count, else the files less those that earlier decodes
    # of them left out (the files that cannot be decoded are found only by decoding them)
    images: int
    all_gray: bool | None = None  # known from an earlier decode of them all


def cache_outlook(source: Source, config: TrainConfig) -> CacheOutlook:
    folder, settings = cache_entry(source, config)
    if (entry := ImageCache.open(folder, use=False)) is not None:
        skipped = entry.meta["skipped"]
        left_out = f"; {len(skipped)} skipped when decoded ({first_reasons(skipped)})" if skipped else ""
        return CacheOutlook(f"cache: the images are read from {folder} ({counted(len(entry), 'image')}, "
                            f"{size_text(entry.nbytes)}{left_out}), no decoding", None, len(entry), entry.all_gray)
    return new_entry_outlook(source, config, folder, EarlierImages(folder.parent, settings, source.folder))


def new_entry_outlook(source: Source, config: TrainConfig, folder: Path, earlier: EarlierImages) -> CacheOutlook:
    """cache_outlook's for the new entry `folder`, made with what `earlier` entries hold."""
    keys = source.file_keys or [None] * len(source.records)
    new = [record for record, key in zip(source.records, keys) if key not in earlier]
    copied = [key for key in keys if key in earlier]
    left_out = sum(1 for key in copied if earlier.left_out(key))
    images = len(source.records) - left_out
    itemsize = 2 if config.preserve_input_precision else 1
    sample = spread_choice(new, SIZE_SAMPLE)
    each = [decoded_bytes(record, config.resolution) * itemsize for record in sample]
    need = (int(sum(each) / max(1, len(each)) * len(new)) + sum(earlier.nbytes(key) for key in copied)
            + INDEX_BYTES * len(source.records))
    copies = (f", {len(copied)} copied from earlier entries" + (f" ({left_out} of them files that cannot be decoded)"
                                                                if left_out else "")) if copied else ""
    unopened = [record.name for record, size in zip(sample, each) if size == 0]
    if unopened:  # said before the run: its schedule counts them, as the files it finds
        named = ", ".join(unopened[:3]) + (", ..." if len(unopened) > 3 else "")
        unopened_note = f"; {len(unopened)} of those {len(sample)} cannot be opened ({named}) and would be left out"
    else:
        unopened_note = ""
    judged = f" (judged from {counted(len(sample), 'image')}{unopened_note})" if sample else ""
    line = (f"cache: {counted(len(new), 'image')} to decode into {folder.parent}{copies}; about {size_text(need)}"
            f"{judged}")
    root = nearest_existing(folder.parent)
    free = shutil.disk_usage(root).free
    if need <= free:
        return CacheOutlook(line, None, images)
    warning = (f"the decoded-image cache needs about {size_text(need)} for these {counted(len(new), 'image')} at "
               f"{config.resolution} px, more than the {size_text(free)} free on the disk of {root}: the decoding "
               "would stop when it is full; free some space there, or give --cache_dir a disk with room")
    return CacheOutlook(line, warning, images)


def decoded_bytes(record: Any, resolution: int) -> int:
    """The values an image takes in the cache, from its header: the shorter side resized to `resolution`, one
    channel if gray, else three (decoding.decode_image). 0 for a file that cannot be opened (it is skipped)."""
    try:
        with warnings.catch_warnings():  # Pillow's warning of a huge image: the decoding says why it is left out
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with record.open() as image:
                width, height = image.size
                channels = 1 if image.mode in GRAY_MODES else 3
    except Exception:  # noqa: BLE001 - any unreadable file: it is skipped when decoded
        return 0
    new_width, new_height = resized_size(width, height, resolution)
    return new_width * new_height * channels


def build_cache(source: Source, folder: Path, config: TrainConfig, earlier: EarlierImages,
                progress: bool) -> ImageCache:
    started = time.perf_counter()
    writer = CacheWriter(folder, np.uint16 if config.preserve_input_precision else np.uint8)
    keys = source.file_keys or [None] * len(source.records)
    skipped, upscaled, files, reused = [], [], [], 0
    try:
        results = decoded_or_earlier(source.records, keys, earlier, config)
        for record, key, result in progress_bar(results, total=len(source.records), desc="decoding images (once)",
                                                unit="img", disable=not progress, leave=False, dynamic_ncols=True):
            reused += key in earlier
            if isinstance(result, str):
                skipped.append((record.name, result))
                files.append((key, None, result))
                continue
            files.append((key, len(writer), result[2]))
            writer.append(result[0])
            if result[2]:
                upscaled.append(record.name)
        if not len(writer):
            raise UsageError(f"none of the {len(source.records)} images in {source.description} could be read "
                             f"({first_reasons(skipped)})")
    except BaseException as error:
        done = len(writer) + len(skipped)
        written = writer.offset * writer.dtype.itemsize
        stopped = isinstance(error, (KeyboardInterrupt, RunStopped))  # Ctrl-C, or SIGTERM (cli.sigterm_stops)
        kept = stopped and keep_interrupted_decode(writer, source, earlier, files, {
            **entry_meta(source, config, started, skipped, upscaled, reused),
            "source": f"{source.description}; decoding stopped after {done} of them"})
        if not kept:
            writer.abort()
        if stopped:  # said where the bar was, before cli's "interrupted"
            print(f"decoding stopped after {done} of {len(source.records)} images; "
                  + ("those are kept: the next run decodes only the others" if kept else
                     "they are not kept: the next run decodes them all again"), file=sys.stderr)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:  # the cache's disk, not the output's
            needed = (f" (about {size_text(written * len(source.records) // len(writer))} for these "
                      f"{len(source.records)} images)" if len(writer) else "")
            raise RunFailed(f"no space left on the device for the decoded-image cache in {folder.parent}{needed}; "
                            "free some space there, or give --cache_dir a disk with room") from None
        raise
    cache = writer.finish(entry_meta(source, config, started, skipped, upscaled, reused),
                          {"folder": source.folder, "files": files} if source.file_keys else None)
    for replaced in earlier.replaced():  # the folder's contents as they were: this entry replaces them
        if replaced != cache.folder and replaced.exists():
            remove_entry(replaced)
            cache.replaced.append(replaced)
    for copied_from in earlier.copied_from - set(cache.replaced):  # an entry copied from is one used
        if copied_from.exists():
            mark_used(copied_from / META_FILE)
    return cache


def entry_meta(source: Source, config: TrainConfig, started: float, skipped: list, upscaled: list,
               reused: int) -> dict[str, Any]:
    """A new entry's meta.json, less what CacheWriter adds."""
    return {"source": source.description, "resolution": config.resolution,
            "preserve_input_precision": config.preserve_input_precision, "upscaled": len(upscaled),
            "upscaled_examples": upscaled[:UPSCALED_NAMED], "skipped": skipped, "reused": reused,
            "decode_seconds": round(time.perf_counter() - started, 1)}


def keep_interrupted_decode(writer: CacheWriter, source: Source, earlier: EarlierImages, files: list,
                            meta: dict[str, Any]) -> bool:
    """A folder's decode stopped by a signal keeps the images it has, as an entry of part of the folder: the next
    run copies them (EarlierImages) and decodes only the others, so a job preempted during a long decode (hours,
    for a million photos) gets through it in turns. The earlier such entries of the folder that this one holds
    all of are removed. Returns whether it kept any (a dataset's entries are whole or nothing)."""
    rows = len(writer)
    if not source.file_keys or not rows:
        return False
    files = [file for file in files if file[1] is None or file[1] < rows]  # not an image the signal cut short
    try:
        writer.keep_interrupted(meta, {"folder": source.folder, "files": files})
    except OSError:  # a full disk, say: kept nothing
        return False
    keys = {key for key, _, _ in files}
    for part, part_keys in earlier.parts.items():
        if part_keys <= keys and part.exists():
            remove_entry(part)
    return True


def decoded_or_earlier(records: Sequence[Any], keys: Sequence[str | None], earlier: EarlierImages,
                       config: TrainConfig) -> Iterator[tuple[Any, str | None, Any]]:
    """(record, its file's key, decoding.decode_record's result) in order: copied from an earlier entry where one
    holds the file as it is now, else decoded (in parallel, ahead)."""
    new = [record for record, key in zip(records, keys) if key not in earlier]
    decoded = decode_records(new, config.resolution, config.preserve_input_precision, config.dataloader_num_workers)
    for record, key in zip(records, keys):
        yield record, key, earlier.result(key) if key in earlier else next(decoded)[1]


def first_reasons(skipped: Sequence[Sequence[str]], count: int = 3) -> str:
    reasons = "; ".join(f"{name}: {reason}" for name, reason in skipped[:count])
    return reasons + ("; ..." if len(skipped) > count else "")


def summary(cache: ImageCache, source: Source) -> str:
    """The one line a run prints about its data."""
    how = "decoded into" if cache.built_now else "read from"
    reused = cache.meta.get("reused", 0) if cache.built_now else 0
    line = (f"data: {counted(len(cache), 'image')} from {source.description}, {how} the cache {cache.folder} "
            f"({size_text(cache.nbytes)}{', 16-bit' if cache.pixels.dtype == np.uint16 else ''})")
    if reused:
        line += (f": {counted(len(source.records) - reused, 'new or changed file')} decoded, the other {reused} copied "
                 "from earlier entries")
    if cache.replaced:
        line += f"; the folder's earlier entry removed ({', '.join(path.name for path in cache.replaced)})"
    skipped = cache.meta["skipped"]
    if skipped:
        line += f"; {len(skipped)} skipped ({first_reasons(skipped)}; all in {REPORT_FILE})"
    if cache.meta["upscaled"]:
        upscaled = cache.meta["upscaled"]
        line += (f"; {counted(upscaled, 'image')} smaller than {cache.meta['resolution']} px "
                 f"{'was' if upscaled == 1 else 'were'} upscaled")
    return line + passed_over(source)


def passed_over(source: Source) -> str:
    """The files a folder holds that are not images by their extension, for the data line and --dry_run's."""
    if not source.ignored:
        return ""
    return "; not images by their extension, passed over: " + ", ".join(
        f"{count} {extension}" for extension, count in source.ignored.most_common(5))


def write_report(path: Path, used: int, skipped: Sequence[Sequence[str]], upscaled: int,
                 upscaled_examples: Sequence[str] = (), **details: Any) -> None:
    """data_report.json: how many images were used, every skipped one with its reason, and which were upscaled
    (the first UPSCALED_NAMED: a set of thumbnails would otherwise list every image)."""
    report = {"used": used, "skipped": [{"name": name, "reason": reason} for name, reason in skipped],
              "upscaled": upscaled, "upscaled_images": list(upscaled_examples), **details}
    path.write_text(json.dumps(report, indent=2) + "\n")


def centre_crops(images: Iterable[np.ndarray], resolution: int, batch_size: int,
                 gray: bool = False) -> Iterator[np.ndarray]:
    """Decoded images (shorter side at `resolution`) centre-cropped to resolution x resolution, as uint8 NHWC
    batches for measuring: 16-bit images are scaled to 8 bits; a batch mixing gray and colour becomes RGB, or
    with `gray` (the reference of gray images: a 1-channel model's training images, or gray samples) every colour
    image becomes its luma, as a 1-channel model learns it (Augmentation.batch)."""
    crop = Augmentation(resolution, center_crop=True, random_flip=False, channels=1)

    def measured(batch: list[np.ndarray]) -> np.ndarray:
        pixels = crop.crop_and_flip(batch, rng=None)
        if gray and pixels.shape[1] == 3:
            luma = np.einsum("nchw,c->nhw", pixels.astype(np.float32), LUMA)[:, None]
            pixels = luma.round().astype(pixels.dtype)
        return to_uint8_nhwc(pixels)

    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield measured(batch)
            batch = []
    if batch:
        yield measured(batch)


def to_uint8_nhwc(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype != np.uint8:
        pixels = (pixels / 257.0).round().astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


def image_batches(source: Source, resolution: int, batch_size: int, limit: int | None = None,
                  skipped: list[tuple[str, str]] | None = None, gray: bool = False) -> Iterator[np.ndarray]:
    """The images of `source` (`limit` of them at most, a fixed random choice) decoded and resized as for
    training, then centre-cropped (as gray with `gray`, see centre_crops): uint8 NHWC batches, decoded as they
    are used, so a large set needs little memory. Unreadable images are skipped and added to `skipped`."""
    def decoded() -> Iterator[np.ndarray]:
        # JPEGs decoded whole (decoding.decode_record's draft): FID references are, and FID is sensitive to it
        for record, result in decode_records(spread_choice(source.records, limit), resolution, False, draft=False):
            if isinstance(result, str):
                if skipped is not None:
                    skipped.append((record.name, result))
                continue
            yield result[0]

    return centre_crops(decoded(), resolution, batch_size, gray)


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
            # the weights sum to 1, so weighing the normalised values gives the normalised luma
            batch = np.einsum("nchw,c->nhw", batch, LUMA)[:, None]
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

    @property
    def images_key(self) -> str:
        """Which decoded images these are: their cache entry's key, a hash of the source's content fingerprint
        and the decoding settings."""
        return self.images.cache.folder.name

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
