"""The plan of a training run: every check that needs no decoding and no weights, made before any heavy
work, so that bad input stops the run with one clear line; and --dry_run, which prints the plan."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.utils import is_torch_version

from . import accelerate_configs, checkpoint, data, environment, models, run_folder, sampling, sources
from .config import (BETA_SCHEDULES, SETTINGS, TrainConfig, UsageError, check_utf8_path, check_zero_snr, counted,
                     nearest_existing, size_text)

logger = logging.getLogger("uncond")


@dataclass
class Plan:
    """What the run will do, resolved and checked before any heavy work."""
    config: TrainConfig
    unet_config: dict[str, Any]  # without the channel count, which may depend on the data
    channels_from_model_config: int | None
    resume_from: Path | None
    resume_message: str
    resume_state: dict[str, Any] = field(default_factory=dict)  # the checkpoint's training_state.json
    # The run's id in trackers that resume a run by id (W&B): the checkpoint's, so a resumed run goes on in the
    # same tracker run, else a new one
    tracker_run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    pretrained: Any = None  # --pretrained_model_name_or_path's UNet2DModel, whose weights a new run starts from
    # What the resume changes (checkpoint.resume_notes): said where the run goes on, not of a run that is complete
    resume_notes: list[str] = field(default_factory=list)

    @property
    def resume_step(self) -> int | None:
        """The step of the checkpoint resumed from (the seed script's checkpoints have it in their name only)."""
        if self.resume_from is None:
            return None
        return checkpoint.checkpoint_step(self.resume_from, self.resume_state)


def plan_run(config: TrainConfig, explicit: set[str] | frozenset[str] = frozenset()) -> Plan:
    """Every check that needs no decoding and no model weights (but a model to fine-tune, loaded here once).
    Raises UsageError with one clear line. Writes nothing, but for putting back an earlier run that a killed
    --overwrite_output_dir run left half set aside."""
    if config.model_preset and "resolution" not in explicit:
        config = config.replace(resolution=models.preset_named(config.model_preset).resolution)
    put_back = run_folder.put_back_interrupted_set_aside(Path(config.output_dir))  # the folder whole, to look at
    if put_back:
        logger.warning(put_back)
    resume_from, message = run_folder.find_resume_checkpoint(config)
    config, pretrained, model_config = read_starting_model(config, explicit, resume_from)
    config = settle_launch_and_preview_defaults(config, explicit)
    check_paths(config)
    warn_ignored_settings(config, explicit)
    if note := seed_schedule_difference(config, environment.launched_processes()):
        logger.info(note)
    if config.train_data_dir and Path(config.train_data_dir).resolve() == Path(config.output_dir).resolve():
        raise UsageError(f"--train_data_dir and --output_dir are both {config.output_dir}: the run's sample grids "
                         "would be read as training images; choose another --output_dir")
    check_preview_sampler(config, explicit)
    unet_config = models.unet_config_for(config, config.resolution, model_config)
    channels_from_model_config = model_channels(config, unet_config) if model_config is not None else None
    check_environment(config, unet_config)
    if resume_from is not None and config.overwrite_output_dir:  # a script passing both, as the seed allowed
        logger.warning(f"--overwrite_output_dir is ignored: --resume_from_checkpoint {config.resume_from_checkpoint} "
                       f"goes on from {resume_from.name}")
    message = run_folder.check_output_dir(config, resuming=resume_from is not None) or message
    if resume_from is not None:
        check_resume(resume_from, config, explicit, unet_config)
    resume_state = checkpoint.read_training_state(resume_from) if resume_from is not None else {}
    plan = Plan(config, unet_config, channels_from_model_config, resume_from, message, resume_state,
                resume_state.get("tracker_run_id") or secrets.token_hex(4), pretrained)
    if resume_from is not None:
        if config.max_train_steps:  # else the last step is known once the data is
            refuse_resume_past_end(plan, config.max_train_steps)
        plan.resume_notes = checkpoint.resume_notes(resume_from, config, resume_state)
    return plan


def read_starting_model(config: TrainConfig, explicit: set[str] | frozenset[str], resume_from: Path | None
                        ) -> tuple[TrainConfig, Any, dict[str, Any] | None]:
    """The model a run starts from, read once (from the Hub, perhaps): --pretrained_model_name_or_path's UNet
    with its weights, or --model_config_name_or_path's config. Returns the config with the model's resolution,
    the pretrained UNet (or None) and the model's config (or None, for a preset's)."""
    pretrained, model_config = None, None
    if config.pretrained_model_name_or_path:
        config, pretrained, model_config = adopt_pretrained(config, explicit, resume_from)
    elif config.model_config_name_or_path and not config.model_preset:
        model_config = models.load_unet_config(config.model_config_name_or_path, config.cache_dir)
    if model_config is None or "resolution" in explicit:
        return config, pretrained, model_config
    # As a preset's: the model is trained at the size it was made for (the seed script trained a 32 px config
    # on 64 px images, and its pipeline then generated at 32 px)
    size = model_config.get("sample_size")
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:  # [64, 64], as diffusers also writes it
        size = size[0]
    if size is not None and not isinstance(size, (int, list, tuple)):  # "16" was ignored: 64 px
        raise UsageError(f"{models.model_source(config)}: its sample_size {size!r} is not a number of pixels")
    if isinstance(size, (list, tuple)):
        raise UsageError(f"{models.model_source(config)}: its sample_size {list(size)} is not square, and "
                         "uncond trains square images; pass --resolution N to train it at N x N")
    if isinstance(size, int):
        models.check_resolution(model_config, size, f"{models.model_source(config)}'s sample_size")
    if isinstance(size, int) and size != config.resolution:
        logger.info(f"--resolution {size}: the sample_size of {models.model_source(config)} (give --resolution "
                    "to train at another size)")
        config = config.replace(resolution=size)
    return config, pretrained, model_config


def settle_launch_and_preview_defaults(config: TrainConfig, explicit: set[str] | frozenset[str]) -> TrainConfig:
    """Defaults that depend on how the run was launched or on the seed script's flags that were given."""
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by `accelerate launch`
    if launcher_precision and "mixed_precision" not in explicit:
        # Without --mixed_precision, the launch's setting (its config file or flag) applies; the seed
        # script's default "no" overrode it.
        config = config.replace(mixed_precision=launcher_precision)
    if "ddpm_num_inference_steps" in explicit and "sampler" not in explicit:
        # The seed script's flag, given: its grids were DDPM's, with that many steps.
        config = config.replace(sampler="ddpm")
    elif given_otherwise(config, explicit, "ddpm_num_inference_steps") and config.sampler != "ddpm":
        # a migrated script, and a new flag
        logger.warning(f"--ddpm_num_inference_steps {config.ddpm_num_inference_steps} is for the ddpm sampler; the "
                       f"previews use --sampler {config.sampler} with --sample_steps {config.sample_steps}")
    if "ddpm_num_inference_steps" not in explicit and config.ddpm_num_inference_steps > config.ddpm_num_steps:
        # the default 1000 on a shorter schedule: every timestep, as `uncond sample --sampler ddpm` takes it
        config = config.replace(ddpm_num_inference_steps=config.ddpm_num_steps)
    return config


def check_paths(config: TrainConfig) -> None:
    """The data exists and the run's folders can be made (its output, the decoded-image cache)."""
    sources.check_source(config)
    check_utf8_path("--output_dir", config.output_dir)
    run_folder.check_creatable(config.output_dir, "--output_dir")
    if config.cache_dir:
        run_folder.check_creatable(config.cache_dir, "--cache_dir")
    elif not config.streaming:  # $XDG_CACHE_HOME/uncond or ~/.cache/uncond: a read-only home, a job's odd setting
        run_folder.check_creatable(str(data.cache_root(None)), "the decoded-image cache",
                                   instead="pass --cache_dir DIR on a writable disk")


def warn_ignored_settings(config: TrainConfig, explicit: set[str] | frozenset[str]) -> None:
    """Settings the seed script ignored without a word: ignored here too, but said."""
    for name in ("image_column", "dataset_config_name"):
        if getattr(config, name) and not config.dataset_name:
            logger.warning(f"--{name} {getattr(config, name)} is ignored: it applies to --dataset_name, and "
                           f"--train_data_dir {config.train_data_dir}'s files are the images")
    for warning in ignored_settings(config, explicit):
        logger.warning(warning)
    if config.dataset_name and config.train_data_dir:
        logger.warning(f"--train_data_dir {config.train_data_dir} is ignored: --dataset_name {config.dataset_name} "
                       "is given")


def check_preview_sampler(config: TrainConfig, explicit: set[str] | frozenset[str]) -> None:
    """The preview sampler on the training schedule: a sampler that cannot take it would fail at the first
    preview. Also says a schedule that leaves signal at its last timestep, and ddpm grids that start late."""
    preview_steps = sampling.steps_for(config.sampler, config.sample_steps, config.ddpm_num_inference_steps)
    noise_scheduler = sampling.training_noise_scheduler(config.to_dict())
    schedule_of_a_model = config.pretrained_model_name_or_path and not explicit & set(SCHEDULE_OF_THE_MODEL)
    if not schedule_of_a_model and (warning := signal_left_at_the_end(config, noise_scheduler)):
        logger.warning(warning)  # a model's own schedule is kept as it was trained, whatever it leaves
    steps_flag = "--ddpm_num_inference_steps" if config.sampler == "ddpm" else "--sample_steps"
    sampling.check_sampler_fits(config.sampler, dict(noise_scheduler.config), preview_steps, steps_flag)
    if config.sampler == "ddpm":  # the grids of a run would stay noisy without a word
        sampling.warn_of_a_late_start(sampling.make_sampler("ddpm", noise_scheduler.config), preview_steps,
                                      steps_flag)


def model_channels(config: TrainConfig, unet_config: dict[str, Any]) -> int:
    """The channel count a given model config sets (grayscale or RGB, the same in and out), checked against
    --num_channels."""
    channels = int(unet_config.get("in_channels", 3))
    out_channels = int(unet_config.get("out_channels", 3))
    if channels not in (1, 3) or out_channels != channels:
        raise UsageError(f"{models.model_source(config)}: in_channels {channels} and out_channels {out_channels}; "
                         "uncond trains on grayscale (1) or RGB (3) images, the same count in and out")
    if config.num_channels != "auto" and int(config.num_channels) != channels:
        raise UsageError(f"--num_channels {config.num_channels} contradicts {models.model_source(config)}, "
                         f"whose in_channels is {channels}; drop one of them")
    return channels


def check_environment(config: TrainConfig, unet_config: dict[str, Any]) -> None:
    """What the run needs of the installed packages and of its launch."""
    check_tracker(config.logger)
    if config.enable_xformers_memory_efficient_attention and not module_available("xformers"):
        raise UsageError("--enable_xformers_memory_efficient_attention needs xformers (pip install xformers); "
                         "without the flag, PyTorch's own fused attention is used")
    check_launch(config)
    check_compile(config, environment.expected_device_type())  # also for --dry_run; made again once launched
    check_cuda_graphs(config, environment.expected_device_type(), environment.launched_processes())
    warn_one_cpu_process()
    warn_slurm_tasks_without_launcher()
    check_fsdp_units(unet_config)


def check_resume(resume_from: Path, config: TrainConfig, explicit: set[str] | frozenset[str],
                 unet_config: dict[str, Any]) -> None:
    """The checkpoint fits this command (the channel count is compared again once the data has decided it)."""
    refuse_mismatched_resume(resume_from, config, unet_config)
    if checkpoint.kept_ema(resume_from) and not config.use_ema and "use_ema" not in explicit:
        # A re-run typed without --use_ema would drop the EMA, the weights the exports hold, and rotate away
        # the checkpoints that keep it.
        raise UsageError(f"{resume_from.name}'s run kept an EMA of the weights (its exports hold it): pass "
                         "--use_ema to go on with it, or --no-use_ema to drop it")


# The noise-schedule settings a pretrained model's scheduler gives, unless they are given
SCHEDULE_OF_THE_MODEL = {"ddpm_num_steps": "num_train_timesteps", "ddpm_beta_schedule": "beta_schedule",
                         "ddpm_beta_start": "beta_start", "ddpm_beta_end": "beta_end",
                         "prediction_type": "prediction_type", "rescale_betas_zero_snr": "rescale_betas_zero_snr"}


def adopt_pretrained(config: TrainConfig, explicit: set[str] | frozenset[str], resume_from: Path | None
                     ) -> tuple[TrainConfig, Any, dict[str, Any]]:
    """--pretrained_model_name_or_path: its UNet (weights on the CPU), its UNet config and, unless given, its noise
    schedule. Loaded here, before the data, so that a model that cannot be fine-tuned is said before any work. A
    run that goes on from a checkpoint takes those of its checkpoint: the model need not be there any more."""
    name = config.pretrained_model_name_or_path
    if config.model_preset or config.model_config_name_or_path:
        raise UsageError("--pretrained_model_name_or_path gives the UNet: leave out --model_preset and "
                         "--model_config_name_or_path")
    saved_unet = checkpoint.checkpoint_unet_config(resume_from) if resume_from is not None else None
    if saved_unet is not None:
        saved = checkpoint.saved_run_config(resume_from)
        return (config.replace(**{key: saved[key] for key in SCHEDULE_OF_THE_MODEL
                                  if key in saved and key not in explicit}), None, models.unet_settings(saved_unet))
    try:
        model = sampling.load_model(name, torch.device("cpu"), torch.float32)
    except UsageError as error:
        raise UsageError(f"--pretrained_model_name_or_path {error}") from None
    models.check_trainable(dict(model.unet.config), f"--pretrained_model_name_or_path {name}")
    schedule = model.scheduler_config
    given = {setting: schedule.get(key) for setting, key in SCHEDULE_OF_THE_MODEL.items()
             if setting not in explicit and schedule.get(key) is not None}
    for setting, key in SCHEDULE_OF_THE_MODEL.items():
        if setting in explicit and schedule.get(key) not in (None, getattr(config, setting)):
            logger.warning(f"--{setting} {getattr(config, setting)}: {name} was trained with {key} "
                           f"{schedule.get(key)}; the fine-tuning changes it")
    if given.get("ddpm_beta_schedule", config.ddpm_beta_schedule) not in BETA_SCHEDULES:
        raise UsageError(f"--pretrained_model_name_or_path {name}: its noise schedule's beta_schedule "
                         f"{given['ddpm_beta_schedule']} is not one uncond trains with; pass --ddpm_beta_schedule")
    config = config.replace(**given)
    check_zero_snr(config)
    ours = sampling.training_noise_scheduler(config.to_dict()).betas
    theirs = DDPMScheduler.from_config(schedule).betas
    chosen = explicit & {"ddpm_num_steps", "ddpm_beta_schedule", "ddpm_beta_start", "ddpm_beta_end",
                         "rescale_betas_zero_snr"}  # asked for
    if not chosen and (len(ours) != len(theirs) or not torch.allclose(ours, theirs)):
        betas = "trained_betas" if schedule.get("trained_betas") is not None else \
            f"beta_start {schedule.get('beta_start')}, beta_end {schedule.get('beta_end')}"
        raise UsageError(f"--pretrained_model_name_or_path {name}: its noise schedule's betas ({betas}) are not "
                         f"those uncond trains with for --ddpm_beta_schedule {config.ddpm_beta_schedule}; fine-tuning "
                         "on other betas would change what the model does: pass --ddpm_beta_schedule (and "
                         "--ddpm_beta_start, --ddpm_beta_end) to choose them anyway")
    size = model.unet.config.sample_size
    if "resolution" in explicit and size not in (config.resolution, [config.resolution] * 2):
        logger.warning(f"--resolution {config.resolution}: {name} was trained at {size} px; the fine-tuning "
                       "changes it")
    logger.info(f"starting from the weights of {model.description}")
    return config, model.unet, models.unet_settings(dict(model.unet.config))


def signal_left_at_the_end(config: TrainConfig, noise_scheduler: Any) -> str | None:
    """A short schedule (--ddpm_num_steps 20 with linear betas) keeps much of the image in its noisiest training
    input, while sampling starts from pure noise: the model never learns that first step."""
    signal = float(noise_scheduler.alphas_cumprod[-1]) ** 0.5  # the image's share at the last timestep
    if signal < 0.1:
        return None
    longer = "raise --ddpm_num_steps, or " * (config.ddpm_beta_schedule != "laplace")  # laplace's is fixed
    return (f"--ddpm_num_steps {config.ddpm_num_steps} with --ddpm_beta_schedule {config.ddpm_beta_schedule} keeps "
            f"{signal:.0%} of the image in the noisiest training input, but sampling starts from pure noise; "
            f"{longer}use --ddpm_beta_schedule squaredcos_cap_v2, which ends in noise")


SCHEDULES_WITHOUT_WARMUP = ("constant", "piecewise_constant")  # diffusers' get_scheduler gives them none
SCHEDULES_OVER_THE_RUN = ("linear", "cosine", "cosine_with_restarts", "polynomial")  # shaped by the run's length
SCHEDULE_OPTIONS = {"lr_step_rules": "piecewise_constant", "lr_num_cycles": "cosine_with_restarts",
                    "lr_power": "polynomial"}


def ignored_settings(config: TrainConfig, explicit: set[str] | frozenset[str]) -> list[str]:
    """Flags given that this run has no use for, as the seed script ignored them, but said."""
    warnings = []
    hub_flags = [name for name in ("hub_token", "hub_model_id", "hub_private_repo") if getattr(config, name)]
    if hub_flags and not config.push_to_hub:  # --push_to_hub forgotten, most likely
        warnings.append(f"{', '.join('--' + name for name in hub_flags)}: used only to upload the model, and "
                        "--push_to_hub is not given: nothing will be uploaded")
    ema_flags = [name for name in ("ema_max_decay", "ema_inv_gamma", "ema_power", "ema_update_every")
                 if given_otherwise(config, explicit, name)]
    if ema_flags and not config.use_ema:
        warnings.append(f"{', '.join('--' + name for name in ema_flags)}: ignored without --use_ema (no EMA of the "
                        "weights is kept)")
    if config.ddpm_beta_schedule in ("squaredcos_cap_v2", "laplace"):  # their betas come from a formula of their own
        betas = [name for name in ("ddpm_beta_start", "ddpm_beta_end") if given_otherwise(config, explicit, name)]
        if betas:
            warnings.append(f"{', '.join('--' + name for name in betas)}: ignored by --ddpm_beta_schedule "
                            f"{config.ddpm_beta_schedule}")
    if given_otherwise(config, explicit, "lr_warmup_steps") and config.lr_warmup_steps \
            and config.lr_scheduler in SCHEDULES_WITHOUT_WARMUP:
        warnings.append(f"--lr_warmup_steps {config.lr_warmup_steps} is ignored: --lr_scheduler {config.lr_scheduler} "
                        "has no warmup" + " (constant_with_warmup has)" * (config.lr_scheduler == "constant"))
    warnings += [f"--{name} is ignored: it applies to --lr_scheduler {schedule}, not {config.lr_scheduler}"
                 for name, schedule in SCHEDULE_OPTIONS.items()
                 if name != "lr_step_rules" and given_otherwise(config, explicit, name)
                 and config.lr_scheduler != schedule]
    return warnings


def seed_schedule_difference(config: TrainConfig, processes: int) -> str | None:
    """What a seed-script user reproducing a run would otherwise not know: uncond's warmup and schedule count
    optimizer steps. train_unconditional.py's counted micro-batches (its warmup steps times the accumulation, its
    length the loader's batches over the whole dataset) and stepped once per optimizer step on each of the
    `processes` (accelerate's prepared scheduler)."""
    accumulation, differences = config.gradient_accumulation_steps, []
    warmup_factor = accumulation / processes
    if config.lr_warmup_steps and config.lr_scheduler not in SCHEDULES_WITHOUT_WARMUP and warmup_factor != 1:
        differences.append(f"its warmup lasted {warmup_factor:g} times as many steps")
    if accumulation > 1 and config.lr_scheduler in SCHEDULES_OVER_THE_RUN:
        differences.append(f"its schedule was 1/{accumulation} of its way through at the run's end")
    if not differences:
        return None
    launch = f"{counted(processes, 'process')}, " * (processes > 1)
    return (f"{launch}--gradient_accumulation_steps {accumulation}: --lr_warmup_steps and the {config.lr_scheduler} "
            f"learning-rate schedule count optimizer steps; train_unconditional.py counted micro-batches, so "
            + " and ".join(differences))


def given_otherwise(config: TrainConfig, explicit: set[str] | frozenset[str], name: str) -> bool:
    """A setting given a value other than its default: a config file that lists every setting (a run's
    training_config.json passed back) does not give them all."""
    return name in explicit and getattr(config, name) != SETTINGS[name].default


def refuse_resume_past_end(plan: Plan, last_step: int) -> None:
    """A checkpoint beyond the run's last step leaves nothing to train (it trained -13 epochs, and exported the
    checkpoint's weights as if trained to its end): --max_train_steps counts the whole run, not what is added."""
    if plan.resume_step is not None and plan.resume_step > last_step:
        flag = "--max_train_steps" if plan.config.max_train_steps else "--num_epochs"
        raise UsageError(f"{plan.resume_from.name} is at step {plan.resume_step}, past this run's last step "
                         f"{last_step}: nothing to train ({flag} counts the whole run, the checkpoint's steps "
                         f"included); raise {flag}")


def refuse_mismatched_resume(path: Path, config: TrainConfig, unet_config: dict[str, Any]) -> None:
    differences = checkpoint.resume_differences(path, config, unet_config)
    if differences:
        # A named checkpoint is left by dropping the flag, and --output_dir's own (which a run without the flag
        # goes on from) by starting afresh.
        afresh = " and pass --overwrite_output_dir" * bool(checkpoint.complete_checkpoints(Path(config.output_dir)))
        fresh = (f"leave --resume_from_checkpoint out{afresh} to start a new run" if config.names_a_checkpoint()
                 else "--overwrite_output_dir to start afresh")
        raise UsageError(f"cannot resume from {path}: it was trained with other settings "
                         f"({'; '.join(differences)}); use the same ones, or {fresh}")
    other_data = checkpoint.data_differences(path, config)
    if other_data and not config.resume_from_checkpoint:  # found in --output_dir, not asked for
        raise UsageError(f"{path.parent} holds a run on other images ({'; '.join(other_data)}); pass "
                         "--resume_from_checkpoint latest to go on training it on these, --overwrite_output_dir to "
                         "start afresh, or choose another --output_dir")


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_tracker(name: str) -> None:
    package = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
               "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
               "trackio": "trackio"}.get(name)
    if package and not module_available(package):
        raise UsageError(f"--logger {name} needs the {package} package (pip install {package}), "
                         "or choose --logger tensorboard")


UNSUPPORTED_LAUNCHES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}
FSDP_CONFIG = accelerate_configs.config_path("fsdp")  # the installed file: its path works from any folder


def fsdp_launch() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it says so in the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_launch(config: TrainConfig) -> None:
    """Refuse, before any work, the launches uncond cannot train under: DeepSpeed (its checkpoints load by
    unpickling, and it owns the optimizer step, clipping and precision), FSDP1, sharded FSDP checkpoints
    (torch.distributed.checkpoint reads its .metadata with pickle.load), and settings FSDP2 does not take."""
    for variable, name in UNSUPPORTED_LAUNCHES.items():
        if os.environ.get(variable, "false").lower() == "true":
            raise UsageError(f"this launch asks for {name}, which uncond does not support: launch data-parallel "
                             f"(--multi_gpu) or sharded with FSDP2 (--config_file {FSDP_CONFIG})")
    if fsdp_launch():
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UsageError(f"this launch asks for FSDP version {version}; uncond shards with FSDP2: set "
                             f"fsdp_version: 2 in the accelerate config (see {FSDP_CONFIG})")
        state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT")  # accelerate's FSDP2 default
        if state_dict_type != "FULL_STATE_DICT":
            raise UsageError(f"fsdp_state_dict_type {state_dict_type}: its checkpoints keep their index as a pickle, "
                             "which uncond does not load; set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate "
                             f"config (see {FSDP_CONFIG})")
        for flag in ("compile", "channels_last"):  # FSDP2 takes neither CUDA graphs nor non-contiguous weights
            if getattr(config, flag):
                raise UsageError(f"--{flag} does not work with FSDP; drop it, or launch data-parallel (--multi_gpu)")


def warn_one_cpu_process() -> None:
    """`accelerate launch [--cpu] --num_processes 2` on a machine without GPUs starts one process (accelerate 1.15
    starts several CPU processes only with --multi_gpu, or through MPI): where a typed launch asked for several and
    got one, say so and how to get them."""
    typed = environment.typed_launch()
    if environment.launched_processes() > 1 or not typed or typed[:2] != ("accelerate", "launch"):
        return
    from accelerate.commands.launch import launch_command_parser

    asked = launch_command_parser().parse_args([*typed[2:], "uncond"])
    if (asked.num_processes or 1) > 1 and not asked.mpirun_hostfile:
        count = asked.num_processes
        logger.warning(f"accelerate launch {'--cpu ' * asked.cpu}--num_processes {count} started one process "
                       "(without GPUs, accelerate starts several only with --multi_gpu, or through MPI): for "
                       f"{count} CPU processes, launch with --multi_gpu --num_processes {count} and "
                       f"CUDA_VISIBLE_DEVICES='', or torchrun --nproc_per_node {count}")


def warn_slurm_tasks_without_launcher() -> None:
    """`srun -n 2 uncond train ...` starts two runs of one process each, not one run of two (the second then
    finds the output folder in use): say how to start one run of several."""
    tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if tasks > 1 and environment.launched_processes() == 1 and "SLURM_PROCID" in os.environ:
        logger.warning(f"SLURM started {tasks} tasks, each a run of one process: for one run of several processes, "
                       "start one launcher per machine (srun --ntasks-per-node 1 accelerate launch ... or torchrun), "
                       "or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for each task")


def check_fsdp_units(unet_config: dict[str, Any]) -> None:
    """The classes an FSDP config names as units must be in the UNet: accelerate stops with a traceback at
    `prepare`, after the data is decoded, when one is not (a UNet with add_attention false has no Attention)."""
    if not fsdp_launch() or os.environ.get("FSDP_AUTO_WRAP_POLICY") != "TRANSFORMER_BASED_WRAP":
        return
    named = [name.strip() for name in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip()]
    unet = models.weightless_unet(models.with_channels(unet_config, 3))
    missing = sorted(set(named) - {type(module).__name__ for module in unet.modules()})
    if missing:
        raise UsageError(f"fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which this UNet does not "
                         "have; name only classes it has, such as ResnetBlock2D, in the accelerate config")


# torch 2.13's inductor C++ code (2.14's assumed alike) computes the UNet's gradients wrongly, while its forward
# pass is right: in fp32 the median parameter's gradient is as far from eager float64's as it is long, against
# eager fp32's 3e-6 (benchmarks/compile_parity.py, docs/benchmarks.md), and under bf16 autocast they are NaN.
# Each block compiled alone is right; the whole UNet is not. uncond's code is not involved: a bare UNet does it.
CPU_COMPILER_MISCOMPUTES_GRADIENTS = is_torch_version("<", "2.15")


def check_compile(config: TrainConfig, device_type: str) -> None:
    """--compile refused where it trains wrongly: on `device_type` "cpu", with CPU_COMPILER_MISCOMPUTES_GRADIENTS."""
    if config.compile and device_type == "cpu" and CPU_COMPILER_MISCOMPUTES_GRADIENTS:
        raise UsageError(f"--compile on a CPU: torch {torch.__version__}'s compiler computes this UNet's gradients "
                         "wrongly there (benchmarks/compile_parity.py); drop --compile, which gains little on a CPU")


def check_cuda_graphs(config: TrainConfig, device_type: str, processes: int) -> None:
    """--cuda_graphs refused where step_graph.py cannot record the step, or where what it records would be wrong."""
    if not config.cuda_graphs:
        return
    conflicts = [
        (device_type != "cuda", f"needs a CUDA GPU (this run trains on {device_type}); drop it"),
        (processes > 1 or fsdp_launch(), "records one process's step (DDP and FSDP communicate inside it); drop it, "
                                         "or launch one process"),
        (config.compile, "and --compile both record CUDA graphs; drop one of them"),
        (config.gradient_accumulation_steps > 1, "records steps of one micro-batch; drop it or "
                                                 "--gradient_accumulation_steps"),
        (config.gradient_checkpointing, "cannot record --gradient_checkpointing's recomputation (it reads the random "
                                        "state); drop one of them"),
        (config.mixed_precision == "fp16", "cannot record fp16's loss scaling (its state lives on the host); use "
                                           "--mixed_precision bf16"),
        # Unchecked rather than known broken: no GPU run has recorded xformers' kernels, and PyTorch's own
        # attention (the default) runs the same fused kernels.
        (config.enable_xformers_memory_efficient_attention, "is not checked with xformers attention; drop "
                                                             "--enable_xformers_memory_efficient_attention (PyTorch's "
                                                             "attention is as fast)"),
    ]
    for conflict, why in conflicts:
        if conflict:
            raise UsageError(f"--cuda_graphs {why}")


def check_processes(plan: Plan, accelerator: Accelerator) -> None:
    """The checks that need the launched processes (made before any data is read): FSDP given where it
    was asked for, a checkpoint resumed by the kind of run that wrote it, and --compile and --cuda_graphs where
    they train."""
    check_compile(plan.config, accelerator.device.type)
    check_cuda_graphs(plan.config, accelerator.device.type, accelerator.num_processes)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if fsdp_launch() and accelerator.num_processes > 1 and not sharded:
        raise UsageError(f"this launch asks for FSDP, but accelerate runs {accelerator.device.type} processes "
                         "data-parallel (it shards on GPUs only); launch with --multi_gpu instead")
    check_same_settings(plan, accelerator)
    written_sharded = plan.resume_from is not None and checkpoint.written_by_fsdp(plan.resume_from)
    if plan.resume_from is not None and written_sharded != sharded:
        kind = "an FSDP run" if written_sharded else "a data-parallel or one-process run"
        raise UsageError(f"{plan.resume_from} was written by {kind}, whose optimizer state is laid out "
                         "differently; resume it with the same kind of launch (any process count)")


# Settings each machine may have its own of: where its copies of the data (the image counts are compared once
# read), its cache and the Inception weights lie, how many threads decode, and the token, never compared (it
# would be printed).
PER_MACHINE_SETTINGS = {"local_rank", "cache_dir", "train_data_dir", "dataset_name", "inception_weights",
                        "dataloader_num_workers", "hub_token"}
PATH_SETTINGS = ("output_dir", "model_config_name_or_path", "pretrained_model_name_or_path",
                 "resume_from_checkpoint")  # compared where they lead
RESUMED_STEP = "the step resumed from"


def check_same_settings(plan: Plan, accelerator: Accelerator) -> None:
    """Each machine is started with a command of its own. Where their settings differ, the run crashes where
    they first matter (a collective mismatch when one machine stops at another step) or trains a model that no
    machine's settings describe; so do checkpoints of different steps on machines that do not share a folder."""
    if accelerator.num_processes == 1:
        return
    mine = {key: value for key, value in plan.config.to_dict().items() if key not in PER_MACHINE_SETTINGS}
    for key in PATH_SETTINGS:  # `run` on one machine, /jobs/run on the other: the same folder where both are
        if mine[key] and (key == "output_dir" or Path(mine[key]).expanduser().exists()):
            mine[key] = str(Path(mine[key]).expanduser().resolve())
    mine[RESUMED_STEP] = plan.resume_step
    everyone = gather_object([mine])
    differing = [key for key in mine if any(other.get(key) != mine[key] for other in everyone)]
    if differing:
        said = "; ".join(f"{key if key == RESUMED_STEP else '--' + key} "
                         f"{', '.join(str(other.get(key)) for other in everyone)}" for key in differing)
        raise UsageError(f"the processes were started with different settings ({said}, by process): give every "
                         "machine the same command, its rank aside")


@dataclass(frozen=True)
class Position:
    """Where a checkpoint left its run, in this run's terms."""
    step: int
    epoch: int
    images_seen: int
    epoch_offset: int  # see Run.epoch_offset
    note: str = ""  # said in the log when the checkpoint was written with another global batch
    # The running means of the steps since the last log line, so that the resumed run logs what the
    # uninterrupted one would have (None for checkpoints without them)
    log_window: dict[str, Any] | None = None
    preview_owed: int | None = None  # see Run.preview_owed
    evaluation_owed: int | None = None  # see Run.evaluation_owed


def position_after(step: int, state: dict[str, Any], steps_per_epoch: int, global_batch_size: int,
                   num_processes: int, images: tuple[int | None, str | None] = (None, None)) -> Position:
    """The place in the run and in the data order to go on from after the checkpoint of `step` (whose
    training state is `state`). With another process count or batch size, the epoch goes on after the
    images it had already seen (the rest of that epoch's order then differs from an uninterrupted run's).
    With another number of images (`images`: their number and CachedBatches.images_key; files added to the
    folder or removed), the checkpoint's place in its epoch means nothing: the run goes on at the start of the
    next. Other files as many as before (replaced, or only copied anew: the key hashes modification times) go on
    in the epoch's order, and are said."""
    epoch = state.get("epoch", step // steps_per_epoch)
    steps_into_epoch = step - state.get("epoch_start_step", epoch * steps_per_epoch)
    saved_count, saved_key = state.get("num_images"), state.get("images_key")
    count, key = images
    saved_processes = state.get("num_processes", num_processes)
    saved_batch = state.get("global_batch_size", global_batch_size // num_processes
                            * saved_processes)  # older checkpoints: the same batch per device
    note = ""
    if None not in (saved_count, count) and saved_count != count:
        epoch, steps_into_epoch = epoch + (steps_into_epoch > 0), 0
        note = (f"the data changed since checkpoint-{step} ({saved_count} images then, {count} now): going on from "
                f"the start of epoch {epoch}, in the new images' order")
    elif saved_batch != global_batch_size or saved_processes != num_processes:
        images_into_epoch = steps_into_epoch * saved_batch
        steps_into_epoch = min(images_into_epoch // global_batch_size, steps_per_epoch)
        # Steps cover the start of the epoch's order whatever the batch: whole steps of the new batch reach
        # back to the last step boundary before the images seen, which are seen again.
        again = images_into_epoch - steps_into_epoch * global_batch_size if steps_into_epoch < steps_per_epoch else 0
        note = (f"checkpoint-{step} was written by {counted(saved_processes, 'process')} with a global batch of "
                f"{saved_batch}; going on with {counted(num_processes, 'process')} and a global batch of "
                f"{global_batch_size} after the {images_into_epoch} images already seen in epoch {epoch}"
                + (f" (in whole steps of {global_batch_size}: the last {counted(again, 'image')} of those are "
                   "trained on again)" if again > 0 else ""))
    if saved_count == count and None not in (saved_key, key) and saved_key != key:
        note = "; ".join(filter(None, [note, f"the image files changed since checkpoint-{step}, as many as then "
                                             "(replaced, or copied anew): going on in the epoch's order"]))
    return Position(step=step, epoch=epoch, images_seen=state.get("images_seen", step * global_batch_size),
                    epoch_offset=step - steps_into_epoch - epoch * steps_per_epoch, note=note,
                    log_window=state.get("log_window"), preview_owed=state.get("preview_owed"),
                    evaluation_owed=state.get("evaluation_owed"))


def run_length(plan: Plan, steps_per_epoch: int, global_batch_size: int, num_processes: int,
               images: tuple[int | None, str | None] = (None, None)) -> tuple[Position | None, int]:
    """Where a resumed run goes on from (None for a new run), and its last step: --max_train_steps, or the end of
    --num_epochs counted over the whole run (the epochs before a resume with another global batch had another
    length). A run resumed past that end is refused."""
    position = None if plan.resume_from is None else position_after(
        plan.resume_step, plan.resume_state, steps_per_epoch, global_batch_size, num_processes, images)
    epoch_offset = position.epoch_offset if position else 0
    max_train_steps = plan.config.max_train_steps or epoch_offset + plan.config.num_epochs * steps_per_epoch
    refuse_resume_past_end(plan, max_train_steps)
    return position, max_train_steps


# A checkpoint's bytes per UNet parameter: fp32 weights (unet/) and AdamW's two moments (optimizer.bin); an EMA
# adds 4 (unet_ema/). Measured: 11 MB for the tiny preset's 0.69M parameters with an EMA.
CHECKPOINT_BYTES_PER_PARAMETER = 12


def checkpoints_beyond_disk(config: TrainConfig, parameters: int, first_step: int, last_step: int) -> str | None:
    """The warning for checkpoints that will not fit on the output folder's disk: without --checkpoints_total_limit
    every one is kept (the seed's 64 px model over 39,000 steps: 78 of 1.7 GiB), and the run would meet a full
    disk days in."""
    written = last_step // config.checkpointing_steps - first_step // config.checkpointing_steps
    limit, every = config.checkpoints_total_limit, config.keep_checkpoints_every
    milestones = last_step // every - first_step // every if every else 0
    # A new checkpoint is written before the oldest goes: one more than the limit at once, and the milestones.
    kept = written if limit is None else min(written, limit + 1 + milestones)
    each = parameters * (CHECKPOINT_BYTES_PER_PARAMETER + 4 * config.use_ema)
    folder = nearest_existing(Path(config.output_dir).resolve())
    free = shutil.disk_usage(folder).free
    if kept * each <= free:
        return None
    instead = ("pass --checkpoints_total_limit N to keep only the newest N, " if limit is None
               else "lower --checkpoints_total_limit, " if limit > 1 else "")
    instead += "raise --keep_checkpoints_every, " if milestones else ""
    return (f"--checkpointing_steps {config.checkpointing_steps}: the run writes {counted(written, 'checkpoint')} of "
            f"about {size_text(each)}, {size_text(kept * each)} on the disk at once, more than the {size_text(free)} "
            f"free on the disk of {folder}; {instead}raise --checkpointing_steps, or free some space")


def dry_run(plan: Plan) -> None:
    """--dry_run: what would be trained on what, without decoding images or building weights. Under a launcher,
    said once, for its number of processes (from the environment torchrun sets: no process group is started)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    config = plan.config
    processes = environment.launched_processes()
    source = None if config.streaming else sources.open_source(config)
    outlook = data.cache_outlook(source, config) if source else None  # the images the run will train on
    images = outlook.images if outlook else None
    all_gray = outlook.all_gray if outlook else None
    channel_options = [plan.channels_from_model_config] if plan.channels_from_model_config else (
        [int(config.num_channels)] if config.num_channels != "auto" else
        [1, 3] if all_gray is None else [1 if all_gray else 3])
    sizes = ", ".join(f"{models.count_parameters(models.with_channels(plan.unet_config, c)):,} parameters with "
                      f"{counted(c, 'channel')}" for c in channel_options)
    batches = (data.Order(images, config.train_batch_size, 0, processes).batches_per_epoch
               if source else config.max_train_steps * config.gradient_accumulation_steps)  # a stream: one epoch
    steps_per_epoch = epoch_steps(config, batches)
    _, total_steps = run_length(plan, steps_per_epoch, global_batch(config, processes), processes, (images, None))
    print(json.dumps(config.to_record(), indent=2))  # stdout holds the settings alone: `--dry_run > settings.json`
    logger.info(f"dataset: {source.description}{data.passed_over(source)}" if source
                else f"dataset: {config.dataset_name}, streamed")
    if outlook is not None:
        logger.info(outlook.line)
        if outlook.warning:
            logger.warning(outlook.warning)
    logger.info(f"model: UNet2DModel, {models.describe_unet(plan.unet_config)}; {sizes}")
    logger.info(f"schedule: {batch_description(config, processes)}; {counted(steps_per_epoch, 'optimizer step')} "
                f"per epoch; {counted(total_steps, 'step')} in all")
    parameters = max(models.count_parameters(models.with_channels(plan.unet_config, c)) for c in channel_options)
    if warning := checkpoints_beyond_disk(config, parameters, plan.resume_step or 0, total_steps):
        logger.warning(warning)
    if warning := warmup_outlasts_run(config, total_steps):
        logger.warning(warning)
    resume_step = plan.resume_step or 0
    at_the_end = plan.resume_from is not None and resume_step == total_steps
    # (an export damaged since, which the run makes again, is not complete: trial 65 F6)
    exported = at_the_end and checkpoint.run_complete(Path(config.output_dir), resume_step, total_steps)
    if plan.resume_message and not exported:  # a complete run's line says only that, as the run's does
        logger.info(plan.resume_message)
    if at_the_end:
        logger.info(f"the run in {config.output_dir} is complete at step {resume_step}: nothing would be trained; "
                    "raise --max_train_steps or --num_epochs to train it further" if exported else
                    f"the run would end at once at step {resume_step}, exporting {plan.resume_from.name}")
    for note in plan.resume_notes if resume_step < total_steps else []:  # said of a run going on
        logger.warning(note)
    if plan.resume_from is not None and resume_step < total_steps and \
            (note := schedule_change(config, plan.resume_from, plan.resume_state, resume_step, total_steps)):
        logger.info(note)


def schedule_change(config: TrainConfig, path: Path, state: dict[str, Any], step: int, total_steps: int) -> str | None:
    """--dry_run's word for what a run resumed from checkpoint `path` says (parts.resume): a schedule over another
    length, or another schedule, gives another learning rate from `step` on."""
    saved, saved_total = checkpoint.saved_run_config(path), state.get("max_train_steps")
    if not saved_total or "lr_scheduler" not in saved:  # older checkpoints do not record their length
        return None
    saved_factor = schedule_factor(saved, saved_total, step)
    factor = schedule_factor(config.to_dict(), total_steps, step)
    if math.isclose(factor, saved_factor, rel_tol=1e-3, abs_tol=1e-6):
        return None
    return schedule_change_note(config, saved["lr_scheduler"], path.name, total_steps, step,
                                config.learning_rate * factor, saved["learning_rate"] * saved_factor)


def learning_rate_schedule(optimizer: torch.optim.Optimizer, settings: dict[str, Any], length: int) -> Any:
    """diffusers' schedule (a LambdaLR) that a run's settings give over `length` steps: TrainConfig.to_dict()'s, or
    a checkpoint's training_config.json (older ones lack the later options: their defaults)."""
    return get_scheduler(settings["lr_scheduler"], optimizer=optimizer, num_warmup_steps=settings["lr_warmup_steps"],
                         num_training_steps=length, step_rules=settings.get("lr_step_rules"),
                         num_cycles=settings.get("lr_num_cycles", 1), power=settings.get("lr_power", 1.0))


def schedule_factor(settings: dict[str, Any], length: int, step: int) -> float:
    """The learning rate's multiplier at `step` of the schedule that `settings` (a run's) give over `length` steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return learning_rate_schedule(optimizer, settings, length).lr_lambdas[0](step)


def schedule_change_note(config: TrainConfig, saved_scheduler: str | None, checkpoint_name: str, total_steps: int,
                         step: int, rate: float, saved_rate: float) -> str:
    """What a resume changes in the learning rate where its schedule's multiplier differs from the checkpoint's run:
    the schedule stretched over another length (an extended cosine goes back up), or another schedule."""
    if saved_scheduler not in (None, config.lr_scheduler):
        what = f"--lr_scheduler {config.lr_scheduler}, where {checkpoint_name}'s run had {saved_scheduler}"
    else:
        what = f"--lr_scheduler {config.lr_scheduler} now spans the run's {total_steps} steps"
    return f"{what}: the learning rate at step {step} is {rate:.2e}, where {checkpoint_name}'s run had {saved_rate:.2e}"


def global_batch(config: TrainConfig, processes: int) -> int:
    """The images an optimizer step trains on: a batch per process and accumulation step (an epoch's last step
    may have fewer)."""
    return config.train_batch_size * processes * config.gradient_accumulation_steps


def epoch_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """The optimizer steps of an epoch of `batches_per_epoch` batches per process: its end ends a step (the last
    may accumulate fewer batches, as in the seed script)."""
    return math.ceil(batches_per_epoch / config.gradient_accumulation_steps)


def batch_description(config: TrainConfig, processes: int) -> str:
    """The global batch and what makes it, as the run's log and --dry_run say it."""
    return (f"batch {config.train_batch_size} per device x {counted(processes, 'process')} x "
            f"{config.gradient_accumulation_steps} accumulation = {global_batch(config, processes)}")


def warmup_outlasts_run(config: TrainConfig, total_steps: int) -> str | None:
    """The seed's 500 warmup steps in a shorter run keep the learning rate below --learning_rate throughout."""
    if config.lr_scheduler in SCHEDULES_WITHOUT_WARMUP or config.lr_warmup_steps <= total_steps:
        return None
    return (f"--lr_warmup_steps {config.lr_warmup_steps} is longer than the run's "
            f"{counted(total_steps, 'optimizer step')}: "
            f"the learning rate never reaches --learning_rate {config.learning_rate:g}; lower --lr_warmup_steps")
