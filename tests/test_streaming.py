"""--streaming: training from local Parquet and WebDataset shards that the tests write, without a cache."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import fast_train_args
from uncond.config import TrainConfig
from uncond.streaming import Stream, StreamedBatches


@pytest.fixture(autouse=True)
def no_pause_between_passes(monkeypatch):
    """datasets pauses 5 s at the end of each pass over a shuffled multi-shard Parquet stream (a pyarrow
    thread-shutdown workaround): nothing on a real dataset, whose pass takes minutes, but most of a test."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def shade(i: int) -> Image.Image:
    """Image i: a flat gray of 10 * (i + 1), so a crop tells which image it came from."""
    return Image.new("L", (20, 18), 10 * (i + 1))


def write_parquet_shards(folder: Path, count: int = 8, shards: int = 2) -> Path:
    import datasets

    folder.mkdir(parents=True)
    dataset = datasets.Dataset.from_dict({"image": [shade(i) for i in range(count)]}).cast_column(
        "image", datasets.Image())
    for k in range(shards):
        dataset.shard(shards, k, contiguous=True).to_parquet(str(folder / f"train-{k:05d}-of-{shards:05d}.parquet"))
    return folder


def write_webdataset_shards(folder: Path) -> Path:
    """Two tar shards of JPEG files (a WebDataset's samples all have the same parts), one not an image at all."""
    folder.mkdir(parents=True)
    members = [[("000000.jpg", shade(0)), ("000001.jpg", shade(1)), ("000002.jpg", b"<html>not found</html>")],
               [("000003.jpg", shade(3)), ("000004.jpg", shade(4)), ("000005.jpg", shade(5))]]
    for k, shard in enumerate(members):
        with tarfile.open(folder / f"train-{k:05d}.tar", "w") as tar:
            for name, content in shard:
                if isinstance(content, Image.Image):
                    buffer = io.BytesIO()
                    content.save(buffer, "JPEG", quality=100)
                    content = buffer.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return folder


def streaming_args(shards: Path, unet: Path, out: Path, *extra: str) -> list[str]:
    args = fast_train_args(shards, unet, out, "--streaming", "--max_train_steps", "3", "--train_batch_size", "2",
                           *extra)
    args[args.index("--train_data_dir")] = "--dataset_name"
    return args


def test_trains_from_parquet_shards_and_resumes(run_cli, tiny_unet, tmp_path):
    shards = write_parquet_shards(tmp_path / "parquet")
    out = tmp_path / "run"
    tiny = ("--model_config_name_or_path", "", "--model_preset", "tiny")
    code, _, err = run_cli(*streaming_args(shards, tiny_unet, out, "--checkpointing_steps", "3", *tiny))
    assert code == 0, err
    assert "judged from the first 64 images of the stream" in err and "1-channel" in err
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 1
    report = json.loads((out / "data_report.json").read_text())
    assert report["streaming"] and report["used"] >= 6 and report["skipped"] == []
    assert not (tmp_path / "image-cache" / "uncond").exists()  # nothing was cached
    code, _, err = run_cli(*streaming_args(shards, tiny_unet, out, "--max_train_steps", "5", *tiny))
    assert code == 0, err
    assert "resuming from checkpoint-3" in err
    assert "--streaming: the stream is read afresh from step 3, in a new shuffle" in err  # it said nothing of it


def test_trains_from_webdataset_shards_skipping_a_bad_file(run_cli, tiny_unet, tmp_path):
    shards = write_webdataset_shards(tmp_path / "wds")
    out = tmp_path / "run"
    code, _, err = run_cli(*streaming_args(shards, tiny_unet, out, "--max_train_steps", "4", "--num_channels", "1",
                                           "--model_config_name_or_path", "", "--model_preset", "tiny"))
    assert code == 0, err
    assert "the stream's size is unknown (its metadata has no split sizes): the whole run counts as one epoch" in err
    report = json.loads((out / "data_report.json").read_text())
    assert [item["name"] for item in report["skipped"]] == [f"{shards}:000002"]  # once, though read each pass
    assert "UnidentifiedImageError" in report["skipped"][0]["reason"]


def test_processes_read_disjoint_shards_and_the_stream_wraps_around(tmp_path):
    shards = write_parquet_shards(tmp_path / "parquet", count=8, shards=2)
    config = TrainConfig(dataset_name=str(shards), streaming=True, resolution=16, train_batch_size=2,
                         max_train_steps=4, seed=0)
    stream = Stream(config)
    seen = []
    for rank in range(2):
        batches = StreamedBatches(stream, config, channels=1, num_processes=2, process_index=rank)
        shades = [round((float(b[i, 0, 0, 0]) + 1) * 12.75) - 1 for _, b in batches.epoch(0) for i in range(2)]
        assert len(shades) == 8 and sorted(shades[:4]) == sorted(shades[4:])  # two passes over its 4 images
        seen.append(set(shades))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))


def test_a_streamed_array_columns_range_is_one_for_all_its_images(tmp_path):
    """As on disk (test_data): a bright [-1, 1] image alone passed for [0, 1] and went white."""
    import datasets
    import numpy as np

    folder = tmp_path / "arrays"
    folder.mkdir()
    images = [np.full((4, 4), value, np.float32) for value in (-0.5, 0.5)]
    datasets.Dataset.from_dict({"pixel_values": images}).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    config = TrainConfig(dataset_name=str(folder), streaming=True, resolution=4, train_batch_size=2,
                         max_train_steps=1, seed=0)
    stream = Stream(config)
    assert stream.value_range == (-1.0, 1.0)
    batch = next(iter(StreamedBatches(stream, config, channels=1).epoch(0)))[1]
    assert sorted(round((float(image[0, 0, 0]) + 1) * 127.5) for image in batch) == [64, 191]


def test_streaming_needs_max_train_steps(run_cli, tmp_path):
    code, _, err = run_cli("train", "--dataset_name", tmp_path, "--streaming", "--output_dir", tmp_path / "out")
    assert code == 2 and "--streaming needs --max_train_steps" in err and len(err.strip().splitlines()) == 1


def test_a_stream_whose_first_examples_all_fail_stops_at_once(run_cli, tiny_unet, tmp_path):
    """A wrong --image_column on a large stream is said after a few hundred examples, not after a whole pass."""
    import datasets

    folder = tmp_path / "labels"
    folder.mkdir()
    datasets.Dataset.from_dict({"image": [shade(0)] * 400, "label": list(range(400))}).cast_column(
        "image", datasets.Image()).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    code, _, err = run_cli(*streaming_args(folder, tiny_unet, tmp_path / "run", "--image_column", "label"))
    assert code == 2, err[-2000:]
    assert "none of the first 256 examples of the stream" in err and "check --image_column" in err
