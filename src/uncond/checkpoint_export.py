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

from . import cache, checkpoint, hub, run_folder, sampling, tracking
from .config import (CHECKPOINT_NAME, EMA_CLOCK_START_KEY, EMA_LAST_UPDATE_KEY, EMA_SHARE_KEY, RUN_CONFIG_FILE,
                     ExportConfig, TrainConfig, UsageError, check_utf8_path, counted, list_checkpoints)
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
    # (an export named checkpoint-N was said to be an incomplete checkpoint; trial 67 F3)
    if not (CHECKPOINT_NAME.match(folder.name) and sampling.is_checkpoint(folder)
            and (seed_script or (folder / RUN_CONFIG_FILE).is_file())):
        raise UsageError(f"{config.checkpoint}: not a training checkpoint (a run's checkpoint-N folder, holding "
                         f"{RUN_CONFIG_FILE}); a pipeline folder is a model already")
    problem = checkpoint.checkpoint_problem(folder)
    if problem:
        raise UsageError(f"{config.checkpoint}: the checkpoint is incomplete ({problem}); export another one")
    output_dir = Path(config.output_dir)
    check_utf8_path("--output_dir", output_dir)
    # (a read-only one, a link to nothing or a loop of links gave a traceback, or a folder made elsewhere: trial 64 F4)
    run_folder.check_creatable(str(output_dir), "--output_dir")
    final = output_dir.resolve()  # a link's target
    remove_dead_exports(final)  # first: the folder a killed export left is checked as it was before that export
    check_export_folder(output_dir, config.overwrite_output_dir)
    model = sampling.load_model(str(source), torch.device("cpu"), torch.float32)
    # Written whole into a folder beside it, then moved in: half an export would pass for a model (its pipeline
    # loads, its state says finished), and one that fails or is killed keeps the export it was to replace.
    created = run_folder.highest_missing(final)
    run_folder.make_folder(final, "--output_dir")
    staging = final.parent / f".{final.name}{EXPORTING}{os.getpid()}"
    try:
        staging.mkdir()
        if seed_script:
            step = export_seed_checkpoint(model, folder, staging)
        else:
            step = write_export(model, folder, staging, config.checkpoint, output_dir)
        checkpoint.fsync_tree(staging)
        if any(final.iterdir()) and not config.overwrite_output_dir:  # another export's, written meanwhile
            raise UsageError(f"--output_dir {output_dir}: another export wrote a model there meanwhile; pass "
                             "--overwrite_output_dir to replace it, or choose another --output_dir")
        move_in(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        run_folder.remove_made_folders(final, created)
        raise
    trained = f"trained {counted(step, 'step')}{' by train_unconditional.py' if seed_script else ''}"
    only = "; the pipeline only: that script records no settings or metrics for a model card" if seed_script else ""
    logger.info(f"exported {model.description}, {trained}, to {output_dir} "
                f"(DiffusionPipeline.from_pretrained({str(output_dir)!r})){only}")
    return output_dir


def move_in(staging: Path, final: Path) -> None:
    """The export in `staging` in place of what `final` holds (an earlier export's items), item by item, the folder
    itself kept (a shell's working folder, `--output_dir .`). model_index.json goes out first and comes in last, so
    a kill between leaves a folder that no loader takes for a model; the earlier items wait beside it until then."""
    replaced = final.parent / f".{final.name}{REPLACED}{os.getpid()}"
    replaced.mkdir(exist_ok=True)
    for path in sorted(final.iterdir(), key=lambda path: path.name != "model_index.json"):
        os.rename(path, replaced / path.name)
    for path in sorted(staging.iterdir(), key=lambda path: path.name == "model_index.json"):
        os.rename(path, final / path.name)
    staging.rmdir()
    shutil.rmtree(replaced)


def remove_dead_exports(final: Path) -> None:
    """What exports into `final` killed before their end left beside it: their unfinished folders, and the
    earlier export's items they had moved aside, put back where the folder holds no model (the items of the new
    one moved in before the kill removed: a mix of the two would be neither). Only an export's own items are
    removed: a file the user put there since stays, for check_export_folder to name."""
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, pid = path.name[len(final.name) + 1:].rpartition("-")
        if f"{kind}-" not in (EXPORTING, REPLACED) or not pid.isdigit() or cache.process_alive(int(pid)):
            continue
        if f"{kind}-" == REPLACED and final.is_dir() and not (final / "model_index.json").exists():
            for item in final.iterdir():
                if item.name in (*checkpoint.PIPELINE_ITEMS, *RUN_FILES):
                    checkpoint.remove(item)
            for item in path.iterdir():
                if not (final / item.name).exists():
                    os.rename(item, final / item.name)
        shutil.rmtree(path, ignore_errors=True)


def write_export(model: sampling.Model, folder: Path, output_dir: Path, exported_from: str, shown_as: Path) -> int:
    """Checkpoint `folder` of uncond's, into `output_dir`, as its run's export would be: the pipeline, its settings,
    model card, metrics, loss plot and grid; `shown_as`, the folder it is moved to once written. Returns its step."""
    settings = checkpoint.saved_run_config(folder)
    run_config = TrainConfig(**{spec.name: settings[spec.name] for spec in fields(TrainConfig)
                                if spec.name in settings})  # the settings that trained it, for its model card
    # finished: the model as it is, not an intermediate export that a run of these settings would start again
    state = {**checkpoint.read_training_state(folder), "finished": True, "exported_from": folder.name}
    # a checkpoint's EMA state: the weights exported are the model of the step, blended
    for key in (EMA_SHARE_KEY, EMA_LAST_UPDATE_KEY, EMA_CLOCK_START_KEY):
        state.pop(key, None)
    step = state["step"] = checkpoint.checkpoint_step(folder, state)
    run = folder.parent
    checkpoint.export_pipeline(model.unet, DDPMScheduler.from_config(model.scheduler_config), output_dir, state)
    # Its own folder as output_dir, as a run's record names its own: passed back with --config, it is this model's
    # settings (a run into it is refused as into any trained model), not a run that goes on in the source's folder.
    exported_settings = {**settings, "output_dir": os.path.abspath(shown_as)}  # as a run's record names its own
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
    return step


def export_seed_checkpoint(model: sampling.Model, folder: Path, output_dir: Path) -> int:
    """A train_unconditional.py checkpoint as the pipeline that script exports (its EMA weights where it kept an
    EMA, the schedule of its run's pipeline): no settings, card or metrics, which it does not record. Returns its
    step."""
    step = checkpoint.checkpoint_step(folder, {})
    checkpoint.export_pipeline(model.unet, DDPMScheduler.from_config(model.scheduler_config), output_dir,
                               {"step": step, "finished": True, "exported_from": folder.name})
    return step


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
    previews = output_dir / run_folder.PREVIEWS_DIR  # replaced whole: it must hold the export's grid alone
    if previews.is_dir():
        grids = {path for _, path in run_folder.preview_grids(output_dir)}
        others += [f"{previews.name}/{path.name}" for path in sorted(previews.iterdir()) if path not in grids]
    readme = output_dir / hub.CARD_FILE
    if readme.is_file() and not hub.written_by_uncond(readme):
        others.append(hub.CARD_FILE)
    if others or not (output_dir / "model_index.json").is_file():
        raise UsageError(f"--output_dir {output_dir} holds {', '.join(others or found)}, which no export wrote; move "
                         "them, or choose another --output_dir")
