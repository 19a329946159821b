"""What is written to disk: resumable training state (checkpoint-N/) and the exported pipeline.

A checkpoint is accelerate's state (optimizer, LR schedule, random states; weights loaded with
weights_only=True) plus the UNet and its EMA in diffusers format (unet/, unet_ema/), laid out as
train_unconditional.py lays them out, so its checkpoints resume here too. Everything is written to
a hidden temporary folder and renamed into place when complete: a folder named checkpoint-N is
always whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from .config import TrainConfig, UsageError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
CONFIG_FILE = "training_config.json"
PIPELINE_ITEMS = ("unet", "scheduler", "model_index.json")
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
# What EMAModel.save_pretrained writes into unet_ema/config.json besides the UNet's own settings.
EMA_STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                  "power")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def holds_trained_model(output_dir: Path) -> bool:
    return (output_dir / "model_index.json").is_file()


def find_resume_checkpoint(config: TrainConfig) -> tuple[Path | None, str]:
    """The checkpoint this run continues from (or None), and a line saying why.

    Without --resume_from_checkpoint, re-running a command on a folder with checkpoints continues the
    run; --overwrite_output_dir starts afresh instead. A named checkpoint that does not exist is an
    error: train_unconditional.py silently starts over.
    """
    output_dir = Path(config.output_dir)
    checkpoints = list_checkpoints(output_dir)
    request = config.resume_from_checkpoint
    if request and request != "latest":
        path = Path(request)
        candidates = [path, output_dir / path.name] if not path.is_absolute() else [path]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate, f"resuming from {candidate}"
        available = ", ".join(p.name for _, p in checkpoints) or "none"
        raise UsageError(f"--resume_from_checkpoint {request}: no such checkpoint (in {output_dir}: {available}); "
                         "use `latest` for the newest, or leave it out to start a new run")
    if checkpoints and (request == "latest" or not config.overwrite_output_dir):
        step, path = checkpoints[-1]
        why = "" if request else " (re-running on a folder with checkpoints continues the run; " \
                                 "--overwrite_output_dir starts afresh)"
        return path, f"resuming from {path.name} at step {step}{why}"
    if request == "latest":
        return None, f"--resume_from_checkpoint latest: no checkpoint in {output_dir} yet; starting a new run"
    return None, ""


def check_output_dir(config: TrainConfig, resuming: bool) -> None:
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; choose a folder")
    if holds_trained_model(output_dir) and not resuming and not config.overwrite_output_dir:
        raise UsageError(f"--output_dir {output_dir} already holds a trained model; pass --overwrite_output_dir to "
                         "replace it, or choose another --output_dir")


def clear_previous_run(output_dir: Path, artefacts: tuple[str, ...]) -> list[str]:
    """--overwrite_output_dir without resuming: remove what an earlier run wrote, so that its checkpoints are
    neither rotated with nor resumed instead of the new ones. Files uncond did not write are left alone."""
    removed = []
    for _, path in list_checkpoints(output_dir):
        shutil.rmtree(path)
        removed.append(path.name)
    for name in (*PIPELINE_ITEMS, *artefacts):
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------- state


def register_state_hooks(accelerator: Accelerator, ema: EMAModel | None) -> None:
    """Make accelerator.save_state/load_state write the UNet (and its EMA) as diffusers folders."""

    def save_hook(models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(output_dir, "unet"))
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        weights.clear()  # written above; accelerate must not write them again

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        unet = accelerator.unwrap_model(models.pop())
        trained = read_weights(Path(input_dir) / "unet")
        unet.load_state_dict(trained)
        if ema is not None:
            ema_dir = Path(input_dir) / "unet_ema"
            # A checkpoint of a run without EMA starts the average from the trained weights.
            averaged = read_weights(ema_dir) if ema_dir.is_dir() else trained
            saved = json.loads((ema_dir / "config.json").read_text()) if ema_dir.is_dir() else {}
            state = {key: saved[key] for key in EMA_STATE_KEYS if key in saved}
            state["shadow_params"] = [averaged[name] for name, _ in unet.named_parameters()]
            ema.load_state_dict(state)
            ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers model folder's weights: safetensors, or a .bin read with weights_only (never unpickled code)."""
    safe, pickled = folder / SAFE_WEIGHTS, folder / "diffusion_pytorch_model.bin"
    try:
        if safe.is_file():
            return load_file(safe)
        if pickled.is_file():
            return torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt file: name it
        raise UsageError(f"cannot read {safe if safe.is_file() else pickled} ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'corrupt'}); "
                         "resume from another checkpoint") from None
    raise UsageError(f"{folder} holds no model weights ({SAFE_WEIGHTS}); resume from another checkpoint")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict[str, Any],
                    config: TrainConfig, total_limit: int | None) -> Path:
    """Write checkpoint-`step` (all processes call this), then drop the oldest beyond `total_limit`."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    if accelerator.is_main_process:
        config.save(staging / CONFIG_FILE)
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        replace_path(staging, final)
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore weights, EMA, optimizer, LR schedule and random states; return the saved training state
    (empty for checkpoints written by train_unconditional.py, which keep only the step in the name)."""
    accelerator.load_state(str(path))
    state_file = path / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def checkpoint_unet_config(path: Path) -> dict[str, Any] | None:
    config_file = path / "unet" / "config.json"
    return json.loads(config_file.read_text()) if config_file.is_file() else None


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings of a UNet config that differ, as 'name: saved -> current'."""
    keys = sorted(k for k in set(saved) | set(current) if not k.startswith("_"))
    normalise = lambda value: list(value) if isinstance(value, tuple) else value  # noqa: E731 - JSON has no tuples
    return [f"{key}: {saved.get(key)} -> {current.get(key)}" for key in keys
            if key in saved and key in current and normalise(saved[key]) != normalise(current[key])]


# ---------------------------------------------------------------------------------------------- export


def export_pipeline(unet: UNet2DModel, noise_scheduler: DDPMScheduler, output_dir: Path) -> None:
    """Write the diffusers pipeline folder (model_index.json, unet/, scheduler/) that
    DiffusionPipeline.from_pretrained(output_dir) loads. Staged, then moved into place item by item."""
    staging = output_dir / ".tmp-export"
    if staging.exists():
        shutil.rmtree(staging)
    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(str(staging))
    for name in PIPELINE_ITEMS:
        replace_path(staging / name, output_dir / name)
    shutil.rmtree(staging)


def replace_path(source: Path, destination: Path) -> None:
    """Move `source` to `destination`, replacing it; the old one is renamed away before it is deleted."""
    if destination.exists():
        trash = destination.with_name(f".tmp-old-{destination.name}")
        if trash.exists():
            shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
        os.replace(destination, trash)
        os.replace(source, destination)
        shutil.rmtree(trash) if trash.is_dir() else trash.unlink()
    else:
        os.replace(source, destination)
