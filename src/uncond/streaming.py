"""--streaming: train from a `datasets` streaming source (the Hub, or local shards such as Parquet
files or WebDataset tars) without a full local copy.

A stream cannot be decoded once ahead of time, so its images are decoded on the fly, by worker
threads in the background (decoding.decode_records, as for the cache), and batches follow the stream:

- each process reads its own shards (datasets.distributed.split_dataset_by_node; when the number of
  shards does not divide by the number of processes, every process reads every shard and keeps its
  share of the examples);
- order: the shards are shuffled and examples pass through a shuffle buffer of SHUFFLE_BUFFER
  (datasets' IterableDataset.shuffle), reshuffled for each pass over the stream;
- the stream is endless: when a pass ends the next begins, so every process takes the same number of
  steps whatever its shards hold. An epoch is as many batches as the dataset's metadata says it has
  images or, when it does not say, the whole run, which is why --max_train_steps is required;
- crops and flips are drawn as for cached data, from (seed, epoch, batch, process);
- bad examples are skipped and counted; data_report.json is rewritten at each export;
- resuming does not replay the stream, which would read again everything read before it: the
  resumed run starts a fresh pass shuffled with a seed drawn from (seed, epoch, batch). Unlike a run
  on cached data, a resumed streaming run does not end with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Iterator

import numpy as np
import torch

from .config import TrainConfig, UsageError
from .data import Augmentation, augmentation_rng, first_reasons, mix_seed, prefetch, write_report
from .decoding import decode_records
from .sources import (RANGE_SAMPLE, Record, array_value_range, find_image_columns, load_dataset_or_explain,
                      open_first_image)

logger = logging.getLogger("uncond")

SHUFFLE_BUFFER = 1000  # examples; datasets' default
# A stream whose first examples all fail to decode is wrong as a whole (a wrong column, say): said at once.
UNREADABLE_AT_START = 256
CHANNELS_PEEK = 64  # images looked at by --num_channels auto


class Stream:
    """A `datasets` streaming split with its image columns, their images left undecoded."""

    def __init__(self, config: TrainConfig):
        import datasets

        dataset = load_dataset_or_explain(config, split="train", streaming=True)
        if config.image_column and dataset.features is not None and config.image_column not in dataset.features:
            raise UsageError(f"--image_column {config.image_column}: no such column; the dataset has "
                             f"{', '.join(dataset.features)}")
        self.columns = [config.image_column] if config.image_column else find_image_columns(dataset.features)
        for column in self.columns:
            if dataset.features is not None and isinstance(dataset.features[column], datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self.dataset = dataset
        self.name = config.dataset_name
        splits = dataset.info.splits
        self.num_examples = splits["train"].num_examples if splits and "train" in splits else None
        encoded = dataset.features is not None and all(isinstance(dataset.features[column], datasets.Image)
                                                       for column in self.columns)
        self.value_range = None if encoded else self.array_value_range()

    def array_value_range(self) -> tuple[float, float] | None:
        """One range for arrays of pixels (sources.array_value_range), from the stream's first RANGE_SAMPLE
        examples, as for a dataset on disk; None for encoded images."""
        cells = [example.get(column) for example in itertools.islice(self.dataset, RANGE_SAMPLE)
                 for column in self.columns]
        arrays = [cell for cell in cells if cell is not None and not isinstance(cell, (dict, bytes, bytearray))]
        if not arrays:
            return None
        low, high = value_range = array_value_range(arrays)
        logger.info(f"--streaming: the arrays of {self.name} are read with values {low:g} to {high:g} as black to "
                    f"white (judged from its first {RANGE_SAMPLE} examples)")
        return value_range

    def records(self, dataset: Any) -> Iterator[Record]:
        """Each example's first non-empty image column (WebDataset shards have one per file extension)."""
        for i, example in enumerate(dataset):
            name = f"{self.name}:{example.get('__key__') or i}"
            yield Record(name, functools.partial(open_first_image, self.columns, example, self.value_range))

    def all_gray(self, config: TrainConfig) -> bool:
        """Whether the first CHANNELS_PEEK images are all grayscale; every process sees the same ones."""
        head = itertools.islice(self.records(self.dataset), CHANNELS_PEEK)
        results = [result for _, result in decode_records(head, 8, False, config.dataloader_num_workers)]
        decoded = [result for result in results if not isinstance(result, str)]
        return bool(decoded) and all(gray for _, gray, _ in decoded)


class StreamedBatches:
    """One process's training batches from a stream: the same interface as data.CachedBatches."""

    def __init__(self, stream: Stream, config: TrainConfig, channels: int, num_processes: int = 1,
                 process_index: int = 0, pin_memory: bool = False):
        from datasets.distributed import split_dataset_by_node

        self.stream, self.config, self.channels, self.pin_memory = stream, config, channels, pin_memory
        self.process_index = process_index
        self.shard = split_dataset_by_node(stream.dataset, rank=process_index, world_size=num_processes)
        self.augmentation = Augmentation(config.resolution, config.center_crop, config.random_flip, channels)
        if stream.num_examples:
            per_process = -(-stream.num_examples // num_processes)
            self.batches_per_epoch = -(-per_process // config.train_batch_size)
        else:
            self.batches_per_epoch = config.max_train_steps * config.gradient_accumulation_steps
            logger.warning("the stream's size is unknown (its metadata has no split sizes): the whole run counts as "
                           "one epoch, so --save_images_epochs and --save_model_epochs apply at its end only; "
                           "--checkpointing_steps still saves as it goes")
        self.num_images = stream.num_examples
        self.used, self.upscaled, self.skipped = 0, 0, []
        self._position: tuple[int, int] | None = None  # where the running producer is
        self._batches: Iterator[tuple[int, torch.Tensor]] | None = None

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch index, the model's input on the CPU) for one epoch from `start_batch` on, continuing the stream."""
        if self._position != (epoch, start_batch) or self._batches is None:
            self._batches = prefetch(self.produce(epoch, start_batch), pin_memory=self.pin_memory)
        for _ in range(start_batch, self.batches_per_epoch):
            yield next(self._batches)
        self._position = (epoch + 1, 0)

    def produce(self, epoch: int, start_batch: int) -> Iterator[tuple[int, torch.Tensor]]:
        seed = self.config.seed
        shuffle_seed = seed if (epoch, start_batch) == (0, 0) else mix_seed(seed, epoch, start_batch)
        images = self.decoded(shuffle_seed)
        while True:
            for batch_index in range(start_batch, self.batches_per_epoch):
                arrays = list(itertools.islice(images, self.config.train_batch_size))
                yield batch_index, self.augmentation.batch(
                    arrays, augmentation_rng(seed, epoch, batch_index, self.process_index))
            epoch, start_batch = epoch + 1, 0

    def decoded(self, shuffle_seed: int) -> Iterator[np.ndarray]:
        """This process's images, decoded, pass after pass, each pass reshuffled."""
        config = self.config
        for stream_pass in itertools.count():
            shuffled = self.shard.shuffle(seed=shuffle_seed, buffer_size=SHUFFLE_BUFFER)
            shuffled.set_epoch(stream_pass)
            used_before = self.used
            for record, result in decode_records(self.stream.records(shuffled), config.resolution,
                                                 config.preserve_input_precision, config.dataloader_num_workers):
                if isinstance(result, str):
                    if stream_pass == 0:  # each pass meets the same bad files again
                        self.skipped.append((record.name, result))
                    if self.used == 0 and len(self.skipped) == UNREADABLE_AT_START:  # not after a whole pass
                        raise UsageError(f"none of the first {UNREADABLE_AT_START} examples of the stream of "
                                         f"{self.stream.name} could be read ({first_reasons(self.skipped)}); "
                                         "check --image_column")
                    continue
                self.used += 1
                self.upscaled += result[2]
                yield result[0]
            if self.used == used_before:
                raise UsageError(f"no image in the stream of {self.stream.name} could be read"
                                 + (f" ({first_reasons(self.skipped)})" if self.skipped else ""))

    def summary(self) -> str:
        line = f"data: streaming {self.stream.name}; {self.used} images decoded by this process so far"
        if self.skipped:
            line += f", {len(self.skipped)} skipped ({first_reasons(self.skipped)})"
        return line

    def write_report(self, path: Any) -> None:
        write_report(path, self.used, self.skipped, self.upscaled, streaming=True, process=self.process_index)
