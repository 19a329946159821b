"""train(config): plan (plan.py checks everything cheap), build the parts, resume, and run one readable loop."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers import UNet2DModel
from tqdm import tqdm

from . import checkpoint, data, environment, hub, models, run_folder, sharding, signals, tracking
from .config import (EMA_CLOCK_START_KEY, EMA_LAST_UPDATE_KEY, EMA_SHARE_KEY, EVERY_MACHINE, RUN_CONFIG_FILE,
                     ProcessInUse, RunFailed, RunStopped, TrainConfig, UsageError, counted, first_line, public_argv)
from .objective import denoising_loss, sample_noise_and_timesteps
from .progress import progress_bar
from .monitoring import evaluate_run, open_feature_extractor, save_sample_grid
from .outputs import (Launch, commands_so_far, draw_loss_plot, export, reproduce_command, resuming_latest,
                      tracker_config)
from .parts import (Run, averaged_unet, build_run, drop_replaced_run, epoch_start_step, make_accelerator,
                    off_the_clock, on_main_process, resume, trained_precision, training_state)
from .plan import Plan, batch_description, check_processes, dry_run, global_batch, plan_run
from .step_graph import StepGraph
from .stopping import StopAgreement, StopSignal

logger = logging.getLogger("uncond")  # cli shows its records on the main process only
# One run at a time in a process: runs share its random generators and accelerate's state, so two in threads each
# trained other weights than alone, without a word (trial 59 F2).
ONE_RUN_AT_A_TIME = threading.Lock()

T = TypeVar("T")


def train(config: TrainConfig, explicit: set[str] | frozenset[str], command: list[str]) -> Path:
    """Train a UNet2DModel as the config says; returns the output folder holding the pipeline. `explicit`: the
    settings given (not defaults); `command`: the argument list the run was started with, for the model card."""
    if not ONE_RUN_AT_A_TIME.acquire(blocking=False):
        raise ProcessInUse("another uncond train is running in this process (in another thread); run them one "
                           "after the other, or each in its own process (`uncond train` in a shell, or a subprocess)")
    try:  # for a caller in the same process (a notebook)
        with environment.global_random_state_kept(), environment.backend_settings_kept(), \
                environment.accelerate_state_kept():
            return train_as_planned(plan_run(config, explicit), explicit, command)
    finally:
        ONE_RUN_AT_A_TIME.release()


def train_as_planned(plan: Plan, explicit: set[str] | frozenset[str], command: list[str]) -> Path:
    if plan.config.dry_run:
        dry_run(plan)
        return Path(plan.config.output_dir)
    output_dir = Path(plan.config.output_dir)
    accelerator = make_accelerator(plan.config, output_dir)
    check_processes(plan, accelerator)
    plan.config = settle_seed(plan, accelerator)
    config = plan.config
    # --push_to_hub: the repository is created before any heavy work (offline, not logged in, no write access),
    # and before anything is written into the output folder
    repo_id = on_main_process(accelerator, lambda: hub.create_repository(config)) if config.push_to_hub else None
    # Before the data: a folder that cannot be used, or a tracker that cannot start, says so at once.
    start = on_main_process(accelerator, lambda: prepare_output_dir(plan, output_dir))
    try:
        on_main_process(accelerator, lambda: init_trackers(config, accelerator, output_dir, plan.resume_step,
                                                           plan.tracker_run_id))
        trained, stop_signal = run_training(plan, accelerator, explicit, repo_id, command)
    except BaseException:
        # A run failing (unreadable images, Ctrl-C while decoding) before it saved anything leaves the folder as
        # it found it (run_folder.undo_unsaved_start).
        if accelerator.is_main_process:
            message = run_folder.undo_unsaved_start(output_dir, config.logging_dir, start)
            if message:
                logger.warning(message)
        raise
    else:
        exported = checkpoint.exported_step(output_dir) != start.export_step
        if not (trained or exported) and accelerator.is_main_process:
            # The run was complete: no step or export took this command's settings, so the folder keeps the record
            # of those its model was trained with. (A run ended early at its last checkpoint exports it: the record
            # is then of that command, so that passing it back says the run is complete.)
            start.put_back_settings(output_dir)
    finally:
        environment.give_back_freed_memory()  # kept for the run's steps (parts.build_run)
        run_folder.unlock_output_dir(output_dir)  # the run is over: the folder is free, in this process too
    if stop_signal is not None:
        raise RunStopped(stop_signal, agreed=True)  # at the same step on every process (StopAgreement)
    return output_dir


def run_training(plan: Plan, accelerator: Accelerator, explicit: set[str] | frozenset[str], repo_id: str | None,
                 command: list[str]) -> tuple[bool, int | None]:
    """The parts built, the checkpoint resumed, the loop run and the run's end said. Returns whether it trained
    any step, and the number of the signal that stopped it early (None if it ran to its end)."""
    config, output_dir = plan.config, Path(plan.config.output_dir)
    feature_extractor = open_feature_extractor(config, accelerator)  # before the data: a given file is checked
    run = build_run(plan, accelerator)  # SIGTERM while decoding keeps what was decoded (cli, data.build_cache)
    run.step_graph = step_graph(run)
    run.feature_extractor = feature_extractor
    run.repo_id = repo_id
    launch = Launch.of_this_run(accelerator.num_processes, sharding.is_sharded(run.unwrapped_unet))
    command_line, run.resume_command = this_runs_commands(config, explicit, command, launch)
    resume_step = run.resume_position.step if plan.resume_from is not None else run.step
    complete = already_complete(run, resume_step)
    if plan.resume_message and not complete:  # a complete run's line says only that (finish_complete_run)
        logger.info(plan.resume_message)
    if plan.resume_from is not None:
        resume(run, plan.resume_from, plan.resume_notes)
        settle_owed(run)
    run.tracker_run_id = plan.tracker_run_id
    run.commands = commands_so_far(plan.resume_state, run.step, command_line,
                                   environment.software_description(accelerator.device))
    first_step = run.step
    if accelerator.is_main_process:
        run.metrics_file = tracking.MetricsFile(output_dir, resume_step=run.step,
                                                evaluation_owed=run.evaluation_owed == run.step)
        run.best_fid = min((r["fid"] for r in run.metrics_file.read() if isinstance(r.get("fid"), (int, float))),
                           default=math.inf)
        if repo_id:
            run.uploads = hub.BackgroundUploads(repo_id, output_dir, config.hub_token)
    if not complete:  # a complete run trains nothing: its line says only that (finish_complete_run)
        log_run_summary(run)
    run.stop_agreement = StopAgreement() if accelerator.num_processes > 1 else None
    launcher = environment.launcher_pid() if launch.typed is not None else None  # a shell's exit stops nothing
    with StopSignal(announce=accelerator.is_main_process, launcher=launcher) as stop:
        run.stop = stop
        # a complete run's re-run makes what its end left out only with the settings that trained it
        unlike = checkpoint.settings_unlike(plan.resume_from, config) if complete else []
        finished = train_loop(run, complete, unlike)
    if run.stop_agreement is not None:
        run.stop_agreement.finish()
    environment.finish_collectives()
    accelerator.end_training()
    if run.uploads is not None:
        run.uploads.wait()
    if finished:
        signals.outcome_said()  # what follows (freeing memory, unlocking the folder) cannot stop it any more
        logger.info(f"done: the pipeline is in {output_dir} (DiffusionPipeline.from_pretrained({str(output_dir)!r}))")
        return run.step > first_step, None
    logger.info(f"stopped by {stop.received or 'a signal to another process'} at step {run.step}, "
                f"checkpoint-{run.step} saved; to resume, run: {run.resume_command}", extra=EVERY_MACHINE)
    # Another process's signal is not known here: SIGTERM is what schedulers and launchers send on preemption.
    return run.step > first_step, signal.Signals.__members__.get(stop.received or "", signal.SIGTERM)


def this_runs_commands(config: TrainConfig, explicit: set[str] | frozenset[str], command: list[str],
                       launch: Launch) -> tuple[str, str]:
    """This run's command line, as the model card repeats it, and the one that resumes it, as a stop says it."""
    argv = public_argv(command, config)
    if os.environ.get("ACCELERATE_MIXED_PRECISION") and "mixed_precision" not in explicit:
        argv += ["--mixed_precision", config.mixed_precision]  # the launcher's (plan_run), said in the commands
    chosen_seed = None if "seed" in explicit else config.seed
    resume_command = reproduce_command(resuming_latest(argv, config), launch, chosen_seed)
    if "$MACHINE_RANK" in resume_command:
        resume_command = f"{resume_command} (on every machine, its rank in MACHINE_RANK)"
    return reproduce_command(argv, launch, chosen_seed), resume_command


def prepare_output_dir(plan: Plan, output_dir: Path) -> run_folder.FolderStart:
    """On the main process: the folder made and locked for this run, what interrupted writes left removed,
    later checkpoints set aside when going back, an earlier run's outputs set aside with --overwrite_output_dir,
    and this run's settings written. Returns what changed, to be undone if the run fails before it saves. The lock
    is let go if this fails, and otherwise at the run's end (train_as_planned)."""
    start = run_folder.FolderStart(created=run_folder.highest_missing(output_dir), replacing=False,
                                   was_empty=output_dir.is_dir() and not any(output_dir.iterdir()),
                                   resume_step=plan.resume_step)
    run_folder.make_folder(output_dir, "--output_dir")
    run_folder.lock_output_dir(output_dir)
    try:
        return prepare_locked_output_dir(plan, output_dir, start)
    except BaseException:
        run_folder.unlock_output_dir(output_dir)
        raise


def prepare_locked_output_dir(plan: Plan, output_dir: Path, start: run_folder.FolderStart
                              ) -> run_folder.FolderStart:
    """prepare_output_dir's work once the folder is this run's."""
    config = plan.config
    for message in run_folder.clean_up_interrupted_writes(output_dir):
        logger.warning(message)
    if plan.resume_from is not None:
        message, start.abandoned = run_folder.set_aside_later_checkpoints(output_dir, plan.resume_step)
        if message:
            logger.warning(message)
    if config.overwrite_output_dir and plan.resume_from is None:
        set_aside = run_folder.set_aside_previous_run(output_dir, config.logging_dir)
        if set_aside:
            logger.info(f"--overwrite_output_dir: moved the earlier run's {', '.join(set_aside)} into "
                        f"{output_dir / run_folder.REPLACED_DIR}; they are removed once this run saves a checkpoint "
                        "or its pipeline (if this run fails before, they are put back)")
        start.replacing = (output_dir / run_folder.REPLACED_DIR).exists()
    settings = output_dir / RUN_CONFIG_FILE
    start.settings = settings.read_text() if settings.is_file() else None
    start.export_step = checkpoint.exported_step(output_dir)
    config.save(settings)
    return start


def init_trackers(config: TrainConfig, accelerator: Accelerator, output_dir: Path, resume_step: int | None,
                  run_id: str) -> None:
    """On the main process: --logger's tracker started, or one line saying why it cannot be. Resumed from a
    checkpoint, TensorBoard hides what the folder's logs hold after its step (a run killed after its last
    checkpoint, or the later steps of one taken back to an earlier checkpoint), as metrics.jsonl drops them:
    its curves would double back; and W&B goes on with the run of that checkpoint (`run_id`), named as the
    output folder, rather than starting one more run at each resume."""
    if config.logger == "none":  # no tracker: no empty logs/ folder in the run's pipeline folder
        return
    logging_dir = Path(accelerator.logging_dir)  # run_folder.trackers_folder, as make_accelerator set it
    logging_dir.mkdir(parents=True, exist_ok=True)
    tracking.quiet_tensorboard_writer_errors()
    try:
        tensorboard = {} if resume_step is None else {"purge_step": resume_step + 1}
        # W&B writes into the working directory unless told; the other trackers get logging_dir from accelerate.
        accelerator.init_trackers("uncond", config=tracker_config(config),
                                  init_kwargs={"wandb": {"dir": str(logging_dir), "id": run_id, "resume": "allow",
                                                         "name": output_dir.resolve().name},
                                               "tensorboard": tensorboard})
    except Exception as error:  # noqa: BLE001 - not logged in, no server...: each tracker raises its own kind
        failed = failed_tracker(error)
        for tracker in accelerator.trackers:  # before the folder is cleaned up: W&B writes its files at the end
            with contextlib.suppress(Exception):
                tracker.finish()
        accelerator.trackers = []
        hint = ("; run `wandb login`, or set WANDB_MODE=offline to log into the output folder"
                if "wandb" in (failed, config.logger) else "")
        if config.logger == "all" and failed:
            hint += "; or choose another --logger" if hint else "; choose another --logger"
        which = f"{failed} did not start" if config.logger == "all" and failed else "the tracker did not start"
        raise UsageError(f"--logger {config.logger}: {which} ({first_line(error)}){hint}") from None


def failed_tracker(error: Exception) -> str | None:
    """The name of the tracker whose code raised `error`: accelerate makes and starts them in turn in one call."""
    from accelerate.tracking import GeneralTracker

    name, frame = None, error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        name = owner.name if isinstance(owner, GeneralTracker) else name
        frame = frame.tb_next
    return name


def settle_seed(plan: Plan, accelerator: Accelerator) -> TrainConfig:
    """The seed is chosen once (the checkpoint's when resuming) and shared by every process."""
    config = plan.config
    seed = config.seed
    if seed is None:
        seed = plan.resume_state.get("seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
    seed = broadcast_object_list([seed])[0] if accelerator.num_processes > 1 else seed
    return config.replace(seed=seed)


def log_run_summary(run: Run) -> None:
    config, accelerator = run.config, run.accelerator
    images = run.batches.num_images
    if images and (warning := batch_beyond_data(config.train_batch_size, accelerator.num_processes, images)
                   or accumulation_beyond_epoch(config, accelerator.num_processes, images)):
        logger.warning(warning)
    length = f"{run.steps_per_epoch} per epoch, {counted(run.num_epochs, 'epoch')}"
    if run.epoch_offset:  # the epochs before a resume had another length (another batch, other data)
        length += (f", epoch {run.epoch} ending at step {run.epoch_offset + (run.epoch + 1) * run.steps_per_epoch}: "
                   "the steps before this resume had another batch or other data")
    logger.info(
        f"training {run.parameters_in_millions}-parameter UNet ({models.describe_unet(run.unwrapped_unet.config)}), "
        f"{counted(run.unwrapped_unet.config.in_channels, 'channel')}, {config.resolution} px, "
        f"on {counted(run.batches.num_images, 'image') if run.batches.num_images else 'a stream of images'} | "
        f"{counted(accelerator.num_processes, 'process')} on {accelerator.device.type}"
        f"{', weights sharded with FSDP2' if sharding.is_sharded(run.unwrapped_unet) else ''}, "
        f"precision {trained_precision(config, accelerator)} | "
        f"{batch_description(config, accelerator.num_processes)} | "
        f"{counted(run.max_train_steps, 'optimizer step')} ({length}) | "
        f"seed {config.seed} | output {run.output_dir}")


def accumulation_beyond_epoch(config: TrainConfig, processes: int, images: int) -> str | None:
    """The warning for --gradient_accumulation_steps as many as an epoch's batches or more, fewer images than the
    global batch: the epoch's end ends each optimizer step (as in the seed script), on fewer images than the
    summary's global batch says (trial 66 F3: "= 12", 8 images a step, unsaid; trial 67 F5: a short last batch)."""
    order, accumulation = data.Order(images, config.train_batch_size, 0, processes), config.gradient_accumulation_steps
    trained, batches = order.images_per_process * processes, order.batches_per_epoch
    if batches > accumulation or trained >= global_batch(config, processes):
        return None
    return (f"--gradient_accumulation_steps {accumulation} is at least the {batches} "
            f"{'batch' if batches == 1 else 'batches'} of {config.train_batch_size} an epoch of "
            f"{counted(images, 'image')} makes per process: each optimizer step ends with its epoch, on {trained} "
            f"images, not the global batch of {global_batch(config, processes)}")


def batch_beyond_data(batch_size: int, processes: int, images: int) -> str | None:
    """The warning for batches larger than the data: each step trains on all of it, some images twice where
    the processes cannot have as many each (data.Order gives every process as many, wrapping around)."""
    if batch_size * processes <= images:
        return None
    per_process = data.Order(images, batch_size, 0, processes).images_per_process
    repeated = per_process * processes - images
    return (f"--train_batch_size {batch_size} x {counted(processes, 'process')} is more than the "
            f"{counted(images, 'image')}: each step trains on the {images} there are"
            + (f", {repeated} of them twice so that each process has {per_process}" if repeated
               else ""))


def train_loop(run: Run, complete: bool, unlike: Sequence[str]) -> bool:
    """Epochs of optimizer steps; previews, exports and checkpoints at the seed script's points. A `complete` run
    (already_complete) only makes what its stop left owed and its missing last grid, and not with settings
    `unlike` those that trained it (checkpoint.settings_unlike). Returns False when a stop signal ended it early
    (after saving a checkpoint)."""
    # as the checkpoint says, before settle_owed: a complete run's checkpoint and export are written anew even when
    # an earlier resume made what it owed (and was stopped before writing them)
    position = run.resume_position
    owed = position is not None and run.step in (position.evaluation_owed, position.preview_owed)
    grid_missing = complete and not owed and last_grid_missing(run)
    if unlike and (owed or grid_missing):  # (only a complete run's settings are compared)
        # its grid, evaluation, card and export would show settings that did not train the model (--no-use_ema:
        # another model)
        logger.warning(f"the end of the run in {run.output_dir} left its last sample grid or evaluation out; not "
                       f"made with this command's settings, other than those that trained the model "
                       f"({', '.join(unlike)}): the run's own command (its training_config.json) makes them")
        return True
    if not make_what_is_owed(run):
        return stopped(run)
    if complete:
        finish_complete_run(run, owed, grid_missing)
        return True
    return train_epochs(run)


def make_what_is_owed(run: Run) -> bool:
    """The evaluation and sample grid of the step resumed from that the stop ending the previous run left out,
    in the order the uninterrupted run made them. Returns False where a stop signal came meanwhile."""
    if run.evaluation_owed == run.step:
        evaluate_run(run)
        if run.feature_extractor is not None:  # else not tried (no FID network in this run): the next resume tries
            record_owed(run, "evaluation", still_owed=run.evaluation_owed == run.step)
        if stop_requested(run, at_once=True):
            return False
    if run.preview_owed == run.step:
        make_owed_preview(run)
        record_owed(run, "preview", still_owed=run.preview_owed == run.step)
        if stop_requested(run, at_once=True):
            return False
    return True


def finish_complete_run(run: Run, owed: bool, grid_missing: bool) -> None:
    """A complete run run again: its checkpoint and export written anew where its stop in the last step left
    something `owed` (made by now), or its last grid made where it is missing."""
    if owed:  # a stop in the run's last step left them out: its checkpoint no longer owes them, its card shows them
        save_checkpoint(run)
        with_averaged_weights(run, export)
    elif grid_missing:
        # The run's last checkpoint is written before its last grid (train_epochs), so it cannot owe that grid
        # when a stop, or a lost process, left it out after; the card shows it once made.
        logger.info(f"making {run_folder.preview_path(run.output_dir, run.step)}, missing (a stop at the end of "
                    "a run can leave it out)")
        with_averaged_weights(run, save_sample_grid, export)
    logger.info(f"the run in {run.output_dir} is complete at step {run.step} (its export is of that step); "
                "raise --max_train_steps or --num_epochs to train it further")


def train_epochs(run: Run) -> bool:
    """The training itself, to the run's last step and its export. Returns False when a stop signal ended it
    early (after saving a checkpoint)."""
    config = run.config
    run.last_log = (time.perf_counter(), run.step, run.images_seen)
    first_step, exported_at = run.step, None
    with progress_bar(total=run.max_train_steps, initial=run.step, desc="training", unit="step", dynamic_ncols=True,
              disable=not run.accelerator.is_local_main_process) as progress:
        while run.step < run.max_train_steps:
            for micro_batches, ends_epoch in marking_last(optimizer_steps(run)):
                loss = train_step(run, micro_batches)
                run.step += 1
                # Each process's micro-batches are as large as the others' (data.Order pads); an epoch's last
                # step may hold fewer than a global batch.
                run.images_seen += sum(len(batch) for batch in micro_batches) * run.accelerator.num_processes
                if loss is not None:
                    run.running_loss.add(loss)
                if run.step == first_step + 1 and loss is not None:  # the bar's values before the first log line
                    progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}",
                                         refresh=False)
                if run.step % config.logging_steps == 0 or run.step == run.max_train_steps:
                    log_metrics(run, progress)
                progress.update(1)  # after the log: the line drawn for this step shows its values
                run.threads.adjust()  # a CPU run's threads, to the cores other processes leave free
                if config.eval_every_steps and run.step % config.eval_every_steps == 0:
                    evaluate_run(run)
                if run.step % config.checkpointing_steps == 0 and not ends_epoch:
                    save_checkpoint(run)  # an epoch's last step: after its preview and export, below
                if run.step == run.max_train_steps:
                    break  # a stop asked for now is met by the end of the run (its export and checkpoint)
                if stop_requested(run):
                    return stopped(run)
            else:
                ends_epoch = True  # every batch of the epoch was used (or none was left after a resume)
            exported_at = end_epoch(run, complete=ends_epoch) or exported_at
            if run.step % config.checkpointing_steps == 0:
                # Written after the epoch's end, so a resume from it goes on in the next epoch and does not
                # make the preview and export again.
                checkpoint_unless_written(run)
            if run.step < run.max_train_steps and stop_requested(run, at_once=True):
                return stopped(run)  # a signal during the epoch's preview: no step after it
    if exported_at != run.step:  # resumed at the very end (a run ended early at its last checkpoint, say)
        uses = [export] if run_folder.preview_path(run.output_dir, run.step).exists() else [save_sample_grid, export]
        with_averaged_weights(run, *uses)  # the grid too: the model card shows the export's step
    checkpoint_unless_written(run)  # the end too: a re-run with a larger --max_train_steps goes on from here exactly
    return True


OWED_ITEMS = {"evaluation": "the evaluation", "preview": "the sample grid"}


def settle_owed(run: Run) -> None:
    """Resumed from a checkpoint that owes its step's evaluation or sample grid: what an earlier resume from it
    made (stopped or killed after, before its next checkpoint) is not made again, and what a stop interrupted at
    an earlier resume too is given up, or a job stopped during it at each resume would never train on."""
    owed = [item for item, step in (("evaluation", run.evaluation_owed), ("preview", run.preview_owed))
            if step == run.step]
    if not owed:
        return
    settled = []
    if run.accelerator.is_main_process:
        record = run_folder.owed_record(run.output_dir, run.step)
        for item in owed:
            what = f"{OWED_ITEMS[item]} of step {run.step}"
            if item in record["made"]:
                logger.info(f"{what} was made by an earlier resume from this checkpoint: not made again")
            elif item in record["interrupted"]:
                logger.warning(f"{what} is given up: a stop interrupted it at an earlier resume from this checkpoint "
                               "too; training goes on")
            else:
                continue
            settled.append(item)
    if run.accelerator.num_processes > 1:  # evaluations and sharded previews are collective
        settled = broadcast_object_list([settled])[0]
    if "evaluation" in settled:
        run.evaluation_owed = None
    if "preview" in settled:
        run.preview_owed = None


def record_owed(run: Run, item: str, still_owed: bool) -> None:
    """What this resume did about an owed item, for the next resume from the same checkpoint (settle_owed): made
    it, or was stopped during it (the only way a grid or evaluation under way is left out)."""
    if run.accelerator.is_main_process:
        run_folder.record_owed(run.output_dir, run.step, item, "interrupted" if still_owed else "made")


def make_owed_preview(run: Run) -> None:
    """The sample grid that the stop ending the previous run gave up (of the step resumed from, so the grids
    are the uninterrupted run's)."""
    with_averaged_weights(run, save_sample_grid)


def with_averaged_weights(run: Run, *uses: Callable[[Run, UNet2DModel], Any]) -> None:
    """`uses` (save_sample_grid, export) given the averaged UNet where it is held, once the weights are known to
    be finite: the one way previews and exports get their weights. Every process calls it."""
    refuse_nonfinite_weights(run)
    with averaged_unet(run) as unet:
        if unet is not None:
            for use in uses:
                use(run, unet)


def already_complete(run: Run, step: int) -> bool:
    """Resumed at `step`, the last of a run whose export is of that step: the same command run again. (An export
    gone since is made again from the checkpoint, as a run resumed at its end makes it: train_epochs.)"""
    done = [checkpoint.run_complete(run.output_dir, step, run.max_train_steps)]
    return (broadcast_object_list(done) if run.accelerator.num_processes > 1 else done)[0]


def last_grid_missing(run: Run) -> bool:
    """Whether samples/ lacks the grid of the step a complete run ended at (as the main process sees it)."""
    missing = [not run_folder.preview_path(run.output_dir, run.step).exists()]
    return (broadcast_object_list(missing) if run.accelerator.num_processes > 1 else missing)[0]


def marking_last(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """(item, whether it is the last one): the loop must know an epoch's last step before taking it."""
    iterator = iter(items)
    try:
        item = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield item, False
        item = following
    yield item, True


@off_the_clock
def end_epoch(run: Run, complete: bool) -> int | None:
    """Sample grid and export at the seed's epochs (and after the last step); returns the step exported at.
    A `complete` epoch (all its batches used) is followed by the next one, also after the run's last step, so
    that the run's last checkpoint goes on in the next epoch when the run is extended."""
    config, last_epoch = run.config, run.step >= run.max_train_steps
    grid = run.epoch % config.save_images_epochs == 0 or last_epoch
    exported_at = run.step if run.epoch % config.save_model_epochs == 0 or last_epoch else None
    uses = []
    if grid:
        uses.append(save_sample_grid)
    if exported_at:
        uses.append(export)
    if uses:
        with_averaged_weights(run, *uses)
    run.accelerator.wait_for_everyone()
    if complete:
        run.epoch += 1
    return exported_at


def stop_requested(run: Run, at_once: bool = False) -> bool:
    """Whether to stop after this step (every process must stop at the same one). `at_once`: where the
    processes wait for each other anyway (an epoch's end), a signal received by now stops the run here, not
    one step later: the checkpoint is then of the step whose preview the stop gave up."""
    if run.stop_agreement is None:
        return run.stop.asked()
    return run.stop_agreement(run.stop.asked(), at_once)


def stopped(run: Run) -> bool:
    """Stop at this step boundary, with a checkpoint of it (which keeps the losses since the last log line:
    the resumed run logs them with its next line, as the uninterrupted run would have)."""
    checkpoint_unless_written(run)
    draw_loss_plot(run)  # the losses logged up to the stop, for a run that may not be resumed
    return False


def checkpoint_unless_written(run: Run) -> None:
    """A checkpoint of this step, unless it has one (written, or the one resumed from)."""
    if run.checkpointed_step != run.step:
        save_checkpoint(run)


def optimizer_steps(run: Run):
    """The current epoch's micro-batches, grouped per optimizer step, from where the run stands.
    The last group of an epoch may be shorter, as with the seed's accumulation at the end of a loader."""
    start = run.step - epoch_start_step(run)  # optimizer steps already done in this epoch
    accumulation = run.config.gradient_accumulation_steps
    group: list[torch.Tensor] = []
    for _, clean_images in run.batches.epoch(run.epoch, start_batch=start * accumulation):
        group.append(clean_images)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


def train_step(run: Run, micro_batches: list[torch.Tensor]) -> torch.Tensor | None:
    """One optimizer step over one or more micro-batches. Returns the mean loss, still on the device
    (None for a step skipped under --skip_nonfinite)."""
    if run.step_graph is not None:  # --cuda_graphs: steps of one micro-batch (plan.check_cuda_graphs)
        loss, grad_norm = run.step_graph(*batch_inputs(run, micro_batches[0], 0))
    else:
        loss, grad_norm = accumulated_gradients(run, micro_batches)
    if run.config.skip_nonfinite and not everywhere_finite(run, loss, grad_norm):
        # fp16: the loss scaler must close its step (its next unscale would raise otherwise) and lower its
        # scale if the gradients overflowed (it checked them as clip_grad_norm_ unscaled them); with the
        # gradients then gone, its step changes no weight.
        clear_gradients(run)
        if run.accelerator.scaler is not None:
            run.optimizer.step()
        run.lr_scheduler.step()  # the schedule stays aligned with the step count
        update_ema(run)  # and so does the EMA's (the weights it averages in are the last step's)
        run.skipped_steps += 1
        return None
    run.running_grad_norm.add(grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    clear_gradients(run)
    update_ema(run)
    return loss


def update_ema(run: Run) -> None:
    """The EMA's update at the end of every --ema_update_every'th step, skipped ones too: its k-th update is at
    step k*N, which its decays and the blend of the steps since (models.EMA) count on. A skipped update put it a
    step behind for the rest of the run: its exports blended trained weights into an average just updated (trial
    60 F1)."""
    if run.ema is not None and (run.step + 1) % run.config.ema_update_every == 0:
        run.ema.step(sharding.local_tensors(run.parameters), at_step=run.step + 1)


def batch_inputs(run: Run, clean_images: torch.Tensor, micro_batch: int) -> tuple[torch.Tensor, ...]:
    """A micro-batch on the device, with the noise and timesteps it is trained at."""
    # Pinned by the loader on GPUs, so the copy is asynchronous.
    clean_images = clean_images.to(run.accelerator.device, non_blocking=True).contiguous(
        memory_format=run.memory_format)
    # Noise and timesteps are a pure function of (seed, step, process, micro-batch): a resumed run
    # draws exactly what the uninterrupted one would have, with no random state to restore.
    run.noise_generator.manual_seed(data.mix_seed(run.config.seed, run.step, run.accelerator.process_index,
                                                  micro_batch))
    return clean_images, *sample_noise_and_timesteps(clean_images, run.objective, run.noise_scheduler,
                                                     run.noise_generator)


def accumulated_gradients(run: Run, micro_batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The micro-batches' gradients summed into the parameters' .grad, clipped; their loss and the norm: both of
    the mean over the step's images. An epoch's last step may hold micro-batches of different sizes (5, 5 and 2
    images): each is weighed by its images, not by 1/count as the seed script's accumulation does, which gave
    those 2 images the weight of 5."""
    total_loss = torch.zeros((), device=run.accelerator.device)
    images = sum(len(clean_images) for clean_images in micro_batches)
    for i, clean_images in enumerate(micro_batches):
        inputs = batch_inputs(run, clean_images, i)
        if run.config.compile and run.accelerator.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced across processes only on the last micro-batch.
        with contextlib.nullcontext() if last else run.accelerator.no_sync(run.unet):
            # images / len: the micro-batch count where all are as large, as an exact division
            total_loss += backward(run, *inputs, parts=images / len(clean_images))
    return total_loss, clipped_gradient_norm(run)


def batch_gradients(run: Run, clean_images: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's loss and clipped gradients: what --cuda_graphs records (step_graph.py)."""
    return backward(run, clean_images, noise, timesteps, parts=1), clipped_gradient_norm(run)


def backward(run: Run, clean_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             parts: float) -> torch.Tensor:
    """The DDPM loss of a micro-batch over `parts` (the step's images over the micro-batch's), its gradients
    added to .grad; returns that share of the step's loss."""
    loss = denoising_loss(run.unet, run.noise_scheduler, clean_images, noise, timesteps, run.objective) / parts
    run.accelerator.backward(loss)
    return loss.detach()


def clipped_gradient_norm(run: Run) -> torch.Tensor:
    # The norm is logged also without clipping (--max_grad_norm 0): an infinite limit scales the gradients by 1.
    # Under FSDP it comes back as a (replicated) DTensor.
    max_norm = run.config.max_grad_norm or math.inf
    return sharding.full_tensor(run.accelerator.clip_grad_norm_(run.parameters, max_norm))


def step_graph(run: Run) -> StepGraph | None:
    """With --cuda_graphs, what records batch_gradients and replays it (step_graph.py)."""
    return StepGraph(functools.partial(batch_gradients, run), run.parameters) if run.config.cuda_graphs else None


def clear_gradients(run: Run) -> None:
    """Gradients set to None for the next step, except those a recorded CUDA graph writes in place."""
    if run.step_graph is None or not run.step_graph.recorded:
        run.optimizer.zero_grad(set_to_none=True)


def everywhere_finite(run: Run, *values: torch.Tensor | None) -> bool:
    """Whether every process saw finite values: all of them must skip a step together. A host sync and a
    collective per step, which is what --skip_nonfinite costs."""
    flag = torch.ones((), device=run.accelerator.device)
    for value in values:
        if value is not None:
            flag = flag * torch.isfinite(value).all()
    return run.accelerator.reduce(flag, reduction="mean").item() == 1.0


def log_metrics(run: Run, progress: tqdm) -> None:
    """The loss's mean reduced across processes and, with the grad norm (the same on every process), read to the
    host: the loop's one regular wait for the accelerator (--skip_nonfinite adds one per step). Written out."""
    accelerator = run.accelerator
    mean_loss = run.running_loss.pop()  # None when every step since the last log was skipped
    if mean_loss is None:
        mean_loss = torch.tensor(float("nan"), device=accelerator.device)
    loss = accelerator.reduce(mean_loss, reduction="mean").item()
    grad_norm = run.running_grad_norm.pop()
    now = time.perf_counter()
    # the images trained on: fewer than the batch settings say where an epoch's last batch is short, or the
    # data is smaller than a batch
    elapsed, steps, images = (now - run.last_log[0], run.step - run.last_log[1], run.images_seen - run.last_log[2])
    run.last_log = (now, run.step, run.images_seen)
    values = {"step": run.step, "epoch": run.epoch, "loss": loss, "lr": run.optimizer.param_groups[0]["lr"],
              "images_per_sec": round(images / elapsed, 2) if elapsed > 0 else None,
              "images_seen": run.images_seen}
    if grad_norm is not None:
        values["grad_norm"] = grad_norm.item()
    if run.ema is not None:
        values["ema_decay"] = run.ema.decay_per_step
    if run.config.skip_nonfinite:
        values["skipped_steps"] = run.skipped_steps
    if not math.isfinite(loss):
        if not run.config.skip_nonfinite:
            raise diverged(run, f"the loss became {loss} between steps {run.step - steps} and {run.step}")
        values["loss"] = None  # every step since the last log was skipped: there is no loss to show
    progress.set_postfix(loss="skipped" if values["loss"] is None else f"{loss:.4f}", lr=f"{values['lr']:.2e}")
    with tracking.tracker_writes(accelerator.logging_dir):
        accelerator.log({k: v for k, v in values.items() if k != "step" and v is not None}, step=run.step)
    if run.metrics_file is not None:
        run.metrics_file.write(values)
        if time.perf_counter() >= run.loss_plot_due:
            draw_loss_plot(run)


def diverged(run: Run, what: str) -> RunFailed:
    saved = checkpoint.complete_checkpoints(run.output_dir)
    advice = "Lower --learning_rate (or pass --skip_nonfinite)"
    if run.config.compile and run.step <= run.config.logging_steps:
        # By the first log line the learning rate has barely warmed up: wrong gradients from the compiled code
        # are the likelier cause (as torch 2.13's CPU code gives, plan.CPU_COMPILER_MISCOMPUTES_GRADIENTS).
        advice = "This happened in the compiled UNet's first steps: drop --compile"
    if not saved:
        return RunFailed(f"{what}; no checkpoint was saved yet. {advice} and run the command again")
    rerun = "the command with --resume_from_checkpoint latest" if run.config.names_a_checkpoint() else \
        "the same command"
    return RunFailed(f"{what}; {saved[-1][1].name} is the last good checkpoint. {advice} and re-run "
                     f"{rerun} to resume from it")


def refuse_nonfinite_weights(run: Run) -> None:
    """Before a sample grid or export: weights that became NaN or inf since the last log line (the loss is
    looked at only there) are never drawn or exported; an export is the save that replaces an earlier run.
    One sync, at an epoch's end; every process takes part (under FSDP each holds a shard)."""
    weights = [*run.unwrapped_unet.parameters(), *(run.ema.shadow_params if run.ema is not None else [])]
    bad = torch.stack([(~torch.isfinite(weight)).sum() for weight in sharding.local_tensors(weights)]).sum()
    if run.accelerator.reduce(bad, reduction="sum").item():
        raise diverged(run, f"the weights became NaN or inf by step {run.step}")


@off_the_clock
def save_checkpoint(run: Run) -> None:
    """A checkpoint of the state after run.step, never of a diverged one."""
    loss = {"total": None, "count": run.running_loss.count}
    if run.running_loss.total is not None:
        totals = run.accelerator.gather(run.running_loss.total.reshape(1)).tolist()  # float32s, exact as floats
        summed = sum(totals)
        if not math.isfinite(summed):
            raise diverged(run, f"the loss became non-finite before step {run.step}")
        # A resume with as many processes goes on from each one's own sum, so that its log line is the
        # uninterrupted run's to the bit (from their mean, the sums were rounded in another order: trial 55 F3);
        # with another count, each goes on from their mean, which the log line's mean is then the same as.
        loss["total"], loss["totals"] = summed / len(totals), totals
    window = {"loss": loss, "grad_norm": run.running_grad_norm.state()}  # the grad norm is the same everywhere
    state = {**training_state(run), "log_window": window}
    if isinstance(run.ema, models.EMA):
        # The share of unet_ema/ that the model of this step keeps, the trained weights of unet/ the rest: with
        # --ema_update_every N the EMA has not averaged the steps since its last update (models.ema_weights).
        # uncond sample, evaluate and export of the checkpoint blend them as the run's own export does.
        state[EMA_SHARE_KEY] = run.ema.decay_since_update(run.step)
        state[EMA_LAST_UPDATE_KEY], state[EMA_CLOCK_START_KEY] = run.ema.last_update_step, run.ema.clock_start
    path, dropped = checkpoint.save_checkpoint(run.accelerator, run.output_dir, run.step, state, run.config,
                                               run.config.checkpoints_total_limit)
    run.checkpointed_step = run.step
    if run.accelerator.is_main_process:
        run_folder.forget_owed(run.output_dir)  # the checkpoint just written says what is owed
    limit = f" (removed {', '.join(dropped)}: --checkpoints_total_limit {run.config.checkpoints_total_limit})"
    logger.info(f"saved {path}{limit if dropped else ''}")
    drop_replaced_run(run)


