"""`uncond sample`: numbered PNGs in a folder, which the same command, run again, completes.

Image i of a sampling always starts from the same noise (`sampling` seeds it seed + i), so an interrupted
run loses nothing: the folder records what made its images (`sample_settings.json`: model, its weights'
fingerprint, its noise schedule, sampler, steps, seed, dtype), each image is written whole or not at all,
and a re-run with the same settings samples only the images that are missing (with --overwrite too: it
replaces images of other settings, and keeps those of these). Images of any other sampling are never mixed
in: a folder holding them is refused unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import environment, signals
from .config import (RUN_CONFIG_FILE, SAMPLE_SETTINGS_FILE, RunFailed, RunStopped, SampleConfig, UsageError,
                     counted)
from .manifest import file_digest
from .run_folder import check_creatable, is_preview_folder, make_folder
from .sampling import (PARTIAL_SUFFIX, holds_model, image_grid, is_numbered_image, log_sampling, network_evaluations,
                       numbered_name, open_for_sampling, sample_batches, sampling_options, to_pil, write_whole)

logger = logging.getLogger("uncond")

GRID_SIZE = 256  # the first images tiled into --grid
COMPARED = ("weights", "schedule", "sampler", "steps", "seed", "dtype")  # the settings a folder's images share


def sample_to_folder(config: SampleConfig) -> Path:
    """Images 0..N-1 as numbered PNGs (grayscale for 1-channel models), and a grid if asked; those an
    earlier run of the same settings wrote are kept and not sampled again. Under `accelerate launch` each
    process samples its share of the images on its own device."""
    from accelerate import PartialState

    with environment.sigterm_ends_while_processes_meet():  # one process, or each `accelerate launch` started
        processes = PartialState(cpu=environment.cpu_processes())
    if processes.num_processes > 1 and config.device == "auto":
        config = dataclasses.replace(config, device=str(processes.device))
    folder = Path(config.output_dir)
    refuse_other_outputs(folder, config)
    model, scheduler, steps = open_for_sampling(config, config.model)
    settings = sample_settings(config, model, scheduler, steps)
    recorded = recorded_settings(folder)
    # --overwrite replaces the images of other settings; those of these are the images this run would write
    replacing = config.overwrite and (recorded is None or bool(changed_settings(recorded, settings)))
    missing = images_missing(folder, settings, recorded, config, replacing)
    log_sampling(config, model, steps)
    processes.wait_for_everyone()  # every process has looked at the folder before the main one changes it
    if processes.is_main_process:
        prepare_folder(folder, config, settings, replacing)
        if len(missing) < config.num_images:
            logger.info(f"{folder} already holds {config.num_images - len(missing)} of the {config.num_images} "
                        f"images of these settings; sampling the other {len(missing)}" if missing else
                        f"{folder} already holds the {config.num_images} images of these settings; nothing to sample")
    processes.wait_for_everyone()
    started = time.perf_counter()
    share = missing[processes.process_index::processes.num_processes]
    options = {**sampling_options(config, steps), "progress": processes.is_local_main_process}
    write_images(model.unet, scheduler, share, folder, options,
                 already=config.num_images - len(missing) if processes.num_processes == 1 else None)
    processes.wait_for_everyone()
    signals.outcome_said()  # the images are written: a stop would only leave out the grid and turn it into "stopped"
    if processes.is_main_process:
        if config.grid:  # redone each time: images added by a run without --grid are in it too
            try:
                write_whole(image_grid(read_images(folder, min(config.num_images, GRID_SIZE))), Path(config.grid))
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                raise RunFailed(f"no space left on the device writing the grid {config.grid}; the {config.num_images} "
                                "images are written, and an earlier grid is kept whole; free some space and re-run "
                                "the same command to write the grid") from None
            record_grid(folder, config.grid)
            logger.info(f"grid of {min(config.num_images, GRID_SIZE)} images: {config.grid}")
        if missing:
            elapsed = time.perf_counter() - started
            logger.info(f"wrote {counted(len(missing), 'image')} ({model_shape_text(model.unet)}) to {folder} in "
                        f"{elapsed:.1f} s ({len(missing) / elapsed:.1f} images/s{on_processes(processes)}; "
                        f"{config.sampler}, {steps} steps, {network_evaluations(scheduler, steps)} network "
                        "evaluations per image)")
    environment.finish_collectives()
    return folder


def write_images(unet: torch.nn.Module, scheduler: Any, indices: list[int], folder: Path, options: dict[str, Any],
                 already: int | None) -> None:
    """Sample images `indices` into `folder`. On Ctrl-C or SIGTERM (a job's end), says how far it got (`already` +
    those written, when this is the only process) and how to go on."""
    written = 0
    try:  # SIGTERM raises RunStopped here (cli.sigterm_stops)
        for batch in sample_batches(unet, scheduler, **options, indices=indices) if indices else ():
            for image in batch:
                write_whole(to_pil(image), folder / numbered_name(indices[written]))
                written += 1
    except (KeyboardInterrupt, RunStopped) as stop:
        so_far = "" if already is None else f" with {already + written} of {options['num_images']} images written"
        how = "interrupted" if isinstance(stop, KeyboardInterrupt) else "stopped by SIGTERM"
        logger.info(f"{how}{so_far}; run the same command again to sample the rest")
        if isinstance(stop, RunStopped):
            stop.said = True
        raise


def on_processes(processes: Any) -> str:
    return f" from {processes.num_processes} processes" if processes.num_processes > 1 else ""


def refuse_other_outputs(folder: Path, config: SampleConfig) -> None:
    """Before loading the model: a file where the folder goes, or a --grid file of someone else's."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir {folder} is a file; choose a folder")
    check_creatable(str(folder), "--output_dir")
    if config.grid:
        check_creatable(config.grid, "--grid", file=True)
    if holds_model(folder) or (folder / RUN_CONFIG_FILE).is_file():
        # The images would lie among the model's files, and evaluate would measure its preview grids with them
        # (or take the folder for the model: a checkpoint's unet/ was taken; trial 68 F16).
        raise UsageError(f"--output_dir {folder} holds a model (a pipeline, a checkpoint or its weights, or a "
                         "training run); choose another --output_dir")
    if is_pipeline_component(folder):
        raise UsageError(f"--output_dir {folder} is the {folder.resolve().name} folder of the pipeline in "
                         f"{folder.resolve().parent}; choose another --output_dir")
    if is_preview_folder(folder):
        # `cd run && uncond sample .` put them there, by the default --output_dir: the next
        # `uncond train --overwrite_output_dir` of the run removes that folder with the previews
        raise UsageError(f"--output_dir {folder} is the preview folder of the training run in "
                         f"{folder.resolve().parent}; choose another --output_dir")
    if config.grid and Path(config.grid).exists() and not config.overwrite and not is_own_grid(folder, config.grid):
        raise UsageError(f"--grid {config.grid} already exists; choose another file, or pass --overwrite to "
                         "replace it")
    if config.grid and Path(config.grid).resolve().parent == folder.resolve() and is_numbered_image(Path(config.grid)):
        # It would be counted as one of the samples: by the next run's checks and by `uncond evaluate`.
        raise UsageError(f"--grid {config.grid} is named like the numbered images in --output_dir; give it another "
                         "name, such as grid.png")


def is_pipeline_component(folder: Path) -> bool:
    """A folder of a pipeline's (unet/, scheduler/), as its model_index.json names them."""
    index = folder.resolve().parent / "model_index.json"
    try:
        return index.is_file() and folder.resolve().name in json.loads(index.read_text())
    except (OSError, ValueError):
        return False


def is_own_grid(folder: Path, grid: str) -> bool:
    """Whether `grid` is the one an earlier run of this folder wrote, unchanged since (a re-run completing it may
    redo it; another run's grid written there since may not be replaced)."""
    recorded = recorded_settings(folder) or {}
    return recorded.get("grid") == grid_name(grid) and recorded.get("grid_sha256") == file_digest(Path(grid))


def record_grid(folder: Path, grid: str) -> None:
    """The grid just written, with its digest, in the folder's settings (is_own_grid)."""
    write_settings(folder, {**(recorded_settings(folder) or {}), "grid": grid_name(grid),
                            "grid_sha256": file_digest(Path(grid))})


def grid_name(grid: str | None) -> str | None:
    return str(Path(grid).resolve()) if grid else None


def sample_settings(config: SampleConfig, model: Any, scheduler: Any, steps: int) -> dict[str, Any]:
    """What decides every pixel of image i: the same settings give the same images (up to float rounding).
    The model is recorded as it was named, for people; it is compared by its weights and noise schedule, so
    that `run`, `./run` and a copy of it are the same model."""
    return {"model": config.model, "weights": weights_fingerprint(model.unet), "schedule": schedule_of(scheduler),
            "sampler": config.sampler, "steps": steps, "seed": config.seed, "dtype": config.dtype}


def schedule_of(scheduler: Any) -> dict[str, Any]:
    """The sampler's configuration (betas, prediction type, spacing...), as JSON would write it back."""
    public = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    return finite_json(json.loads(json.dumps(public, default=str)))


def finite_json(value: Any) -> Any:
    """`value` with its infinite and NaN floats as the strings "-inf", "inf", "nan": Python writes them as
    -Infinity, which is not JSON, and strict readers (JavaScript's, jq's --strict, Go's) refuse the file
    (DPMSolver's lambda_min_clipped is -inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_json(item) for item in value]
    return value


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


def images_missing(folder: Path, settings: dict[str, Any], recorded: dict[str, Any] | None, config: SampleConfig,
                   replacing: bool) -> list[int]:
    """Which of images 0..N-1 are still to be sampled: those an earlier run of these settings (`recorded` in the
    folder) did not write (all of them when `replacing` the folder's images); a folder holding other images is
    refused unless --overwrite."""
    taken = numbered_images(folder)
    if replacing or not taken:
        return list(range(config.num_images))
    if recorded is None:
        # A folder mixing two samplings would be measured as one set by `uncond evaluate`.
        raise UsageError(f"--output_dir {folder} already holds {len(taken)} numbered images that no `uncond sample` "
                         "recorded there (yours, another tool's or an older uncond's); choose another --output_dir, or "
                         "pass --overwrite to replace them")
    changed = changed_settings(recorded, settings)
    if changed:
        raise UsageError(f"--output_dir {folder} holds {len(taken)} images sampled with other settings ({changed}); "
                         "choose another --output_dir, or pass --overwrite to replace them")
    if len(taken) > config.num_images and not config.overwrite:
        raise UsageError(f"--output_dir {folder} holds {len(taken)} images of these settings, more than "
                         f"--num_images {config.num_images}; pass --overwrite to keep only {config.num_images}")
    return [index for index in range(config.num_images) if not (folder / numbered_name(index)).is_file()]


def changed_settings(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """The settings of the earlier run that differ from this one's, in words ("" when none do)."""
    changed = [key for key in COMPARED if key in recorded and recorded[key] != settings[key]]
    # Consequences said once, by their cause: the weights are fingerprinted as cast to the dtype, and each
    # sampler has its own configuration.
    for cause, consequence in (("dtype", "weights"), ("sampler", "schedule")):
        if cause in changed and consequence in changed:
            changed.remove(consequence)
    words = {"weights": "the model's weights", "schedule": "the model's noise schedule"}
    return ", ".join(words.get(key, f"{key} {recorded[key]}") for key in changed)


def prepare_folder(folder: Path, config: SampleConfig, settings: dict[str, Any], replacing: bool) -> None:
    """Make the folders, remove what this run replaces (when `replacing`, every numbered image; with
    --overwrite, those of these settings past --num_images; unfinished images of an interrupted run), then
    record its settings."""
    make_folder(folder, "--output_dir")
    if config.grid:
        make_folder(Path(config.grid).parent, "--grid")
    for path in folder.iterdir():
        # Replaced images go before the settings are recorded: an interrupted run must not leave the earlier
        # sampling's images under this one's settings.
        numbered = is_numbered_image(path)
        # An image of ours being written when it was stopped (000012.png.partial); a download's .partial is not
        unfinished = path.name.endswith(PARTIAL_SUFFIX) and is_numbered_image(path.with_suffix(""))
        if (unfinished or (replacing and numbered)
                or (config.overwrite and numbered and int(path.stem) >= config.num_images)):
            path.unlink()
    # The grid is not compared (any may be asked for), but the earlier run's is kept until a new one is written
    # (record_grid), so that asking for it again later, or after a stop before the grid, is recognised as this
    # folder's.
    recorded = {} if config.overwrite else recorded_settings(folder) or {}
    write_settings(folder, {**settings, **{key: recorded.get(key) for key in ("grid", "grid_sha256")}})


def write_settings(folder: Path, record: dict[str, Any]) -> None:
    (folder / SAMPLE_SETTINGS_FILE).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def recorded_settings(folder: Path) -> dict[str, Any] | None:
    try:  # (finite_json: as this version records them; earlier ones wrote -Infinity)
        return finite_json(json.loads((folder / SAMPLE_SETTINGS_FILE).read_text()))
    except (OSError, ValueError):
        return None


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
