"""`uncond sample`: numbered PNGs in a folder, which the same command, run again, completes.

Image i of a sampling always starts from the same noise (`sampling` seeds it seed + i), so an interrupted
run loses nothing: the folder records what made its images (`sample_settings.json`: model, its weights'
fingerprint, sampler, steps, seed, dtype), each image is written whole or not at all, and a re-run with the
same settings samples only the images that are missing. Images of any other sampling are never mixed in:
a folder holding them is refused unless --overwrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import SampleConfig, UsageError
from .sampling import (image_grid, is_numbered_image, network_evaluations, numbered_name, open_for_sampling,
                       sample_batches, sampling_options, to_pil)

logger = logging.getLogger("uncond")

SETTINGS_FILE = "sample_settings.json"
PARTIAL_SUFFIX = ".partial"  # an image being written; renamed to its number once whole
GRID_SIZE = 256  # the first images tiled into --grid


def sample_to_folder(config: SampleConfig) -> Path:
    """Images 0..N-1 as numbered PNGs (grayscale for 1-channel models), and a grid if asked; those an
    earlier run of the same settings wrote are kept and not sampled again."""
    folder = Path(config.output_dir)
    refuse_other_outputs(folder, config)
    model, scheduler, steps = open_for_sampling(config, config.model)
    settings = sample_settings(config, model, steps)
    done = images_done(folder, settings, config)
    folder.mkdir(parents=True, exist_ok=True)
    if config.grid:
        Path(config.grid).parent.mkdir(parents=True, exist_ok=True)
    clear_for(folder, config, settings)
    if done == config.num_images:
        logger.info(f"{folder} already holds the {done} images of these settings; nothing to sample")
    elif done:
        logger.info(f"{folder} holds images 0 to {done - 1} of these settings from an earlier run; sampling the "
                    f"other {config.num_images - done}")
    started = time.perf_counter()
    options = {**sampling_options(config, steps), "num_images": config.num_images - done, "seed": config.seed + done}
    index = done
    try:
        for batch in sample_batches(model.unet, scheduler, **options) if done < config.num_images else ():
            for image in batch:
                write_whole(to_pil(image), folder / numbered_name(index))
                index += 1
    except KeyboardInterrupt:
        logger.info(f"interrupted with {index} of {config.num_images} images written; run the same command again "
                    "to sample the rest")
        raise
    if config.grid and not (Path(config.grid).exists() and done == config.num_images):
        image_grid(read_images(folder, min(config.num_images, GRID_SIZE))).save(config.grid)
        logger.info(f"grid of {min(config.num_images, GRID_SIZE)} images: {config.grid}")
    if index > done:
        elapsed = time.perf_counter() - started
        logger.info(f"wrote {index - done} images ({model_shape_text(model.unet)}) to {folder} in {elapsed:.1f} s "
                    f"({(index - done) / elapsed:.1f} images/s; {config.sampler}, {steps} steps, "
                    f"{network_evaluations(scheduler, steps)} network evaluations per image)")
    return folder


def refuse_other_outputs(folder: Path, config: SampleConfig) -> None:
    """Before loading the model: a file where the folder goes, or a --grid file of someone else's."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir {folder} is a file; choose a folder")
    if config.grid and Path(config.grid).exists() and not config.overwrite and not is_own_grid(folder, config.grid):
        raise UsageError(f"--grid {config.grid} already exists; choose another file, or pass --overwrite to "
                         "replace it")


def is_own_grid(folder: Path, grid: str) -> bool:
    """Whether `grid` is the one an earlier run of this folder wrote (a re-run completing it may redo it)."""
    return (recorded_settings(folder) or {}).get("grid") == grid_name(grid)


def grid_name(grid: str | None) -> str | None:
    return str(Path(grid).resolve()) if grid else None


def sample_settings(config: SampleConfig, model: Any, steps: int) -> dict[str, Any]:
    """What decides every pixel of image i: the same settings give the same images (up to float rounding)."""
    return {"model": config.model, "weights": weights_fingerprint(model.unet), "sampler": config.sampler,
            "steps": steps, "seed": config.seed, "dtype": config.dtype}


def weights_fingerprint(unet: torch.nn.Module) -> str:
    """A hash of every weight tensor's name, shape and (strided) values: a retrained model in the same
    folder differs in nearly all of them. Strided, because hashing every value of a large model on its
    device would cost a full copy to the host for a check."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(unet.state_dict().items()):
        flat = tensor.detach().flatten()
        picked = flat[::max(1, flat.numel() // 4096)].float().cpu().numpy()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(picked.tobytes())
    return digest.hexdigest()


def images_done(folder: Path, settings: dict[str, Any], config: SampleConfig) -> int:
    """How many of images 0..N-1 an earlier run of these settings left (the unbroken run from image 0);
    a folder holding other images is refused unless --overwrite."""
    taken = numbered_images(folder)
    if config.overwrite or not taken:
        return 0
    recorded = recorded_settings(folder)
    if recorded is None:
        # A folder mixing two samplings would be measured as one set by `uncond evaluate`.
        raise UsageError(f"--output_dir {folder} already holds {len(taken)} numbered images of an earlier run; "
                         "choose another --output_dir, or pass --overwrite to replace them")
    changed = [key for key in settings if recorded.get(key) != settings[key]]
    if changed:
        what = ", ".join("the model's weights" if key == "weights" else f"{key} {recorded.get(key)}"
                         for key in changed)
        raise UsageError(f"--output_dir {folder} holds {len(taken)} images sampled with other settings ({what}); "
                         "choose another --output_dir, or pass --overwrite to replace them")
    if len(taken) > config.num_images:
        raise UsageError(f"--output_dir {folder} holds {len(taken)} images of these settings, more than "
                         f"--num_images {config.num_images}; pass --overwrite to keep only {config.num_images}")
    done = 0
    while (folder / numbered_name(done)).is_file():
        done += 1
    return done


def clear_for(folder: Path, config: SampleConfig, settings: dict[str, Any]) -> None:
    """Remove what this run replaces (with --overwrite, every numbered image beyond its count too, and
    unfinished images of an interrupted run), then record its settings."""
    for path in folder.iterdir():
        if path.name.endswith(PARTIAL_SUFFIX) or (config.overwrite and is_numbered_image(path)
                                                  and int(path.stem) >= config.num_images):
            path.unlink()
    record = {**settings, "grid": grid_name(config.grid)}  # the grid is not compared: any may be asked for
    (folder / SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def recorded_settings(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_whole(image: Image.Image, path: Path) -> None:
    """Written under another name and renamed, so an interrupted run leaves no half-written image."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    image.save(partial, format="PNG")
    os.replace(partial, path)


def numbered_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [path for path in folder.iterdir() if is_numbered_image(path)]


def read_images(folder: Path, count: int) -> np.ndarray:
    """Images 0..count-1 of the folder as one NHWC uint8 array (for the grid)."""
    images = [np.asarray(Image.open(folder / numbered_name(index))) for index in range(count)]
    return np.stack([image[..., None] if image.ndim == 2 else image for image in images])


def model_shape_text(unet: torch.nn.Module) -> str:
    size = unet.config.sample_size
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    return f"{width}x{height}, {'grayscale' if unet.config.in_channels == 1 else 'RGB'}"
