"""Shared fixtures: tiny UNet configs and image folders the tests write, and an in-process CLI runner."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the Hub from the tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
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
    from uncond.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        reset_accelerate()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def fast_train_args(data_folder: Path, unet_config: Path, output_dir: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long CPU run on the tiny UNet."""
    return ["train", "--train_data_dir", data_folder, "--model_config_name_or_path", unet_config,
            "--resolution", "16", "--output_dir", output_dir, "--train_batch_size", "4", "--eval_batch_size", "4",
            "--sample_steps", "2", "--lr_warmup_steps", "1", "--logger", "none", "--seed", "0", *extra]


def make_tiny_extractor():
    """A stand-in for the Inception network, through the same interface: a fixed random convolution,
    pooled to 8 features. It tells images apart, in milliseconds, and needs no weights file."""
    from uncond.metrics import FeatureExtractor

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=generator)

    def network(pixels: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(pixels.float() / 255, size=(16, 16), mode="bilinear")
        return torch.nn.functional.conv2d(x, weight, stride=2).relu().mean(dim=(2, 3))

    return FeatureExtractor("tiny-test-features", network, torch.device("cpu"), "a tiny stand-in network")


@pytest.fixture
def stand_in_inception(monkeypatch):
    """`uncond evaluate` and training evaluations use the tiny extractor instead of Inception."""
    import uncond.metrics

    monkeypatch.setattr(uncond.metrics, "inception_extractor", lambda weights, device: make_tiny_extractor())


@pytest.fixture
def no_inception_weights(monkeypatch, tmp_path):
    """An empty torch.hub cache and no network: the Inception weights are nowhere to be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch-home" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    """Reference statistics are cached in the test's own folder, never in the user's."""
    monkeypatch.setenv("UNCOND_CACHE", str(tmp_path / "uncond-cache"))


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
