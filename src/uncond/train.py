"""train(config): plan (plan.py checks everything cheap), build the parts, resume, and run one readable loop."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list, gather_object, set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import checkpoint, data, environment, hub, metrics, models, sampling, sharding, streaming, tracking
from .config import PREVIEWS_DIR, RUN_CONFIG_FILE, RunFailed, TrainConfig, UsageError, public_argv
from .objective import Objective, training_loss
from .plan import (FSDP_CONFIG, Plan, check_processes, dry_run, plan_run, refuse_mismatched_resume,
                   warmup_outlasts_run)

logger = logging.getLogger("uncond")  # cli shows its records on the main process only

BEST_DIR = "best"  # --keep_best: the export with the lowest FID
REFERENCE_STATS_FILE = "fid_reference.npz"  # feature statistics of the training images, for FID during training
MAX_REFERENCE_IMAGES = 50_000  # the usual size of an FID reference set
RUN_ARTEFACTS = (PREVIEWS_DIR, tracking.METRICS_FILE, tracking.LOSS_PLOT_FILE, RUN_CONFIG_FILE, hub.CARD_FILE,
                 "data_report.json", BEST_DIR, REFERENCE_STATS_FILE)


# ------------------------------------------------------------------------------------------------ parts


@dataclass
class Run:
    """Everything the loop touches."""
    config: TrainConfig
    accelerator: Accelerator
    output_dir: Path
    batches: data.CachedBatches | streaming.StreamedBatches
    unet: torch.nn.Module
    ema: models.EMA | None
    noise_scheduler: DDPMScheduler
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    max_train_steps: int
    steps_per_epoch: int
    num_epochs: int
    global_batch_size: int
    step: int = 0
    epoch: int = 0
    # Optimizer steps by which the epochs before this run's first one were longer than steps_per_epoch
    # (a resume with another process count or batch size), so that epoch E starts at
    # epoch_offset + E * steps_per_epoch.
    epoch_offset: int = 0
    images_seen: int = 0
    resume_position: Position | None = None  # where the checkpoint to resume from left its run
    checkpointed_step: int | None = None  # the step of the newest checkpoint, written or resumed from
    repo_id: str | None = None
    uploads: hub.BackgroundUploads | None = None
    command: str = ""  # the command line that reproduces this run, for the model card
    resume_command: str = ""  # the command that goes on from this run's newest checkpoint
    metrics_file: tracking.MetricsFile | None = None
    running_loss: tracking.RunningMean = field(default_factory=tracking.RunningMean)
    running_grad_norm: tracking.RunningMean = field(default_factory=tracking.RunningMean)
    last_log: tuple[float, int] = (0.0, 0)  # (time, step) of the previous log line, for images/s
    noise_generator: torch.Generator | None = None
    skipped_steps: int = 0  # non-finite steps skipped under --skip_nonfinite
    memory_format: torch.memory_format = torch.contiguous_format  # the UNet's, given to its inputs too
    feature_extractor: metrics.FeatureExtractor | None = None  # for --eval_every_steps; None: no evaluation
    best_fid: float = math.inf
    stop: StopSignal | None = None  # while training: a preview under way gives up when a stop is asked for
    stop_agreement: StopAgreement | None = None  # with several processes

    @property
    def unwrapped_unet(self) -> UNet2DModel:
        """The module without DDP's or torch.compile's wrapper (under FSDP, still sharded)."""
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)

    @property
    def parameters_in_millions(self) -> str:
        """For the log and the model card; under FSDP, numel counts whole tensors, not shards."""
        return f"{sum(p.numel() for p in self.unwrapped_unet.parameters()) / 1e6:.2f}M"


def make_accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
    try:
        return Accelerator(
            cpu=environment.cpu_processes(),
            mixed_precision=config.mixed_precision,
            log_with=None if config.logger == "none" else config.logger,
            project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                logging_dir=str(output_dir / config.logging_dir)),
            # The LR schedule counts optimizer steps; we step it once per optimizer step ourselves.
            step_scheduler_with_optimizer=False,
            # Decoding a large dataset on the main process must not time out the others.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
            # On GPUs, CUDA graphs ("reduce-overhead"): the eager step of these UNets is bound by kernel
            # launches (docs/benchmarks.md: 58 ms per step on an H100 even at batch 1).
            dynamo_plugin=TorchDynamoPlugin(backend="inductor", mode="reduce-overhead" if torch.cuda.is_available()
                                            else None) if config.compile else None,
        )
    except ValueError as error:
        raise UsageError(f"--mixed_precision {config.mixed_precision}: {error}") from None


def load_batches(plan: Plan, accelerator: Accelerator) -> data.CachedBatches | streaming.StreamedBatches:
    """This process's training batches: from the decoded-image cache, or from a stream with --streaming."""
    config = plan.config
    pin_memory = accelerator.device.type == "cuda"
    if config.streaming:
        stream = streaming.Stream(config)
        channels = choose_channels(plan, lambda: stream.all_gray(config),
                                   f" (judged from the first {streaming.CHANNELS_PEEK} images of the stream)")
        return streaming.StreamedBatches(stream, config, channels, accelerator.num_processes,
                                         accelerator.process_index, pin_memory)
    # One process per machine downloads and decodes into the cache; the others wait, then map what it wrote.
    with accelerator.local_main_process_first():
        source = data.open_source(config)
        cache = data.load_images(source, config, progress=accelerator.is_local_main_process)
    logger.info(data.summary(cache, source))
    if accelerator.num_processes > 1:
        check_same_images(accelerator, len(cache))
    if accelerator.is_main_process:
        data.write_report(Path(config.output_dir) / data.REPORT_FILE, len(cache), cache.meta["skipped"],
                          cache.meta["upscaled"], cache=str(cache.folder))
    channels = choose_channels(plan, lambda: cache.all_gray)
    # A resumed run goes on in the data order it began with (checkpoints without "data_order" predate it).
    data_order = plan.resume_state.get("data_order", 1) if plan.resume_from is not None else None
    return data.CachedBatches(cache, config, channels, accelerator.num_processes, accelerator.process_index,
                              pin_memory, data_order)


def check_same_images(accelerator: Accelerator, count: int) -> None:
    """Each machine decodes into its own cache (unless --cache_dir is shared), from its own copy of a local
    folder. With different image counts the processes deal out different permutations, so their shards
    overlap and miss images, and their epochs can differ in length, so that their collectives would wait
    for each other until the process group's time-out (2 h)."""
    counts = gather_object([count])
    if len(set(counts)) > 1:
        raise RunFailed(f"the processes hold different numbers of images ({', '.join(map(str, counts))}, by process): "
                        "the machines read different data, or a read failed on one of them; give every machine the "
                        "same images (or a --cache_dir they share) and re-run")


def choose_channels(plan: Plan, all_gray: Callable[[], bool], judged_from: str = "") -> int:
    config = plan.config
    if plan.channels_from_model_config:
        return plan.channels_from_model_config
    if config.num_channels != "auto":
        return int(config.num_channels)
    channels = 1 if all_gray() else 3
    logger.info(("--num_channels auto: every image is grayscale, training a 1-channel model" if channels == 1
                 else "--num_channels auto: colour images found, training a 3-channel (RGB) model") + judged_from)
    return channels


def build_run(plan: Plan, accelerator: Accelerator) -> Run:
    config = plan.config
    speedups = ["glibc malloc keeps freed buffers"] * environment.keep_freed_memory()
    batches = load_batches(plan, accelerator)
    unet_config = models.with_channels(plan.unet_config, batches.channels)
    if plan.resume_from is not None:
        refuse_mismatched_resume(plan.resume_from, config, unet_config)

    set_seed(config.seed)  # identical initial weights on every process
    unet = models.build_unet(unet_config)
    speedups += models.speed_up(unet, config, accelerator.device)
    optimizer, fused = make_optimizer(unet, config, accelerator.device)
    speedups += ["fused AdamW"] * fused + [f"{config.mixed_precision} autocast"] * (config.mixed_precision != "no")
    speedups += tune_cuda(config, accelerator.device)
    speedups += ["torch.compile" + " with CUDA graphs" * (accelerator.device.type == "cuda")] * config.compile
    if config.use_ema:
        speedups.append(f"foreach EMA every {config.ema_update_every} step(s)")
    logger.info(f"speed: {', '.join(speedups) or 'plain fp32'}")

    steps_per_epoch = math.ceil(batches.batches_per_epoch / config.gradient_accumulation_steps)
    global_batch_size = config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    # --num_epochs counts the whole run's epochs; those before a resume with another global batch had
    # another length (the schedule must know the total before it is built).
    position = None if plan.resume_from is None else position_after(
        plan.resume_step, plan.resume_state, steps_per_epoch, global_batch_size, accelerator.num_processes)
    epoch_offset = position.epoch_offset if position else 0
    max_train_steps = config.max_train_steps or epoch_offset + config.num_epochs * steps_per_epoch
    if accelerator.is_main_process and (warning := warmup_outlasts_run(config, max_train_steps)):
        logger.warning(warning)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_train_steps, step_rules=config.lr_step_rules)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # After prepare: on the device already, and under FSDP over this process's shards.
    ema = models.make_ema(accelerator.unwrap_model(unet, keep_torch_compile=False), config) if config.use_ema else None
    checkpoint.register_state_hooks(accelerator, unet, ema)
    noise_scheduler = models.build_noise_scheduler(config)
    # On the device once: add_noise and compute_snr would otherwise copy it from the host every step.
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    return Run(config=config, accelerator=accelerator, output_dir=Path(config.output_dir), batches=batches,
               unet=unet, ema=ema, noise_scheduler=noise_scheduler,
               objective=Objective(config.prediction_type, config.snr_gamma, config.noise_offset),
               optimizer=optimizer, lr_scheduler=lr_scheduler, max_train_steps=max_train_steps,
               steps_per_epoch=steps_per_epoch,
               num_epochs=math.ceil((max_train_steps - epoch_offset) / steps_per_epoch),
               global_batch_size=global_batch_size, resume_position=position,
               noise_generator=torch.Generator(accelerator.device),
               memory_format=torch.channels_last if models.uses_channels_last(config, accelerator.device)
               else torch.contiguous_format)


def make_optimizer(unet: torch.nn.Module, config: TrainConfig, device: torch.device) -> tuple[torch.optim.AdamW, bool]:
    """The seed's AdamW; on GPUs the fused kernel (one launch for all parameters instead of several per tensor)."""
    fused = config.fused_adamw and device.type == "cuda"
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, **adam_settings(config),
                                  fused=fused or None)
    return optimizer, fused


def adam_settings(config: TrainConfig) -> dict[str, Any]:
    return {"betas": (config.adam_beta1, config.adam_beta2), "weight_decay": config.adam_weight_decay,
            "eps": config.adam_epsilon}


def tune_cuda(config: TrainConfig, device: torch.device) -> list[str]:
    """cuDNN times its convolution algorithms once per shape (the shapes repeat every step); TF32 tensor
    cores for fp32 matrix products and convolutions (10-bit mantissa inputs, fp32 accumulation)."""
    if device.type != "cuda":
        return []
    torch.backends.cudnn.benchmark = True
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return ["cuDNN autotuning"] + ["TF32"] * config.allow_tf32


@dataclass(frozen=True)
class Position:
    """Where a checkpoint left its run, in this run's terms."""
    step: int
    epoch: int
    images_seen: int
    epoch_offset: int  # see Run.epoch_offset
    note: str = ""  # said in the log when the checkpoint was written with another global batch


def position_after(step: int, state: dict[str, Any], steps_per_epoch: int, global_batch_size: int,
                   num_processes: int) -> Position:
    """The place in the run and in the data order to go on from after the checkpoint of `step` (whose
    training state is `state`). With another process count or batch size, the epoch goes on after the
    images it had already seen (the rest of that epoch's order then differs from an uninterrupted run's)."""
    epoch = state.get("epoch", step // steps_per_epoch)
    steps_into_epoch = step - state.get("epoch_start_step", epoch * steps_per_epoch)
    saved_processes = state.get("num_processes", num_processes)
    saved_batch = state.get("global_batch_size", global_batch_size // num_processes
                            * saved_processes)  # older checkpoints: the same batch per device
    note = ""
    if saved_batch != global_batch_size or saved_processes != num_processes:
        images_into_epoch = steps_into_epoch * saved_batch
        steps_into_epoch = min(images_into_epoch // global_batch_size, steps_per_epoch)
        note = (f"checkpoint-{step} was written by {saved_processes} process(es) with a global batch of {saved_batch}; "
                f"going on with {num_processes} process(es) and a global batch of {global_batch_size} after the "
                f"{images_into_epoch} images already seen in epoch {epoch}")
    return Position(step=step, epoch=epoch, images_seen=state.get("images_seen", step * global_batch_size),
                    epoch_offset=step - steps_into_epoch - epoch * steps_per_epoch, note=note)


def resume(run: Run, path: Path) -> None:
    """Restore the training state (weights, EMA, optimizer, schedule, random states) and go on from the place
    build_run found. The optimizer, schedule and weights are the same whatever the process count."""
    checkpoint.load_checkpoint(run.accelerator, path)
    # The schedule's state holds the learning rate it was built with, and the optimizer the rate of the next
    # step and its other settings; this run's flags win in both, so a diverged run can be resumed with a
    # lower --learning_rate (or more --adam_weight_decay).
    schedule = run.lr_scheduler.scheduler  # diffusers' schedules are all LambdaLR: base rate x factor(step)
    schedule.base_lrs = [run.config.learning_rate] * len(run.optimizer.param_groups)
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    for group, rate in zip(run.optimizer.param_groups, rates):
        group.update(lr=rate, **adam_settings(run.config))
    schedule._last_lr = rates  # what get_last_lr() (the logged lr) reads
    position = run.resume_position
    if position.note:
        logger.info(position.note)
    run.step, run.epoch, run.images_seen = position.step, position.epoch, position.images_seen
    run.epoch_offset, run.checkpointed_step = position.epoch_offset, position.step


# ------------------------------------------------------------------------------------------------ train


def train(config: TrainConfig, explicit: set[str] | frozenset[str] = frozenset(),
          command: list[str] | None = None) -> Path:
    """Train a UNet2DModel as the config says; returns the output folder holding the pipeline.
    `command` is the argument list the run was started with, for the model card (default: sys.argv)."""
    plan = plan_run(config, explicit)
    if plan.config.dry_run:
        dry_run(plan)
        return Path(plan.config.output_dir)
    output_dir = Path(plan.config.output_dir)
    accelerator = make_accelerator(plan.config, output_dir)
    check_processes(plan, accelerator)
    plan.config = settle_seed(plan, accelerator)
    config = plan.config
    refusal = None
    if accelerator.is_main_process:
        try:
            prepare_output_dir(plan, output_dir)
        except UsageError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:  # the other processes would otherwise wait for the main one forever
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise UsageError(refusal)
    repo_id = create_hub_repository(config, accelerator)

    run = build_run(plan, accelerator)
    run.repo_id = repo_id
    argv = public_argv(sys.argv[1:] if command is None else command, config)
    launch = (accelerator.num_processes, None if "seed" in explicit else config.seed)
    run.command = reproduce_command(argv, *launch, sharded=sharding.is_sharded(run.unwrapped_unet))
    run.resume_command = reproduce_command(resuming_latest(argv, config), *launch,
                                           sharded=sharding.is_sharded(run.unwrapped_unet))
    if plan.resume_from is not None:
        logger.info(plan.resume_message)
        resume(run, plan.resume_from)
    elif plan.resume_message:
        logger.info(plan.resume_message)
    if accelerator.is_main_process:
        run.metrics_file = tracking.MetricsFile(output_dir, resume_step=run.step)
        run.best_fid = min((r["fid"] for r in run.metrics_file.read() if "fid" in r), default=math.inf)
        if repo_id:
            run.uploads = hub.BackgroundUploads(repo_id, output_dir, config.hub_token)
        init_trackers(run)
    run.feature_extractor = open_feature_extractor(config, accelerator)
    log_run_summary(run)
    run.stop_agreement = StopAgreement() if accelerator.num_processes > 1 else None
    with StopSignal(announce=accelerator.is_main_process) as stop:
        run.stop = stop
        finished = train_loop(run, stop)
    if run.stop_agreement is not None:
        run.stop_agreement.finish()
    environment.finish_collectives()
    accelerator.end_training()
    if run.uploads is not None:
        run.uploads.wait()
    checkpoint.unlock_output_dir(output_dir)
    if finished:
        logger.info(f"done: the pipeline is in {output_dir} (DiffusionPipeline.from_pretrained({str(output_dir)!r}))")
    else:
        logger.info(f"stopped by {stop.received or 'a signal to another process'} at step {run.step}, "
                    f"checkpoint-{run.step} saved; to resume, run: "
                    f"{run.resume_command}")
    return output_dir


def prepare_output_dir(plan: Plan, output_dir: Path) -> None:
    """On the main process: the folder made and locked for this run, what interrupted writes left removed,
    later checkpoints set aside when going back, an earlier run's outputs removed with --overwrite_output_dir,
    and this run's settings written."""
    config = plan.config
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # what plan's check cannot see (a root user in /proc, a full or read-only mount)
        raise UsageError(f"--output_dir {output_dir}: cannot create it ({error.strerror})") from None
    checkpoint.lock_output_dir(output_dir)
    for message in checkpoint.clean_up_interrupted_writes(output_dir):
        logger.warning(message)
    if plan.resume_from is not None:
        message = checkpoint.set_aside_later_checkpoints(output_dir, plan.resume_step)
        if message:
            logger.warning(message)
    if config.overwrite_output_dir and plan.resume_from is None:
        removed = checkpoint.clear_previous_run(output_dir, RUN_ARTEFACTS + (config.logging_dir,))
        if removed:
            logger.info(f"--overwrite_output_dir: removed {', '.join(removed)} from {output_dir}")
    config.save(output_dir / RUN_CONFIG_FILE)


class StopSignal:
    """SIGTERM or SIGINT (a preempted job, Ctrl-C) asks the run to save a checkpoint at the next step
    boundary and exit cleanly; a second SIGINT stops at once."""

    def __init__(self, announce: bool = True) -> None:
        self.received: str | None = None
        self.previous: dict[int, Any] = {}
        self.announce = announce  # on one process: every process of the launch gets a terminal's Ctrl-C

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number: int, frame: Any) -> None:
        if self.received and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        if self.announce:  # a preview or export under way can take a while: say at once what happens
            logger.warning(f"{self.received}: stopping with a checkpoint after the current step (an export under "
                           "way is finished, a preview left out); Ctrl-C again stops at once, without one")


def create_hub_repository(config: TrainConfig, accelerator: Accelerator) -> str | None:
    """--push_to_hub: the main process creates the repository before any heavy work, and every process
    stops with its error if it cannot (offline, not logged in, no write access)."""
    if not config.push_to_hub:
        return None
    outcome: list[str | None] = [None, None]  # repository id, error
    if accelerator.is_main_process:
        try:
            outcome[0] = hub.create_repository(config)
        except UsageError as error:
            outcome[1] = str(error)
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if outcome[1]:
        raise UsageError(outcome[1])
    return outcome[0]


def init_trackers(run: Run) -> None:
    logging_dir = run.output_dir / run.config.logging_dir
    logging_dir.mkdir(parents=True, exist_ok=True)
    # W&B writes into the working directory unless told; the other trackers get logging_dir from accelerate.
    run.accelerator.init_trackers("uncond", config=tracker_config(run.config),
                                  init_kwargs={"wandb": {"dir": str(logging_dir)}})


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
    logger.info(
        f"training {run.parameters_in_millions}-parameter UNet ({models.describe_unet(run.unwrapped_unet.config)}), "
        f"{run.unwrapped_unet.config.in_channels} channel(s), {config.resolution} px, "
        f"on {run.batches.num_images or 'a stream of'} images | "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}"
        f"{', weights sharded with FSDP2' if sharding.is_sharded(run.unwrapped_unet) else ''}, "
        f"precision {config.mixed_precision} | "
        f"batch {config.train_batch_size} per device x {accelerator.num_processes} processes x "
        f"{config.gradient_accumulation_steps} accumulation = {run.global_batch_size} | "
        f"{run.max_train_steps} optimizer steps ({run.steps_per_epoch} per epoch, {run.num_epochs} epochs) | "
        f"seed {config.seed} | output {run.output_dir}")


def train_loop(run: Run, stop: StopSignal) -> bool:
    """Epochs of optimizer steps; previews, exports and checkpoints at the seed script's points.
    Returns False when a stop signal ended it early (after saving a checkpoint)."""
    config = run.config
    if already_complete(run):
        logger.info(f"the run in {run.output_dir} is complete at step {run.step} (its export is of that step); "
                    "raise --max_train_steps or --num_epochs to train it further")
        return True
    run.last_log = (time.perf_counter(), run.step)
    exported_at = None
    with tqdm(total=run.max_train_steps, initial=run.step, desc="training", unit="step", dynamic_ncols=True,
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
                progress.update(1)
                if run.step % config.logging_steps == 0 or run.step == run.max_train_steps:
                    log_metrics(run, progress)
                if config.eval_every_steps and run.step % config.eval_every_steps == 0:
                    evaluate(run)
                if run.step % config.checkpointing_steps == 0 and not ends_epoch:
                    save_checkpoint(run)  # an epoch's last step: after its preview and export, below
                if run.step == run.max_train_steps:
                    break  # a stop asked for now is met by the end of the run (its export and checkpoint)
                if stop_requested(run, stop):
                    return stopped(run, progress)
            else:
                ends_epoch = True  # every batch of the epoch was used (or none was left after a resume)
            exported_at = end_epoch(run, complete=ends_epoch) or exported_at
            if run.step % config.checkpointing_steps == 0:
                # Written after the epoch's end, so a resume from it goes on in the next epoch and does not
                # make the preview and export again.
                checkpoint_unless_written(run)
            if run.step < run.max_train_steps and stop_requested(run, stop):
                return stopped(run, progress)  # a signal during the epoch's preview: no step after it
    if exported_at != run.step:  # resumed at the very end
        with averaged_unet(run) as unet:
            if unet is not None:
                export(run, unet)
    checkpoint_unless_written(run)  # the end too: a re-run with a larger --max_train_steps goes on from here exactly
    return True


def already_complete(run: Run) -> bool:
    """Resumed at the last step of a run whose export is of that step: the same command run again."""
    done = [run.step >= run.max_train_steps
            and checkpoint.read_training_state(run.output_dir).get("step") == run.step]
    return (broadcast_object_list(done) if run.accelerator.num_processes > 1 else done)[0]


T = TypeVar("T")


def off_the_clock(work: Callable[..., T]) -> Callable[..., T]:
    """For the work between training steps (previews, exports, evaluations, checkpoints): its time is left
    out of the images/s of the logging interval it falls in, which would otherwise count it as training."""
    @functools.wraps(work)
    def timed(run: Run, *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        try:
            return work(run, *args, **kwargs)
        finally:
            run.last_log = (run.last_log[0] + time.perf_counter() - started, run.last_log[1])
    return timed


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
    if grid or exported_at:
        with averaged_unet(run) as unet:
            if unet is not None:
                if grid:
                    save_sample_grid(run, unet)
                if exported_at:
                    export(run, unet)
    run.accelerator.wait_for_everyone()
    if complete:
        run.epoch += 1
    return exported_at


def stop_requested(run: Run, stop: StopSignal) -> bool:
    """Whether to stop after this step (every process must stop at the same one)."""
    if run.stop_agreement is None:
        return stop.received is not None
    return run.stop_agreement(stop.received is not None)


class StopAgreement:
    """Whether any process was asked to stop, agreed by all processes at every step without stalling it: each
    step's flags are summed by an all-reduce on a gloo group of its own, in the background (no GPU sync), and
    the sum is read at the next step, so every process stops at the same step, one after the signal. Launchers
    kill their processes soon after a signal (torchrun and accelerate launch: 30 s), so it must come quickly."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.group = dist.new_group(backend="gloo")  # every process creates it, at the same point
        self.pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, asked_here: bool) -> bool:
        agreed = False
        if self.pending is not None:
            work, flags = self.pending
            work.wait()
            agreed = flags.item() > 0
        flags = torch.tensor([float(asked_here)])
        self.pending = (self.dist.all_reduce(flags, group=self.group, async_op=True), flags)
        return agreed

    def finish(self) -> None:
        """Wait for the last all-reduce, and keep it (environment.finish_collectives says why)."""
        if self.pending is not None:
            self.pending[0].wait()
            environment.keep_until_exit(self.pending[0])


def stopped(run: Run, progress: tqdm) -> bool:
    """Stop at this step boundary: the losses since the last log line logged (the resumed run logs from the
    next step on), and a checkpoint of it."""
    if run.last_log[1] < run.step:
        log_metrics(run, progress)
    checkpoint_unless_written(run)
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
    accelerator, unet = run.accelerator, run.unet
    total_loss = torch.zeros((), device=accelerator.device)
    for i, clean_images in enumerate(micro_batches):
        # Pinned by the loader on GPUs, so the copy is asynchronous.
        clean_images = clean_images.to(accelerator.device, non_blocking=True).contiguous(
            memory_format=run.memory_format)
        # Noise and timesteps are a pure function of (seed, step, process, micro-batch): a resumed run
        # draws exactly what the uninterrupted one would have, with no random state to restore.
        run.noise_generator.manual_seed(data.mix_seed(run.config.seed, run.step, accelerator.process_index, i))
        if run.config.compile and accelerator.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced across processes only on the last micro-batch.
        with contextlib.nullcontext() if last else accelerator.no_sync(unet):
            loss = training_loss(unet, run.noise_scheduler, clean_images, run.objective, run.noise_generator)
            accelerator.backward(loss / len(micro_batches))
        total_loss += loss.detach()
    grad_norm = None
    if run.config.max_grad_norm:  # under FSDP the norm comes back as a (replicated) DTensor
        grad_norm = sharding.full_tensor(accelerator.clip_grad_norm_(unet.parameters(), run.config.max_grad_norm))
    if run.config.skip_nonfinite and not everywhere_finite(run, total_loss, grad_norm):
        # fp16: the loss scaler must close its step (its next unscale would raise otherwise) and lower its
        # scale if the gradients overflowed. It checks them as it unscales them; with the gradients then
        # gone, its step changes no weight.
        if accelerator.scaler is not None and grad_norm is None:  # not unscaled for clipping
            accelerator.unscale_gradients()
        run.optimizer.zero_grad(set_to_none=True)
        if accelerator.scaler is not None:
            run.optimizer.step()
        run.lr_scheduler.step()  # the schedule stays aligned with the step count
        run.skipped_steps += 1
        return None
    if grad_norm is not None:
        run.running_grad_norm.add(grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None and (run.step + 1) % run.config.ema_update_every == 0:
        run.ema.step(sharding.local_tensors(unet.parameters()))
    return total_loss / len(micro_batches)


def is_finite(*values: torch.Tensor | None) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in values if value is not None)


def everywhere_finite(run: Run, *values: torch.Tensor | None) -> bool:
    """Whether every process saw finite values: all of them must skip a step together. A host sync and a
    collective per step, which is what --skip_nonfinite costs."""
    flag = torch.ones((), device=run.accelerator.device)
    for value in values:
        if value is not None:
            flag = flag * torch.isfinite(value).all()
    return run.accelerator.reduce(flag, reduction="mean").item() == 1.0


def log_metrics(run: Run, progress: tqdm) -> None:
    """Reduce the running means across processes (the one sync point) and write them out."""
    accelerator = run.accelerator
    mean_loss = run.running_loss.pop()  # None when every step since the last log was skipped
    if mean_loss is None:
        mean_loss = torch.tensor(float("nan"), device=accelerator.device)
    loss = accelerator.reduce(mean_loss, reduction="mean").item()
    grad_norm = run.running_grad_norm.pop()
    now = time.perf_counter()
    elapsed, steps = now - run.last_log[0], run.step - run.last_log[1]
    run.last_log = (now, run.step)
    values = {"step": run.step, "epoch": run.epoch, "loss": loss, "lr": run.lr_scheduler.get_last_lr()[0],
              "images_per_sec": round(steps * run.global_batch_size / elapsed, 2) if elapsed > 0 else None,
              "images_seen": run.images_seen}
    if grad_norm is not None:
        values["grad_norm"] = grad_norm.item()
    if run.ema is not None:
        values["ema_decay"] = run.ema.cur_decay_value
    if run.config.skip_nonfinite:
        values["skipped_steps"] = run.skipped_steps
    if not math.isfinite(loss) and not run.config.skip_nonfinite:
        raise diverged(run, f"the loss became {loss} between steps {run.step - steps} and {run.step}")
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}")
    accelerator.log({k: v for k, v in values.items() if k != "step" and v is not None}, step=run.step)
    if run.metrics_file is not None:
        run.metrics_file.write(values)


def diverged(run: Run, what: str) -> RunFailed:
    saved = checkpoint.complete_checkpoints(run.output_dir)
    last = f"{saved[-1][1].name} is the last good checkpoint" if saved else "no checkpoint was saved yet"
    rerun = "the command with --resume_from_checkpoint latest" if names_a_checkpoint(run.config) else \
        "the same command"
    return RunFailed(f"{what}; stopped, {last}. Lower --learning_rate (or pass --skip_nonfinite) and re-run {rerun} "
                     "to resume from it")


def epoch_start_step(run: Run) -> int:
    return run.epoch_offset + run.epoch * run.steps_per_epoch


def training_state(run: Run) -> dict[str, Any]:
    return {"step": run.step, "epoch": run.epoch, "epoch_start_step": epoch_start_step(run),
            "images_seen": run.images_seen, "seed": run.config.seed, "num_processes": run.accelerator.num_processes,
            "global_batch_size": run.global_batch_size, "fsdp": sharding.is_sharded(run.unwrapped_unet),
            **({"data_order": run.batches.order.seeding} if isinstance(run.batches, data.CachedBatches) else {})}


@off_the_clock
def save_checkpoint(run: Run) -> None:
    """A checkpoint of the state after run.step, never of a diverged one."""
    pending = run.running_loss.total
    if pending is not None and not is_finite(run.accelerator.reduce(pending.clone(), reduction="sum")):
        raise diverged(run, f"the loss became non-finite before step {run.step}")
    path = checkpoint.save_checkpoint(run.accelerator, run.output_dir, run.step, training_state(run), run.config,
                                      run.config.checkpoints_total_limit)
    run.checkpointed_step = run.step
    logger.info(f"saved {path}")


@contextlib.contextmanager
def averaged_unet(run: Run, everywhere: bool = False):
    """The EMA weights (the trained ones without --use_ema) as a plain UNet2DModel in eval mode: what sample
    grids, evaluations and exports use. None on the processes other than the main one, unless `everywhere`.
    Under FSDP every process must enter it: the shards are gathered into a copy where it is used."""
    wanted, sharded = everywhere or run.accelerator.is_main_process, sharding.is_sharded(run.unwrapped_unet)
    if not (wanted or sharded):
        yield None
        return
    with models.ema_weights(run.unwrapped_unet, run.ema) as unet:
        if sharded:
            unet = sharding.gathered_copy(unet, everywhere)
            if unet is None:  # a process that only took part in the gather
                yield None
                return
            unet.to(run.accelerator.device)
        unet.eval()
        try:
            yield unet
        finally:
            unet.train()


def preview_sampler(run: Run) -> tuple[Any, int]:
    """The scheduler and step count of the sample grids and evaluations."""
    config = run.config
    return (sampling.make_sampler(config.sampler, run.noise_scheduler.config),
            sampling.steps_for(config.sampler, config.sample_steps, config.ddpm_num_inference_steps))


def save_sample_grid(run: Run, unet: UNet2DModel) -> Path | None:
    """Sample images with a fixed seed (grids stay comparable over the run), as a PNG and to the trackers."""
    config = run.config
    scheduler, steps = preview_sampler(run)
    stop = run.stop
    try:
        images = sampling.generate(unet, scheduler, num_images=config.eval_batch_size, num_steps=steps, seed=0,
                                   batch_size=config.eval_batch_size, device=run.accelerator.device,
                                   cancelled=(lambda: stop.received is not None) if stop else None)
    except sampling.SamplingCancelled:  # a preview can take minutes; launchers kill a stopping run after 30 s
        logger.info(f"the sample grid of step {run.step} is left out: the run is stopping")
        return None
    folder = run.output_dir / PREVIEWS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"step-{run.step:07d}.png"
    sampling.image_grid(images).save(path)
    tracking.log_sample_images(run.accelerator.trackers, images, run.step)
    logger.info(f"samples ({config.sampler}, {steps} steps): {path}")
    return path


def open_feature_extractor(config: TrainConfig, accelerator: Accelerator) -> metrics.FeatureExtractor | None:
    """The FID network for --eval_every_steps, on every process (each measures its share of the samples).
    Without it (no weights, no torch-fidelity) on any process: a warning, once, and no evaluations."""
    if not config.eval_every_steps:
        return None
    extractor, problem = None, None
    with accelerator.main_process_first():  # a download of the weights, if needed, happens once
        try:
            extractor = metrics.inception_extractor(config.inception_weights, accelerator.device)
        except UsageError as error:
            problem = str(error)
    if accelerator.num_processes > 1:  # evaluations are collective: every process takes part, or none
        problem = next((p for p in gather_object([problem]) if p), None)
    if problem:
        logger.warning(f"--eval_every_steps: no FID/KID in this run; training goes on. {problem}")
        return None
    return extractor


@off_the_clock
def evaluate(run: Run) -> None:
    """FID and KID of samples of the EMA weights (the preview sampler; image i seeded i) against the training
    images. Every process samples and measures its share of the images, so the set is the same whatever the
    process count; the main process scores them, logs to the trackers and metrics.jsonl, and keeps the best
    export with --keep_best."""
    if run.feature_extractor is None:
        return
    config, accelerator = run.config, run.accelerator
    first, end = evaluation_share(config.eval_num_images, accelerator.num_processes, accelerator.process_index)
    scheduler, steps = preview_sampler(run)
    with averaged_unet(run, everywhere=True) as unet:
        batches = sampling.sample_batches(unet, scheduler, num_images=end - first, num_steps=steps, seed=first,
                                          batch_size=config.eval_batch_size, device=accelerator.device,
                                          progress=shows_inner_bars(run))
        shares = [metrics.extract_features(run.feature_extractor, batches)] if end > first else []
        if accelerator.num_processes > 1:
            shares = gather_object(shares)  # in process order: images 0..N-1
        if accelerator.is_main_process:
            scores = metrics.compare(np.concatenate(shares), training_reference(run), accelerator.device)
            if config.keep_best and scores.fid < run.best_fid:
                run.best_fid = scores.fid
                export_best(run, unet, scores)
    if accelerator.is_main_process:
        values = {key: value for key, value in scores.as_dict().items() if key not in ("num_generated",
                                                                                        "num_reference")}
        accelerator.log(values, step=run.step)
        run.metrics_file.write({"step": run.step, **values, "eval_images": scores.num_generated})
        logger.info(f"evaluation at step {run.step} ({scores.num_generated} images from {accelerator.num_processes} "
                    f"process(es), {config.sampler}, {steps} steps, against {scores.num_reference} training "
                    f"images): {scores}")
    accelerator.wait_for_everyone()


def shows_inner_bars(run: Run) -> bool:
    """Progress bars inside the training bar: on each machine's main process, and only on a terminal (a second
    bar is drawn with cursor movements, which a redirected log keeps as escape codes in its text)."""
    return run.accelerator.is_local_main_process and sys.stderr.isatty()


def evaluation_share(num_images: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """The images [first, end) this process samples for an evaluation: contiguous, nearly equal shares."""
    return process_index * num_images // num_processes, (process_index + 1) * num_images // num_processes


def training_reference(run: Run) -> metrics.FeatureStats:
    """Feature statistics of the training images (centre crops), computed once and kept in the output folder."""
    cache = run.batches.images.cache  # --streaming runs are refused --eval_every_steps (config.validate)
    indices = data.spread_choice(range(len(cache)), MAX_REFERENCE_IMAGES)
    key = f"{run.feature_extractor.identity}|{cache.folder.name}|{len(indices)} images|{run.config.resolution}px"

    def compute() -> metrics.FeatureStats:
        logger.info(f"computing FID reference statistics of {len(indices)} training images")
        batches = data.centre_crops((cache.image(i) for i in indices), run.config.resolution,
                                    run.config.eval_batch_size)
        batches = metrics.with_progress(batches, len(indices), "training", shown=shows_inner_bars(run))
        return metrics.feature_stats(metrics.extract_features(run.feature_extractor, batches),
                                     run.feature_extractor.name)

    return metrics.cached_stats(run.output_dir / REFERENCE_STATS_FILE, key, compute)[0]


def export_best(run: Run, unet: UNet2DModel, scores: metrics.Scores) -> None:
    """output_dir/best: the pipeline with the lowest FID so far, and its scores."""
    folder = run.output_dir / BEST_DIR
    checkpoint.export_pipeline(unet, run.noise_scheduler, folder, training_state(run))
    (folder / "scores.json").write_text(json.dumps({"step": run.step, **scores.as_dict()}, indent=2) + "\n")
    logger.info(f"best FID so far ({scores.fid:.3f}): exported to {folder}")


def export(run: Run, unet: UNet2DModel) -> None:
    """The pipeline folder with `unet` (averaged_unet's), the model card and the loss plot; upload if asked."""
    checkpoint.export_pipeline(unet, run.noise_scheduler, run.output_dir,
                               {**training_state(run), "finished": run.step >= run.max_train_steps})
    records = run.metrics_file.read() if run.metrics_file else []
    tracking.plot_metrics(records, run.output_dir / tracking.LOSS_PLOT_FILE)
    write_card(run, records)
    logger.info(f"exported the pipeline at step {run.step} to {run.output_dir}")
    if isinstance(run.batches, streaming.StreamedBatches):  # what the stream held is known only as it goes
        run.batches.write_report(run.output_dir / data.REPORT_FILE)
        logger.info(run.batches.summary())
    if run.uploads is not None:
        run.uploads.submit(run.step)


def write_card(run: Run, records: list[dict[str, Any]]) -> None:
    config = run.config
    grids = sorted((run.output_dir / PREVIEWS_DIR).glob("step-*.png"))
    last = records[-1] if records else {}
    metrics = {"dataset": data_description(config), "resolution": config.resolution,
               "optimizer steps": run.step, "images seen": run.images_seen,
               "global batch": f"{run.global_batch_size} ({config.train_batch_size} per device x "
                               f"{run.accelerator.num_processes} process(es) x {config.gradient_accumulation_steps} "
                               "accumulation)",
               "learning rate": f"{config.learning_rate} ({config.lr_scheduler}, "
                                f"{config.lr_warmup_steps} warmup steps)",
               "prediction type": config.prediction_type, "EMA": config.use_ema,
               "mixed precision": config.mixed_precision}
    if "loss" in last:
        metrics["final loss (mean over the last logging interval)"] = f"{last['loss']:.4f}"
    # The card's usage code samples as the previews did, with the same scheduler settings.
    sample_steps = sampling.steps_for(config.sampler, config.sample_steps, config.ddpm_num_inference_steps)
    usage_code = sampling.diffusers_usage_code(config.sampler, run.noise_scheduler.config,
                                               run.repo_id or str(run.output_dir), sample_steps)
    hub.write_model_card(run.output_dir, {
        "title": run.repo_id or run.output_dir.resolve().name,
        "dataset": data_description(config),
        "hub_dataset": hub_dataset_id(config),
        "parameters": run.parameters_in_millions,
        "resolution": config.resolution, "channels": run.unwrapped_unet.config.in_channels,
        "steps": run.step, "images_seen": run.images_seen,
        "grid": grids[-1].relative_to(run.output_dir).as_posix() if grids else None,
        "metrics": metrics, "command": run.command, "usage_code": usage_code,
    })


def data_description(config: TrainConfig) -> str:
    return config.dataset_name or f"images from {Path(config.train_data_dir).name}"


def hub_dataset_id(config: TrainConfig) -> str | None:
    """The dataset's Hub id for the card's metadata; None for local data and the built-in digits."""
    name = config.dataset_name
    if not name or name.startswith(data.BUILTIN_PREFIX) or Path(name).exists():
        return None
    return name


def reproduce_command(argv: list[str], num_processes: int, chosen_seed: int | None, sharded: bool = False) -> str:
    """The command line of this run (`argv` with the token already masked by config.public_argv), with the
    launcher for several processes, and the seed when it was chosen at random."""
    words = list(argv)
    if chosen_seed is not None:
        words += ["--seed", str(chosen_seed)]
    launcher = "uncond"
    if sharded:
        launcher = f"accelerate launch --config_file {FSDP_CONFIG} --num_processes {num_processes} -m uncond"
    elif num_processes > 1:
        launcher = f"accelerate launch --multi_gpu --num_processes {num_processes} -m uncond"
    return launcher + " " + " ".join(shlex.quote(word) for word in words)


def names_a_checkpoint(config: TrainConfig) -> bool:
    """Whether this run resumed from a named checkpoint: run again as it is, it would go back to that one."""
    return config.resume_from_checkpoint not in (None, "latest")


def resuming_latest(argv: list[str], config: TrainConfig) -> list[str]:
    """`argv` set to go on from the newest checkpoint (--resume_from_checkpoint latest instead of a named one,
    given on the command line or in a config file)."""
    if not names_a_checkpoint(config) and not config.overwrite_output_dir:
        return list(argv)
    words, skip = [], False
    for word in argv:  # --overwrite_output_dir would remove the checkpoint to resume from
        if not skip and not word.startswith(("--resume_from_checkpoint", "--overwrite_output_dir")):
            words.append(word)
        skip = word == "--resume_from_checkpoint"
    return words + ["--resume_from_checkpoint", "latest"]


def tracker_config(config: TrainConfig) -> dict[str, Any]:
    """Settings for the trackers' hyperparameter tables: scalars only, token dropped."""
    return {k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))}
