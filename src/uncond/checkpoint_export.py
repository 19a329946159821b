"""`uncond export`: a training checkpoint as a pipeline folder, for a run whose best model is not its last one
(picked by its sample grids or by `uncond evaluate` of its checkpoints). The folder is what a run's export is:
the pipeline, its training state and settings, its model card, loss plot, metrics and the grid of its step."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import fields
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from . import checkpoint, hub, run_folder, sampling, tracking
from .config import (CHECKPOINT_NAME, RUN_CONFIG_FILE, ExportConfig, TrainConfig, UsageError, counted,
                     list_checkpoints)
from .outputs import write_card_of

logger = logging.getLogger("uncond")

EXPORTING, REPLACED = ".exporting-", ".replaced-"  # beside the export's folder: its next one, its last one

# What an export writes beside the pipeline (checkpoint.PIPELINE_ITEMS): the run's files of the step
RUN_FILES = (RUN_CONFIG_FILE, hub.CARD_FILE, tracking.METRICS_FILE, tracking.LOSS_PLOT_FILE, run_folder.PREVIEWS_DIR)


def export_checkpoint(config: ExportConfig) -> Path:
    """Write checkpoint `config.checkpoint` (or its unet/) as a pipeline folder at `config.output_dir`."""
    source = Path(config.checkpoint).expanduser()
    if not source.is_dir():
        raise UsageError(f"{config.checkpoint}: no such folder")
    source = source.resolve()  # `.` in a checkpoint's folder
    weights = source.name if source.name in sampling.CHECKPOINT_WEIGHTS else None
    folder = source.parent if weights else source
    seed_script = sampling.is_checkpoint(folder) and not (folder / RUN_CONFIG_FILE).is_file()
    if seed_script and not sampling.has_noise_schedule(folder):
        raise UsageError(f"{config.checkpoint}: cannot be exported{sampling.not_a_pipeline_hint(folder)}")
    if not (CHECKPOINT_NAME.match(folder.name) and (seed_script or (folder / RUN_CONFIG_FILE).is_file())):
        raise UsageError(f"{config.checkpoint}: not a training checkpoint (a run's checkpoint-N folder, holding "
                         f"{RUN_CONFIG_FILE}); a pipeline folder is a model already")
    problem = checkpoint.checkpoint_problem(folder)
    if problem:
        raise UsageError(f"{config.checkpoint}: the checkpoint is incomplete ({problem}); export another one")
    output_dir = Path(config.output_dir)
    check_export_folder(output_dir, config.overwrite_output_dir)
    model = sampling.load_model(str(source), torch.device("cpu"), torch.float32)
    # Written whole into a folder beside it, then renamed into place: half an export would pass for a model (its
    # pipeline loads, its state says finished), and one that fails or is killed keeps the export it was to replace.
    final = output_dir.resolve()  # a link's target, which is replaced
    created = run_folder.highest_missing(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}{EXPORTING}{os.getpid()}"
    replaced = final.parent / f".{final.name}{REPLACED}{os.getpid()}"
    try:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        if seed_script:
            export_seed_checkpoint(model, folder, staging)
        else:
            write_export(model, folder, staging, config.checkpoint, output_dir)
        checkpoint.fsync_tree(staging)
        if final.exists():  # --overwrite_output_dir: an earlier export's folder (check_export_folder)
            os.rename(final, replaced)
            os.rename(staging, final)
            shutil.rmtree(replaced)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if replaced.exists() and not final.exists():  # between the two renames
            os.rename(replaced, final)
        if created is not None:  # the folders above it that this export made
            shutil.rmtree(created, ignore_errors=True)
        raise
    step = checkpoint.checkpoint_step(folder, checkpoint.read_training_state(folder))
    trained = f"trained {counted(step, 'step')}{' by train_unconditional.py' if seed_script else ''}"
    only = "; the pipeline only: that script records no settings or metrics for a model card" if seed_script else ""
    logger.info(f"exported {model.description}, {trained}, to {output_dir} "
                f"(DiffusionPipeline.from_pretrained({str(output_dir)!r})){only}")
    return output_dir


def write_export(model: sampling.Model, folder: Path, output_dir: Path, exported_from: str, shown_as: Path) -> None:
    """Checkpoint `folder` of uncond's, into `output_dir`, as its run's export would be: the pipeline, its settings,
    model card, metrics, loss plot and grid; `shown_as`, the folder it is moved to once written."""
    settings = checkpoint.saved_run_config(folder)
    run_config = TrainConfig(**{spec.name: settings[spec.name] for spec in fields(TrainConfig)
                                if spec.name in settings})  # the settings that trained it, for its model card
    # finished: the model as it is, not an intermediate export that a run of these settings would start again
    state = {**checkpoint.read_training_state(folder), "finished": True, "exported_from": folder.name}
    step = state["step"] = checkpoint.checkpoint_step(folder, state)
    run = folder.parent
    checkpoint.export_pipeline(model.unet, DDPMScheduler.from_config(model.scheduler_config), output_dir, state)
    # Its own folder as output_dir, as a run's record names its own: passed back with --config, it is this model's
    # settings (a run into it is refused as into any trained model), not a run that goes on in the source's folder.
    exported_settings = {**settings, "output_dir": str(shown_as)}
    (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(exported_settings, indent=2) + "\n")
    records = metrics_up_to(run, step)
    if records:
        tracking.write_metrics(output_dir / tracking.METRICS_FILE, records)
        tracking.plot_metrics(records, output_dir / tracking.LOSS_PLOT_FILE)
    grid = run_folder.preview_path(run, step)
    if grid.is_file():  # the model card shows it
        run_folder.preview_path(output_dir, step).parent.mkdir(exist_ok=True)
        shutil.copy2(grid, run_folder.preview_path(output_dir, step))
    write_card_of(output_dir, run_config, state, model.unet, model.scheduler_config, records,
                  exported_from=exported_from, shown_as=shown_as)


def export_seed_checkpoint(model: sampling.Model, folder: Path, output_dir: Path) -> None:
    """A train_unconditional.py checkpoint as the pipeline that script exports (its EMA weights where it kept an
    EMA, the schedule of its run's pipeline): no settings, card or metrics, which it does not record."""
    step = checkpoint.checkpoint_step(folder, {})
    checkpoint.export_pipeline(model.unet, DDPMScheduler.from_config(model.scheduler_config), output_dir,
                               {"step": step, "finished": True, "exported_from": folder.name})


def metrics_up_to(run: Path, step: int) -> list[dict]:
    """The metrics logged up to `step` by the run whose checkpoints are in `run`. A branch that a run left when it
    went back to step N (run_folder.set_aside_later_checkpoints) holds only the lines after N: those up to N are
    in the run's own file. (A branch left before another go-back to an earlier step misses the lines between.)"""
    records = [record for record in tracking.read_metrics(run / tracking.METRICS_FILE) if record.get("step", 0) <= step]
    branch = re.match(rf"{re.escape(run_folder.ABANDONED_PREFIX)}(\d+)", run.name)
    if branch:
        branch_point = int(branch[1])
        records = [record for record in tracking.read_metrics(run.parent / tracking.METRICS_FILE)
                   if record.get("step", 0) <= branch_point] + records
    return records


def check_export_folder(output_dir: Path, overwrite: bool) -> None:
    """A new or empty folder; with --overwrite_output_dir, one an export wrote. Never a training run's folder (its
    checkpoints, its own export) or files of the user's."""
    run = next((folder for folder in output_dir.resolve().parents if (folder / RUN_CONFIG_FILE).is_file()), None)
    if run is not None:  # its runs would move, replace or rotate it away (run/best is --keep_best's)
        raise UsageError(f"--output_dir {output_dir} is inside the training run's folder {run}, whose runs would "
                         "replace or remove it; choose a folder outside it")
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file; choose a folder")
    if list_checkpoints(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a training run's folder (it has checkpoints); choose another "
                         "--output_dir")
    found = sorted(path.name for path in output_dir.iterdir())
    if not found:
        return
    if not overwrite:
        raise UsageError(f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to replace the model an "
                         "export wrote there, or choose another --output_dir")
    others = [name for name in found if name not in (*checkpoint.PIPELINE_ITEMS, *RUN_FILES)]
    readme = output_dir / hub.CARD_FILE
    if readme.is_file() and not hub.written_by_uncond(readme):
        others.append(hub.CARD_FILE)
    if others or not (output_dir / "model_index.json").is_file():
        raise UsageError(f"--output_dir {output_dir} holds {', '.join(others or found)}, which no export wrote; move "
                         "them, or choose another --output_dir")
