"""The parts of a training run (`Run`: accelerator, batches, UNet, EMA, optimizer, schedule), built from a plan,
and the place in the run and the data a resume goes on from."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator, AutocastKwargs, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list, gather_object, set_seed
from diffusers import DDPMScheduler, UNet2DModel

from . import (checkpoint, cpu_threads, data, environment, hub, metrics, models, run_folder, sampling, sharding,
               sources, streaming, tracking)
from .config import RunFailed, RunStopped, TrainConfig, UsageError, counted, first_line
from .objective import Objective
from .plan import (Plan, Position, checkpoints_beyond_disk, epoch_steps, global_batch, learning_rate_schedule,
                   refuse_mismatched_resume, run_length, schedule_change_note, warmup_outlasts_run)
from .step_graph import StepGraph
from .stopping import StopAgreement, StopSignal
from .version import uncond_version

logger = logging.getLogger("uncond")  # cli shows its records on the main process only


@dataclass
class Run:
    """Everything the loop touches."""
    config: TrainConfig
    accelerator: Accelerator
    output_dir: Path
    batches: data.CachedBatches | streaming.StreamedBatches
    unet: torch.nn.Module
    # unet's parameters, listed once: a walk of the seed UNet's module tree takes 0.7 ms of host time (2-core CPU,
    # benchmarks/host_time.py), and an eager step on a GPU is bound by host time. Under FSDP2, its sharded tensors
    # (the optimizer holds the same ones).
    parameters: list[torch.nn.Parameter]
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
    # The command lines that trained the model, each with the step it went on from (several after resumes with
    # other commands), for the model card; recorded in checkpoints.
    commands: list[dict[str, Any]] = field(default_factory=list)
    tracker_run_id: str = ""  # Plan.tracker_run_id
    resume_command: str = ""  # the command that goes on from this run's newest checkpoint
    metrics_file: tracking.MetricsFile | None = None
    running_loss: tracking.RunningMean = field(default_factory=tracking.RunningMean)
    running_grad_norm: tracking.RunningMean = field(default_factory=tracking.RunningMean)
    last_log: tuple[float, int, int] = (0.0, 0, 0)  # (time, step, images seen) at the previous log line
    loss_plot_due: float = -math.inf  # when loss.png is next redrawn at a log line (time.perf_counter)
    clock_stopped: bool = False  # within work between steps, which images/s leaves out (off_the_clock)
    noise_generator: torch.Generator | None = None
    skipped_steps: int = 0  # non-finite steps skipped under --skip_nonfinite
    memory_format: torch.memory_format = torch.contiguous_format  # the UNet's, given to its inputs too
    feature_extractor: metrics.FeatureExtractor | None = None  # for --eval_every_steps; None: no evaluation
    best_fid: float = math.inf
    stop: StopSignal | None = None  # while training: a preview under way gives up when a stop is asked for
    preview_owed: int | None = None  # the step whose sample grid a stop gave up: a run resumed there makes it
    evaluation_owed: int | None = None  # likewise, the step whose --eval_every_steps evaluation a stop gave up
    stop_agreement: StopAgreement | None = None  # with several processes
    step_graph: StepGraph | None = None  # --cuda_graphs: records and replays the step's gradients (train.step_graph)
    # a CPU run's threads, fewer while other processes keep cores busy
    threads: cpu_threads.ThreadGovernor = field(default_factory=lambda: cpu_threads.ThreadGovernor(None))

    @property
    def unwrapped_unet(self) -> UNet2DModel:
        """The module without DDP's or torch.compile's wrapper (under FSDP, still sharded)."""
        return self.accelerator.unwrap_model(self.unet, keep_torch_compile=False)

    @property
    def parameters_in_millions(self) -> str:
        """For the log and the model card; under FSDP, numel counts whole tensors, not shards."""
        return f"{sum(p.numel() for p in self.unwrapped_unet.parameters()) / 1e6:.2f}M"


def trained_precision(config: TrainConfig, accelerator: Accelerator) -> str:
    """--mixed_precision as the run trains it (accelerate trains fp16 on CPUs in fp32)."""
    if config.mixed_precision == "no" or accelerator.native_amp:
        return config.mixed_precision
    return f"fp32 (no {config.mixed_precision} autocast on {accelerator.device.type})"


def make_accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
    try:
        with environment.sigterm_ends_while_processes_meet():  # torch waits for the others in C++
            return Accelerator(
                cpu=environment.cpu_processes(),
                mixed_precision=config.mixed_precision,
                log_with=None if config.logger == "none" else config.logger,
                project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                    logging_dir=str(run_folder.trackers_folder(output_dir,
                                                                                               config.logging_dir))),
                # The LR schedule counts optimizer steps; we step it once per optimizer step ourselves.
                step_scheduler_with_optimizer=False,
                # Decoding a large dataset on the main process must not time out the others.
                kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))]
                # --cuda_graphs: autocast keeps no cache of bf16 weight copies across a recording (PyTorch asks it of
                # graphed callables; here it costs nothing, as each weight is cast once per step anyway).
                + ([AutocastKwargs(cache_enabled=False)] if config.cuda_graphs else []),
                # On GPUs, CUDA graphs ("reduce-overhead"): the eager step of these UNets is bound by kernel
                # launches (docs/benchmarks.md: 58 ms per step on an H100 even at batch 1).
                dynamo_plugin=TorchDynamoPlugin(backend="inductor", mode="reduce-overhead" if torch.cuda.is_available()
                                                else None) if config.compile else None,
            )
    except ValueError as error:
        if "torch.distributed" in str(error):  # a LOCAL_RANK left in the environment, without a launcher's RANK
            raise UsageError(f"cannot join the processes of a launch ({first_line(error)}): start it with `accelerate "
                             "launch` or torchrun, which set RANK, WORLD_SIZE and the rest, or unset LOCAL_RANK to "
                             "train in one process") from None
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
        source = sources.open_source(config)
        cache = data.load_images(source, config, progress=accelerator.is_local_main_process)
    logger.info(data.summary(cache, source))
    if accelerator.num_processes > 1:
        check_same_images(accelerator, len(cache))
    on_main_process(accelerator, lambda: data.write_report(  # a full disk here stops every process, said
        Path(config.output_dir) / data.REPORT_FILE, len(cache), cache.meta["skipped"], cache.meta["upscaled"],
        cache.meta.get("upscaled_examples", []), cache=str(cache.folder)))
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
        other = "a model" if config.pretrained_model_name_or_path else "a config"
        if plan.channels_from_model_config == 1 and not all_gray():  # e.g. a config copied from an MNIST model
            logger.warning(f"{models.model_source(config)} has in_channels 1: the colour images are trained as "
                           f"grayscale{judged_from}; {other} with in_channels 3 keeps their colour")
        if plan.channels_from_model_config == 3 and all_gray():  # the seed script's way: gray copied to RGB
            logger.warning(f"{models.model_source(config)} has in_channels 3: the grayscale images are trained as "
                           f"RGB with three equal channels{judged_from}; {other} with in_channels 1 trains a "
                           "1-channel model of them")
        return plan.channels_from_model_config
    if config.num_channels != "auto":
        return int(config.num_channels)
    channels = 1 if all_gray() else 3
    logger.info(("--num_channels auto: every image is grayscale, training a 1-channel model" if channels == 1
                 else "--num_channels auto: colour images found, training a 3-channel (RGB) model") + judged_from)
    return channels


def build_run(plan: Plan, accelerator: Accelerator) -> Run:
    """The run's parts, each from those before it: data, UNet, optimizer, the run's length, schedule, EMA."""
    config = plan.config
    # glibc's allocator keeps freed buffers for the steps; handed back when the run ends (train.train_as_planned)
    speedups = ["glibc malloc keeps freed buffers"] if environment.keep_freed_memory() else []
    batches = load_batches(plan, accelerator)
    unet_config = models.with_channels(plan.unet_config, batches.channels)
    if plan.resume_from is not None:
        refuse_mismatched_resume(plan.resume_from, config, unet_config)
    unet = initial_unet(plan, unet_config)
    speedups += models.speed_up(unet, config, accelerator.device)
    optimizer, fused = make_optimizer(unet, config, accelerator.device)
    threads = cpu_threads.ThreadGovernor.for_run(accelerator.device)
    speedups += ["fewer CPU threads while other processes keep cores busy"] * threads.active
    log_speed(config, accelerator, speedups + ["fused AdamW"] * fused)

    steps_per_epoch = epoch_steps(config, batches.batches_per_epoch)
    global_batch_size = global_batch(config, accelerator.num_processes)
    # --num_epochs counts the whole run's epochs; those before a resume with another global batch had
    # another length (the schedule must know the total before it is built).
    images = (batches.num_images, getattr(batches, "images_key", None))
    position, max_train_steps = run_length(plan, steps_per_epoch, global_batch_size, accelerator.num_processes, images)
    epoch_offset = position.epoch_offset if position else 0
    if accelerator.is_main_process:
        for warning in (warmup_outlasts_run(config, max_train_steps), checkpoints_beyond_disk(
                config, sum(weight.numel() for weight in unet.parameters()), plan.resume_step or 0, max_train_steps)):
            if warning:
                logger.warning(warning)
    lr_scheduler = learning_rate_schedule(optimizer, config.to_dict(), max_train_steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    # After prepare: on the device already, and under FSDP over this process's shards.
    ema = models.make_ema(accelerator.unwrap_model(unet, keep_torch_compile=False), config) if config.use_ema else None
    checkpoint.register_state_hooks(accelerator, unet, ema)
    return Run(config=config, accelerator=accelerator, output_dir=Path(config.output_dir), batches=batches,
               unet=unet, parameters=list(unet.parameters()), ema=ema,
               noise_scheduler=noise_schedule(config, accelerator.device),
               objective=Objective(config.prediction_type, config.snr_gamma, config.noise_offset),
               optimizer=optimizer, lr_scheduler=lr_scheduler, max_train_steps=max_train_steps,
               steps_per_epoch=steps_per_epoch,
               num_epochs=math.ceil((max_train_steps - epoch_offset) / steps_per_epoch),
               global_batch_size=global_batch_size, resume_position=position,
               noise_generator=torch.Generator(accelerator.device),
               memory_format=torch.channels_last if models.uses_channels_last(config, accelerator.device)
               else torch.contiguous_format, threads=threads)


def initial_unet(plan: Plan, unet_config: dict[str, Any]) -> UNet2DModel:
    """The UNet the run starts from, the same on every process: seeded, with the weights of the model given with
    --pretrained_model_name_or_path if any (a resume takes its checkpoint's instead)."""
    set_seed(plan.config.seed)
    unet = models.build_unet(unet_config)
    if plan.pretrained is not None and plan.resume_from is None:
        unet.load_state_dict(plan.pretrained.state_dict())
    plan.pretrained = None  # its copy of the weights is not needed again
    return unet


def log_speed(config: TrainConfig, accelerator: Accelerator, speedups: list[str]) -> None:
    """The log's `speed:` line: `speedups` (the allocator's, the UNet's, the optimizer's), then the precision, the
    GPU's settings (turned on here, tune_cuda), compiling, CUDA graphs and the EMA."""
    if config.mixed_precision != "no" and accelerator.native_amp:
        speedups.append(f"{config.mixed_precision} autocast")
    elif config.mixed_precision != "no":  # accelerate 1.15 runs fp16 on CPUs in fp32, without a word
        logger.warning(f"--mixed_precision {config.mixed_precision} on {accelerator.device.type}: accelerate has no "
                       f"{config.mixed_precision} autocast there and trains in fp32; --mixed_precision bf16 is the "
                       "half precision CPUs run")
    speedups += tune_cuda(config, accelerator.device)
    if config.compile:
        speedups.append("torch.compile with CUDA graphs" if accelerator.device.type == "cuda" else "torch.compile")
        # diffusers' upsampling asks for the torch version through an lru_cache'd function, which dynamo warns
        # about in six lines from every process; that function is pure, so tracing through its cache is exact.
        warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped")
    if config.cuda_graphs:
        speedups.append("forward and backward passes replayed as a CUDA graph")
    if config.use_ema:
        speedups.append(f"foreach EMA every {counted(config.ema_update_every, 'step')}")
    logger.info(f"speed: {', '.join(speedups) or 'plain fp32'}")


def noise_schedule(config: TrainConfig, device: torch.device) -> DDPMScheduler:
    noise_scheduler = sampling.training_noise_scheduler(config.to_dict())
    # On the device once: add_noise and compute_snr would otherwise copy it from the host every step.
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    return noise_scheduler


def make_optimizer(unet: torch.nn.Module, config: TrainConfig, device: torch.device) -> tuple[torch.optim.AdamW, bool]:
    """The seed's AdamW, as torch's fused kernel on GPUs and CPUs: one launch for all parameters on a GPU instead
    of several per tensor; one pass over each tensor on a CPU (a third of the time of torch's per-tensor default
    there for the seed UNet, benchmarks/step_ops.py)."""
    fused = config.fused_adamw and device.type in ("cuda", "cpu")
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


def resume(run: Run, path: Path, notes: list[str]) -> None:
    """Restore the training state (weights, EMA, optimizer, schedule, random states) and go on from the place
    build_run found. The optimizer, schedule and weights are the same whatever the process count. `notes`
    (Plan.resume_notes) say what the resume changes, where the run goes on."""
    position = run.resume_position
    going_on = position.step < run.max_train_steps  # else the run is complete: nothing of it is said
    for note in notes if going_on else []:
        logger.warning(note)
    checkpoint.load_checkpoint(run.accelerator, path)
    # The schedule's state holds the learning rate it was built with, and the optimizer the rate of the next
    # step and its other settings; this run's flags win in both, so a diverged run can be resumed with a
    # lower --learning_rate (or more --adam_weight_decay).
    schedule = run.lr_scheduler.scheduler  # diffusers' schedules are all LambdaLR: base rate x factor(step)
    saved_rate, saved_factor = schedule.get_last_lr()[0], schedule.get_last_lr()[0] / schedule.base_lrs[0]
    schedule.base_lrs = [run.config.learning_rate] * len(run.optimizer.param_groups)
    rates = [base * factor(schedule.last_epoch) for base, factor in zip(schedule.base_lrs, schedule.lr_lambdas)]
    if going_on and not math.isclose(rates[0] / schedule.base_lrs[0], saved_factor, rel_tol=1e-3, abs_tol=1e-6):
        # A run extended past its end, or shortened: its schedule spans the new length (an extended cosine's rate,
        # at 0 at the old end, goes back up), which a loss curve shows as a jump; or another schedule.
        # (plan.schedule_change says it for --dry_run.)
        logger.info(schedule_change_note(run.config, checkpoint.saved_run_config(path).get("lr_scheduler"), path.name,
                                         run.max_train_steps, position.step, rates[0], saved_rate))
    for group, rate in zip(run.optimizer.param_groups, rates):
        group.update(lr=rate, **adam_settings(run.config))
    if position.note and going_on:
        logger.info(position.note)
    run.step, run.epoch, run.images_seen = position.step, position.epoch, position.images_seen
    run.epoch_offset, run.checkpointed_step = position.epoch_offset, position.step
    run.preview_owed, run.evaluation_owed = position.preview_owed, position.evaluation_owed
    if position.log_window:
        loss = position.log_window["loss"]
        if len(loss.get("totals") or ()) == run.accelerator.num_processes:  # see train.save_checkpoint
            loss = {**loss, "total": loss["totals"][run.accelerator.process_index]}
        run.running_loss.restore(loss, run.accelerator.device)
        run.running_grad_norm.restore(position.log_window["grad_norm"], run.accelerator.device)


def drop_replaced_run(run: Run) -> None:
    """After this run's first save: the earlier run --overwrite_output_dir set aside is removed."""
    if run.accelerator.is_main_process and run_folder.remove_replaced_run(run.output_dir):
        logger.info(f"removed the earlier run set aside by --overwrite_output_dir "
                    f"({run.output_dir / run_folder.REPLACED_DIR})")


def epoch_start_step(run: Run) -> int:
    return run.epoch_offset + run.epoch * run.steps_per_epoch


def training_state(run: Run) -> dict[str, Any]:
    return {"step": run.step, "epoch": run.epoch, "epoch_start_step": epoch_start_step(run),
            "images_seen": run.images_seen, "num_images": run.batches.num_images, "seed": run.config.seed,
            "max_train_steps": run.max_train_steps,  # the length its learning-rate schedule spans (plan.dry_run)
            "precision": trained_precision(run.config, run.accelerator),  # fp16 on a CPU trains in fp32
            "num_processes": run.accelerator.num_processes, "global_batch_size": run.global_batch_size,
            "fsdp": sharding.is_sharded(run.unwrapped_unet), "commands": commands_with_threads(run),
            "tracker_run_id": run.tracker_run_id, "preview_owed": run.preview_owed,
            "evaluation_owed": run.evaluation_owed, "uncond_version": uncond_version(),  # what wrote it
            **({"data_order": run.batches.order.seeding, "images_key": run.batches.images_key}
               if isinstance(run.batches, data.CachedBatches) else {})}


def commands_with_threads(run: Run) -> list[dict[str, Any]]:
    """run.commands, this turn's with the fewest CPU threads it trained on where that was fewer than it started
    with (cpu_threads: beside busy processes): its software record names the count it started with, and the
    card offers that count as one that bitwise equal weights need (trial 61 F3)."""
    if run.threads.fewest == run.threads.most or not run.commands:
        return run.commands
    *earlier, this_turn = run.commands
    return [*earlier, {**this_turn, "fewest_threads": min(this_turn.get("fewest_threads", run.threads.most),
                                                          run.threads.fewest)}]


@contextlib.contextmanager
def averaged_unet(run: Run, everywhere: bool = False):
    """The EMA weights (the trained ones without --use_ema) as a plain UNet2DModel in eval mode: what sample
    grids, evaluations and exports use. None on the processes other than the main one, unless `everywhere`.
    Under FSDP every process must enter it: the shards are gathered into a copy where it is used."""
    wanted, sharded = everywhere or run.accelerator.is_main_process, sharding.is_sharded(run.unwrapped_unet)
    if not (wanted or sharded):
        yield None
        return
    with models.ema_weights(run.unwrapped_unet, run.ema, run.step) as unet:
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


T = TypeVar("T")


def on_main_process(accelerator: Accelerator, work: Callable[[], T]) -> T | None:
    """`work` on the main process; its result, or its failure, reaches every process (the others would
    otherwise wait for the main one forever)."""
    if accelerator.num_processes == 1:
        return work()
    outcome: list[Any] = [None, None]  # result, failure as the other processes raise it
    failure = None
    if accelerator.is_main_process:
        try:
            outcome[0] = work()
        except (Exception, RunStopped) as error:  # noqa: BLE001 - a full disk, say: raised as it is here, said there
            failure = error
            # uncond's own of its kind (a folder in use has an exit status of its own; a stop stops them all)
            outcome[1] = (error if isinstance(error, RunStopped) else
                          type(error)(str(error)) if isinstance(error, (UsageError, RunFailed)) else
                          RunFailed(f"the main process failed ({type(error).__name__}: {first_line(error)})"))
    outcome = broadcast_object_list(outcome)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def off_the_clock(work: Callable[..., T]) -> Callable[..., T]:
    """For the work between training steps (previews, exports, evaluations, checkpoints): its time is left
    out of the images/s of the logging interval it falls in, which would otherwise count it as training."""
    @functools.wraps(work)
    def timed(run: Run, *args: Any, **kwargs: Any) -> T:
        if run.clock_stopped:  # called by other work off the clock (an export's loss plot): counted there
            return work(run, *args, **kwargs)
        started, run.clock_stopped = time.perf_counter(), True
        try:
            return work(run, *args, **kwargs)
        finally:
            run.clock_stopped = False
            run.last_log = (run.last_log[0] + time.perf_counter() - started, *run.last_log[1:])
    return timed
