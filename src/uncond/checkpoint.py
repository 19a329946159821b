"""What is written to disk: resumable training state (checkpoint-N/) and the exported pipeline.

A checkpoint is accelerate's state (optimizer, LR schedule, random states, all read with
weights_only=True; under FSDP also the gathered weights) plus the UNet and its EMA in diffusers format
(unet/, unet_ema/), laid out as train_unconditional.py lays them out, so its checkpoints resume here too.
Everything is written to a hidden temporary folder with a manifest (every file's size and SHA-256), flushed
to disk, and renamed into place when complete: a folder named checkpoint-N is whole, and a damaged one is
recognised (by size when listing, by hash when loading) instead of crashing the resume.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from . import environment, manifest, models, sampling, sharding, signals
from .config import (CHECKPOINT_NAME, EMA_CLOCK_START_KEY, EMA_LAST_UPDATE_KEY, RUN_CONFIG_FILE, STAGING_PREFIX,
                     STATE_FILE, RunFailed, TrainConfig, UsageError, first_line, list_checkpoints, same_place)
from .manifest import MANIFEST_FILE, write_manifest

logger = logging.getLogger("uncond")

# Settings a checkpoint can only be resumed with unchanged (the UNet's own config is compared too).
RESUME_MUST_MATCH = ("resolution", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule", "ddpm_beta_start",
                     "ddpm_beta_end", "rescale_betas_zero_snr")
# The training images: a checkpoint found in --output_dir is resumed only on the same ones, unless asked for.
DATA_KEYS = ("dataset_name", "dataset_config_name", "train_data_dir")
SAME_RUN_KEYS = RESUME_MUST_MATCH + DATA_KEYS + ("model_preset", "model_config_name_or_path",
                                                 "pretrained_model_name_or_path", "num_channels")
# How the training goes on, which a resume takes from its own command (the optimizer's and EMA's included, over
# what the checkpoint's state holds): said when it differs from the checkpoint's run.
CHANGEABLE_ON_RESUME = ("train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler",
                        "lr_warmup_steps", "lr_step_rules", "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2",
                        "adam_weight_decay", "adam_epsilon", "max_grad_norm", "skip_nonfinite", "mixed_precision",
                        "snr_gamma", "noise_offset", "random_flip", "center_crop", "checkpoints_total_limit",
                        "keep_checkpoints_every")
EMA_KEYS = ("ema_max_decay", "ema_inv_gamma", "ema_power", "ema_update_every")
PIPELINE_ITEMS = ("unet", "scheduler", "model_index.json", STATE_FILE)
SAFE_WEIGHTS = "diffusion_pytorch_model.safetensors"
# What EMAModel.save_pretrained writes into unet_ema/config.json besides the UNet's own settings.
EMA_STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                  "power")


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in list_checkpoints(output_dir) if checkpoint_problem(path) is None]


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, by a cheap look (names and sizes), or None.

    Ours carry a manifest; train_unconditional.py's have none and are accepted when their files are there.
    """
    try:
        files = manifest.listed_files(path)
    except ValueError as error:
        return str(error)
    if files is None:
        if (path / "unet").is_dir() and (path / "optimizer.bin").is_file():
            return None
        return "no manifest (an interrupted write?)"
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
    return None


def verify_checkpoint(path: Path) -> None:
    """Check every file against the manifest's SHA-256; a damaged one is named."""
    damaged = manifest.changed_file(path)
    if damaged:
        raise UsageError(f"checkpoint file {path / damaged} is corrupted (its SHA-256 differs from "
                         f"{MANIFEST_FILE}); {instead_of_damaged(path)}")


def instead_of_damaged(path: Path) -> str:
    """What to do about damaged checkpoint `path`: go back to the newest complete one before it, if any."""
    step = int(match.group(1)) if (match := CHECKPOINT_NAME.match(path.name)) else -1
    earlier = [earlier.name for earlier_step, earlier in complete_checkpoints(path.parent) if earlier_step < step]
    if earlier:
        return f"delete {path} (or move it away) to resume from {earlier[-1]}"
    return ("no complete checkpoint comes before it: pass --overwrite_output_dir to start afresh (the run's "
            "exported pipeline, if any, is kept aside until the new run saves)")


def open_as_umask_allows(folder: Path) -> None:
    """Give the files below `folder` that were made private (0600: safetensors 0.8 writes its files through a
    temporary file, which is) the mode the umask gives a new file, as every other file of a run has: on a
    shared machine, people who may read the run's folder could not load its model."""
    probe = folder / ".mode-probe"
    probe.touch()
    usual = probe.stat().st_mode & 0o777
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 != usual:
            path.chmod(usual)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder below `folder` to the disk, so a rename after it never points at
    data still in the page cache (a power cut would otherwise leave empty files behind)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [folder]:
        fsync_path(path)


def fsync_path(path: Path) -> None:
    """Flush one file, or one folder's entries (after a rename into it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove(path: Path) -> None:
    """A file or folder removed; a symlink as a link only (what it points to, perhaps outside the output folder,
    is not the run's)."""
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ---------------------------------------------------------------------------------------------- state


def register_state_hooks(accelerator: Accelerator, unet: torch.nn.Module, ema: EMAModel | None) -> None:
    """Make accelerator.save_state/load_state write the UNet (and its EMA) as diffusers folders.

    Under FSDP accelerate writes and reads the weights and optimizer itself (gathered whole on the main
    process: pytorch_model_fsdp.bin, optimizer.bin, which any process count can load); the hooks add the
    diffusers folders, gathered from the shards, and restore the EMA from unet_ema/."""
    plain = accelerator.unwrap_model(unet, keep_torch_compile=False)
    sharded = sharding.is_sharded(plain)

    def save_hook(prepared: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        # Under FSDP every process joins the gathers; the main process gets the copies, on the CPU.
        trained = sharding.gathered_copy(plain, everywhere=False) if sharded else plain
        averaged = None
        if ema is not None and sharded:
            with models.ema_weights(plain, ema) as swapped:
                averaged = sharding.gathered_copy(swapped, everywhere=False)
        if averaged is not None:
            averaged.register_to_config(**{key: value for key, value in ema.state_dict().items()
                                           if key in EMA_STATE_KEYS})  # as EMAModel.save_pretrained does
        if accelerator.is_main_process:
            trained.save_pretrained(os.path.join(output_dir, "unet"))
            if averaged is not None:
                averaged.save_pretrained(os.path.join(output_dir, "unet_ema"))
            elif ema is not None:
                ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        weights.clear()  # written above; accelerate must not write them again (under FSDP it wrote none)

    def load_hook(prepared: list[torch.nn.Module], input_dir: str) -> None:
        trained = None
        if not sharded:  # under FSDP accelerate has loaded the weights already, and passes no models
            prepared.pop()
            trained = read_weights(Path(input_dir) / "unet")
            plain.load_state_dict(trained)
        if ema is not None:
            ema_dir = Path(input_dir) / "unet_ema"
            # A checkpoint of a run without EMA starts the average from the trained weights.
            averaged = read_weights(ema_dir) if ema_dir.is_dir() else trained or read_weights(Path(input_dir) / "unet")
            saved = json.loads((ema_dir / "config.json").read_text()) if ema_dir.is_dir() else {}
            # Only how far the average has come: its decay settings are this run's (--ema_max_decay,
            # --ema_inv_gamma, --ema_power), as its --learning_rate is; EMAModel.load_state_dict would put
            # back the checkpoint's.
            names, parameters = zip(*plain.named_parameters())
            shadow = sharding.local_shards(parameters, [averaged[name] for name in names])
            updates = saved.get("optimization_step", 0)
            ema.load_state_dict({"optimization_step": updates, "shadow_params": shadow})
            if isinstance(ema, models.EMA):
                ema.last_update_step, ema.clock_start = ema_clock(Path(input_dir), updates, ema_dir.is_dir())
            ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def ema_clock(path: Path, saved_updates: int, has_average: bool) -> tuple[int, int]:
    """The steps of checkpoint `path`'s EMA (models.EMA): of its last update, and the one its warmup counts from.
    Whatever --ema_update_every the resumed run has, its next update, and exports before it, count the decay of
    every step since the saved run's last update (from step 5 for one updated every 4 and resumed at step 7 with
    3, not 7: the average's share jumped from 0.40 to 0.61; trial 60 F6), on the saved warmup's clock (the update
    at step 9 took step 6's decay; trial 58 F5). A checkpoint without EMA (`has_average` False): the average
    starts at its step, where its warmup starts too (a resumed run's export was 2.5 % EMA right after an update,
    its last update counted in updates since; trial 67 F1). Checkpoints of earlier uncond and
    train_unconditional.py's record neither: their updates came at the multiples of their interval, and their
    count, `saved_updates`, ran on the warmup's clock."""
    state = read_training_state(path)
    step = checkpoint_step(path, state)
    if not has_average:
        return step, step
    last_update, clock_start = state.get(EMA_LAST_UPDATE_KEY), state.get(EMA_CLOCK_START_KEY)
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in (last_update, clock_start)):
        saved_every = saved_run_config(path).get("ema_update_every", 1)
        last_update = step // saved_every * saved_every
        clock_start = max(0, last_update - saved_updates * saved_every)
    return last_update, clock_start


def written_by_fsdp(path: Path) -> bool:
    """Whether checkpoint `path` was written under FSDP (its optimizer state is keyed by parameter name)."""
    return bool(read_training_state(path).get("fsdp"))


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
                         f"{first_line(error)}); resume from another checkpoint") from None
    raise UsageError(f"{folder} holds no model weights ({SAFE_WEIGHTS}); resume from another checkpoint")


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, state: dict[str, Any],
                    config: TrainConfig, total_limit: int | None) -> tuple[Path, list[str]]:
    """Write checkpoint-`step` (all processes call this), then drop the oldest beyond `total_limit`, except the
    milestones of --keep_checkpoints_every. Returns the checkpoint and the names of those dropped (on the main
    process).

    A failed write (a full disk, say) removes what it wrote and leaves the earlier checkpoints as they were.
    """
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"{STAGING_PREFIX}checkpoint-{step}"

    def clear_staging() -> None:  # left by a run killed while saving
        if accelerator.is_main_process and staging.exists():
            remove(staging)

    def write_run_files() -> None:  # the main process's; the checkpoint-N name once all is on disk
        if accelerator.is_main_process:
            config.save(staging / RUN_CONFIG_FILE)
            (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            write_manifest(staging, step)
            open_as_umask_allows(staging)
            fsync_tree(staging)
            replace_path(staging, final)
            fsync_path(output_dir)

    try:
        for write in (clear_staging, lambda: accelerator.save_state(str(staging)), write_run_files):
            failure = None
            try:
                write()
            except Exception as error:  # noqa: BLE001 - OSError, or a library's own error wrapping one (safetensors)
                failure = write_error(error)
            # every process stops if one failed (a full disk is often the main process's alone)
            if failure := environment.failure_anywhere(failure):
                previous = complete_checkpoints(output_dir)
                kept = f"{previous[-1][1].name} is intact" if previous else "no earlier checkpoint exists"
                raise RunFailed(f"could not write {final.name} ({failure}); {kept}; free some space and re-run the "
                                "same command to resume")
    except BaseException as error:
        # Not left half-written for the next run to find: the main process removes it also where the exchange
        # with a process that ended failed (trial 66 F4: 1.7 GB stayed in a folder the failed run had made).
        if (isinstance(error, RunFailed) or accelerator.is_main_process) and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dropped = []
    if accelerator.is_main_process and total_limit is not None:
        for old_step, old in complete_checkpoints(output_dir)[:-total_limit]:
            if not milestone(old, old_step, config.keep_checkpoints_every):
                # renamed first: a kill while deleting leaves a name the next run removes, not a damaged
                # checkpoint it would keep as incomplete-checkpoint-N (a preempted job gathered them)
                doomed = old.with_name(f"{STAGING_PREFIX}dropped-{old.name}")
                if doomed.exists():
                    remove(doomed)
                os.replace(old, doomed)
                remove(doomed)
                dropped.append(old.name)
    accelerator.wait_for_everyone()
    return final, dropped


def milestone(path: Path, step: int, every: int | None) -> bool:
    """Whether checkpoint `path` is spared by --checkpoints_total_limit: its step is a multiple of this run's
    --keep_checkpoints_every, or of the one its own run had. A milestone stays one: a resume that leaves the flag
    out, or changes it, does not remove what the earlier run kept."""
    return any(n and step % n == 0 for n in (every, saved_run_config(path).get("keep_checkpoints_every")))


def write_error(error: Exception) -> str:
    """A failed write in a few words: 'No space left on device', not a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = first_line(error)
    if "os error 28" in text:  # safetensors' Rust error
        return os.strerror(errno.ENOSPC)
    if "unexpected pos" in text:  # torch.save's writer on a short write: "[enforce fail at inline_container.cc..."
        return f"{os.strerror(errno.ENOSPC)}, or a disk quota reached (torch.save wrote less than it was given)"
    return text


def load_checkpoint(accelerator: Accelerator, path: Path) -> None:
    """Restore weights, EMA, optimizer, LR schedule and random states (the place in training:
    read_training_state)."""
    verify_checkpoint(path)
    try:
        # said although it is accelerate's default: a checkpoint may come from anywhere (random states and the
        # loss scaler are read with that default; tests/test_train.py poisons each kind of file)
        # (a stop inside it, in safetensors' read of the weights (read_weights), came out as a library's error:
        # "cannot read ...; resume from another checkpoint")
        with signals.deferred():
            accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except UsageError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever accelerate or torch raise: name the checkpoint
        reason = first_line(error)
        raise UsageError(f"cannot resume from {path} ({type(error).__name__}: {reason}); "
                         f"{instead_of_damaged(path)}") from None


def read_training_state(path: Path) -> dict[str, Any]:
    """A checkpoint's training_state.json (empty for checkpoints written by train_unconditional.py, which keep
    only the step, in the name)."""
    state_file = path / STATE_FILE
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def run_complete(output_dir: Path, step: int, total_steps: int) -> bool:
    """Whether the run in `output_dir`, at `step` of its `total_steps`, is complete: its end is exported, whole
    (the same command run again trains nothing and exports nothing; train and its --dry_run both ask this)."""
    return step >= total_steps and exported_step(output_dir) == step


def exported_step(output_dir: Path) -> int | None:
    """The step of the pipeline exported in `output_dir`, where it is whole: a folder whose model_index.json, UNet
    or scheduler was removed, emptied or cut short (a copy in part) holds no pipeline, whatever its
    training_state.json says (trial 57 F1, trial 58 F3). Exports have no manifest: the configs are read, and the
    weights' header is checked against their length by safetensors, not hashed (an export can be gigabytes)."""
    configs = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json")
    weights = output_dir / "unet" / SAFE_WEIGHTS
    whole = all(json_file(output_dir / name) for name in configs) and safetensors_whole(weights)
    return read_training_state(output_dir).get("step") if whole else None


def json_file(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def safetensors_whole(path: Path) -> bool:
    """Whether safetensors opens the file: its header reads and the tensors' bytes cover the file exactly, no
    more and no less (safe_open maps the file and reads no tensor)."""
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (OSError, SafetensorError):
        return False


def checkpoint_step(path: Path, state: dict[str, Any]) -> int:
    """The step of checkpoint `path` whose training state is `state`: the state's, else the one in the name of
    train_unconditional.py's checkpoints, which keep it there only."""
    return state.get("step", int(path.name.split("-")[-1]))


def saved_run_config(path: Path) -> dict[str, Any]:
    """The settings of the run that wrote checkpoint `path` (empty for train_unconditional.py's checkpoints)."""
    saved_file = path / RUN_CONFIG_FILE
    return json.loads(saved_file.read_text()) if saved_file.is_file() else {}


def resume_differences(path: Path, config: TrainConfig, unet_config: dict[str, Any]) -> list[str]:
    """What differs between the run that wrote `path` and this one, in what a resume cannot change."""
    differences = config_differences(checkpoint_unet_config(path) or {}, unet_config)
    saved, current = saved_run_config(path), config.to_dict()
    differences += [f"{key}: {saved[key]} -> {current[key]}" for key in RESUME_MUST_MATCH
                    if key in saved and saved[key] != current[key]]
    return sorted(set(differences))


def kept_ema(path: Path) -> bool:
    """Whether the run that wrote checkpoint `path` kept an EMA of the weights (sampling.kept_ema)."""
    return sampling.kept_ema(path, saved_run_config(path))


def resume_notes(path: Path, config: TrainConfig, state: dict[str, Any]) -> list[str]:
    """What a resume from `path` changes that it may change, to be said: the seed, the EMA on or off, and the
    settings of CHANGEABLE_ON_RESUME."""
    saved = saved_run_config(path)
    notes = []
    saved_seed = state.get("seed", saved.get("seed"))
    if config.seed is not None and saved_seed is not None and config.seed != saved_seed:
        notes.append(f"--seed {config.seed}: {path.name}'s run used seed {saved_seed}; its data order, crops and "
                     f"noise follow seed {config.seed} from here (leave --seed out to keep {saved_seed})")
    had_ema = kept_ema(path)
    if had_ema and not config.use_ema:
        notes.append(f"--no-use_ema: the EMA of the weights that {path.name}'s run kept is dropped; exports hold "
                     "the trained weights")
    elif not had_ema and config.use_ema:
        notes.append(f"--use_ema: {path.name}'s run had no EMA; it starts here from the checkpoint's weights")
    changed = changed_settings(saved, config, CHANGEABLE_ON_RESUME + EMA_KEYS * config.use_ema)
    if changed:
        notes.append(f"{path.name}'s run had other settings; this run's apply from its next step: {', '.join(changed)}")
    if config.streaming:  # replaying it would read everything read before again
        notes.append(f"--streaming: the stream is read afresh from step {state.get('step', '?')}, in a new shuffle; "
                     "the images of the steps before are not replayed")
    return notes


# What a complete run's export and last grid show of its settings (the model card's facts, the grid's sampling)
SHOWN_BY_AN_EXPORT = CHANGEABLE_ON_RESUME + EMA_KEYS + ("use_ema", "seed", "sampler", "sample_steps",
                                                        "ddpm_num_inference_steps", "eval_batch_size")


def settings_unlike(path: Path, config: TrainConfig) -> list[str]:
    """The settings of SHOWN_BY_AN_EXPORT that `config` gives otherwise than the run that wrote checkpoint `path`;
    a seed left out keeps the run's."""
    keys = tuple(key for key in SHOWN_BY_AN_EXPORT if key != "seed" or config.seed is not None)
    return changed_settings(saved_run_config(path), config, keys)


def changed_settings(saved: dict[str, Any], config: TrainConfig, keys: tuple[str, ...]) -> list[str]:
    """Of `keys`, the settings `config` gives otherwise than a run's `saved` ones: 'name saved -> current'."""
    current = config.to_dict()
    return [f"{key} {saved[key]} -> {current[key]}" for key in keys if key in saved and saved[key] != current[key]]


def data_differences(path: Path, config: TrainConfig) -> list[str]:
    """Where the images of the run that wrote `path` came from, if not from where this run's come."""
    saved, current = saved_run_config(path), config.to_dict()
    return [f"{key}: {saved[key] or 'none'} -> {current[key] or 'none'}" for key in DATA_KEYS
            if key in saved and not same_place(saved[key], current[key])]


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


def export_pipeline(unet: UNet2DModel, noise_scheduler: DDPMScheduler, output_dir: Path,
                    state: dict[str, Any]) -> None:
    """Write the diffusers pipeline folder (model_index.json, unet/, scheduler/) that
    DiffusionPipeline.from_pretrained(output_dir) loads, with the training state it was exported at.
    Staged, then moved into place item by item."""
    staging = output_dir / f"{STAGING_PREFIX}export"
    try:
        if staging.exists():
            remove(staging)
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(str(staging))
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        open_as_umask_allows(staging)
        fsync_tree(staging)
    except Exception as error:  # noqa: BLE001 - as in save_checkpoint
        shutil.rmtree(staging, ignore_errors=True)
        raise RunFailed(f"could not export the pipeline to {output_dir} ({write_error(error)}); the previous "
                        "export is intact; free some space and re-run the same command to resume") from None
    # model_index.json out first and in last: a kill between leaves a folder no loader takes for a model, never
    # the new UNet beside the old training state (the next run puts back what was moved aside, and exports again
    # as it reaches this step)
    index = output_dir / "model_index.json"
    old_index = index.with_name(f"{STAGING_PREFIX}old-{index.name}")
    if index.exists():
        os.replace(index, old_index)
    for name in sorted(PIPELINE_ITEMS, key=lambda name: name == "model_index.json"):
        replace_path(staging / name, output_dir / name)
    if old_index.exists():
        remove(old_index)
    remove(staging)


def replace_path(source: Path, destination: Path) -> None:
    """Move `source` to `destination`, replacing it. The old one is renamed away first and deleted after;
    a kill between the two renames is undone by run_folder.clean_up_interrupted_writes."""
    if destination.exists():
        old = destination.with_name(f"{STAGING_PREFIX}old-{destination.name}")
        if old.exists():
            remove(old)
        os.replace(destination, old)
        os.replace(source, destination)
        remove(old)
    else:
        os.replace(source, destination)
