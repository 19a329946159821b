"""Shared fixtures: tiny UNet configs and image folders the tests write, and an in-process CLI runner."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub from the tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:1"  # a port nothing listens on: not even with offline mode unset
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A UNet small enough that a training step takes milliseconds: two levels, 16 px.
TINY_UNET = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": 8,
}


@pytest.fixture(autouse=True)
def decoded_image_cache(tmp_path: Path, monkeypatch) -> Path:
    """Without --cache_dir, each test's decoded images go to its own folder instead of ~/.cache/uncond."""
    from uncond import data

    default = tmp_path / "default-cache"
    monkeypatch.setattr(data, "cache_root", lambda cache_dir, root=data.cache_root: root(cache_dir or str(default)))
    return default / "uncond"


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """uncond's logger as a new process has it: cli.setup_logging's handler writes to the stderr of the test
    that set it up, and keeps its records from the root logger that caplog reads."""
    yield
    uncond_logger = logging.getLogger("uncond")
    for handler in [handler for handler in uncond_logger.handlers if handler.get_name() == "uncond"]:
        uncond_logger.removeHandler(handler)
    uncond_logger.propagate = True


@pytest.fixture
def tiny_unet(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_unet" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_UNET))
    return path


def write_images(folder: Path, count: int, *, mode: str = "RGB", size: tuple[int, int] = (20, 24),
                 seed: int = 0, nested: bool = True) -> Path:
    """`count` random images (PNG, and JPEG for RGB), some in a subfolder."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        channels = {"RGB": 3, "L": 1}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
        target = folder / ("nested" if nested and i % 2 else "") / f"image_{i:03d}.{'jpg' if i % 3 == 0 else 'png'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    return folder


@pytest.fixture
def color_folder(tmp_path: Path) -> Path:
    return write_images(tmp_path / "color", 12)


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    return write_images(tmp_path / "gray", 12, mode="L")


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons; every in-process run starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def run_cli(capsys):
    """Run `uncond ARGS...` in this process; returns (exit code, stdout, stderr)."""
    from uncond.cli import console

    def run(*args: str) -> tuple[int, str, str]:
        reset_accelerate()
        code = console([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def fast_train_args(data_folder: Path, unet_config: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long CPU run on the tiny UNet; decoded images are cached beside the data folder
    (also for runs in subprocesses, which the autouse fixture does not reach)."""
    return ["train", "--train_data_dir", data_folder, "--model_config_name_or_path", unet_config,
            "--resolution", "16", "--output_dir", output_dir, "--train_batch_size", "4", "--eval_batch_size", "4",
            "--sample_steps", "2", "--lr_warmup_steps", "1", "--logger", "none", "--seed", "0",
            "--cache_dir", Path(data_folder).parent / "image-cache", *extra]


def strict_json_lines(path: Path) -> list[dict]:
    """The records of a JSON-lines file, read as strict readers do (jq, JavaScript's): Python's NaN and Infinity
    are refused."""
    def refused(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refused) for line in path.read_text().splitlines()]

def png_file(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: Pillow writes neither 16-bit colour nor a header that lies about the size."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height gray pixels, with almost no data: a decompression bomb's shape."""
    return png_file(width, height, 8, 0, b"\0" * 64)


def sixteen_bit_rgb_png(pixels: np.ndarray) -> bytes:
    height, width, _ = pixels.shape
    return png_file(width, height, 16, 2, b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height)))


MESSY_USED = ["alpha.png", "cmyk.jpg", "gray.png", "gray16.png", "gray16.tif", "palette.png",
              "palette_transparent.png", "photo.jpg", "rgb16.png", "rotated.jpg", "small.png", "sub/nested.bmp"]
MESSY_SKIPPED = ["bomb.png", "empty.png", "huge.png", "not_an_image.jpg", "truncated.jpg", "truncated.png"]


def write_messy_folder(folder: Path) -> Path:
    """Every kind of file real image folders hold (MESSY_USED decode, MESSY_SKIPPED do not), for 16 px."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir()
    noise = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "photo.jpg", quality=95)
    rgba = np.concatenate([noise, np.full((30, 40, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette_transparent.png",
                                                                             transparency=0)
    Image.fromarray(noise[..., 0]).save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rng.integers(0, 65536, (20, 24), dtype=np.uint16)).save(folder / "gray16.tif")
    (folder / "rgb16.png").write_bytes(sixteen_bit_rgb_png(rng.integers(0, 65536, (20, 24, 3))))
    Image.fromarray(noise).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(noise[:6, :8]).save(folder / "small.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    Image.fromarray(noise).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(noise).save(folder / "sub" / "nested.bmp")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes((folder / "photo.jpg").read_bytes()[:1500])
    (folder / "truncated.png").write_bytes((folder / "alpha.png").read_bytes()[:1500])
    (folder / "not_an_image.jpg").write_text("<html>an error page saved as a JPEG</html>")
    (folder / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # over twice Pillow's limit
    (folder / "huge.png").write_bytes(png_header_only(10_000, 10_000))  # over the limit, under twice it
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "._photo.jpg").write_bytes(b"\0\5\26\7")  # a macOS resource fork
    (folder / ".hidden").mkdir()
    Image.fromarray(noise).save(folder / ".hidden" / "thumbnail.png")
    return folder


def make_tiny_extractor(weights: str | None = None):
    """A stand-in for the Inception network, through the same interface: a fixed random convolution,
    pooled to 8 features. It tells images apart, in milliseconds, and needs no weights file."""
    from uncond.metrics import FeatureExtractor

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=generator)

    def network(pixels: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(pixels.float() / 255, size=(16, 16), mode="bilinear")
        return torch.nn.functional.conv2d(x, weight, stride=2).relu().mean(dim=(2, 3))

    return FeatureExtractor("tiny-test-features", network, torch.device("cpu"), "a tiny stand-in network",
                            weights=weights or "")  # stands for the weights file's fingerprint


@pytest.fixture
def stand_in_inception(monkeypatch):
    """`uncond evaluate` and training evaluations use the tiny extractor instead of Inception."""
    import uncond.metrics

    monkeypatch.setattr(uncond.metrics, "inception_extractor", lambda weights, device: make_tiny_extractor(weights))


@pytest.fixture
def no_inception_weights(monkeypatch, tmp_path):
    """An empty torch.hub cache and no network: the Inception weights are nowhere to be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch-home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture
def unreachable_hub(monkeypatch) -> str:
    """Offline mode unset: requests go out to the closed HF_ENDPOINT and are refused at once, as without a network
    (and without the wait: huggingface_hub's back-off between its retries, 27 s in all, is skipped)."""
    import datasets.config
    import huggingface_hub.constants
    import huggingface_hub.utils._http

    assert huggingface_hub.constants.ENDPOINT == os.environ["HF_ENDPOINT"]  # read at import, and imported after it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils._http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return os.environ["HF_ENDPOINT"]


def save_tiny_pipeline(folder: Path, channels: int = 3, scheduler: str = "ddpm") -> Path:
    """A diffusers pipeline folder with an untrained tiny UNet, as `uncond train` or diffusers would write it."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    config = {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}
    unet = UNet2DModel(**{**config, "in_channels": channels, "out_channels": channels})
    if scheduler == "ddim":
        DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    else:
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


class RunsCode:
    """A pickled object that runs code when unpickled (a file written), as a malicious weights file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A tmpfs at `folder` with mount `options` (size=1500k, ro), for a really full or read-only disk; the test is
    skipped where mounting needs a permission it lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                                 capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=False)  # gone now, even with a file still open
