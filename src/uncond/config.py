"""Every setting, defined once: its default, its meaning, and the checks that need no data.

`TrainConfig` holds `uncond train`'s settings. Its flags keep the names, meanings and defaults of
diffusers' `train_unconditional.py`, so its command lines run unchanged. Settings come in layers,
later ones winning:

    defaults  <  the demo (`uncond train` with no arguments, or --demo)  <  --config FILE  <  flags

`SampleConfig`, `EvaluateConfig`, `ExportConfig` and `CacheConfig` hold those of `uncond sample`, `evaluate`,
`export` and `cache`.

Only the standard library is imported here (PyYAML lazily, for YAML config files).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence


# A log record's extra= for a line each machine's first process says (cli.setup_logging): where every machine must
# act on it, as on the command that resumes a stopped run
EVERY_MACHINE = {"every_machine": True}


class UsageError(Exception):
    """Bad input. The message is one line that says what is wrong and what to do instead."""


class FolderInUse(UsageError):
    """The output folder is another run's: nothing is wrong with the command, which can be tried again later. Its
    exit status is sysexits' EX_TEMPFAIL, so that a job script tells "retry later" from bad input (2)."""
    exit_status = 75


class ProcessInUse(UsageError):
    """Another run holds this process (one in another thread of a sweep or a notebook): the command can be tried
    again once it ends, so its exit status is EX_TEMPFAIL, as FolderInUse's."""
    exit_status = 75


class RunFailed(Exception):
    """A run that had to stop (diverged, disk full). The message is one line saying what happened and
    what is safe on disk."""

    said = False  # True where it was said already, by every process (cli.another_process_lost_said)


class RunStopped(BaseException):
    """A command stopped by a signal: a run with its checkpoint saved and the way to resume said (`said`), or any
    command stopped by SIGTERM where it was (cli.sigterm_stops). The command exits with the shell's
    status for that signal (128 + its number), so `uncond train ... && next` goes no further and a scheduler that
    restarts failed jobs restarts a preempted one.
    A BaseException, as KeyboardInterrupt is: raised wherever the signal lands, it must not be taken for that
    code's own failure by an `except Exception` (diffusers' lazy imports wrapped it in a RuntimeError; loading a
    checkpoint called it damaged; the header probe of the images before a run took the file for unreadable and
    went on)."""

    def __init__(self, signal_number: int, said: bool = True, agreed: bool = False):
        super().__init__(signal_number)
        self.signal_number = signal_number
        self.said = said
        # a run's stop that every process of a launch agreed on (stopping.StopAgreement): the others leave the
        # status to the main one. Any other stop is each process's own, and its status tells the launcher.
        self.agreed = agreed

    def __reduce__(self) -> tuple[Any, ...]:  # as it was, when sent to the other processes (parts)
        return type(self), (self.signal_number, self.said, self.agreed)


def size_text(size: int) -> str:
    """Bytes in the unit people read them in: 1.2 GiB, 35.0 MiB, 512 KiB, 300 bytes."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:,.1f} MiB"
    return f"{round(size / 2**10)} KiB" if size >= 2**10 else f"{size} bytes"


def counted(count: int, noun: str) -> str:
    """"1 epoch", "3 epochs", "2 processes", "4 entries": a number with its noun agreeing."""
    if count == 1:
        return f"{count} {noun}"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return f"{count} {noun[:-1]}ies"
    return f"{count} {noun}{'es' if noun.endswith('s') else 's'}"


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line, for a UsageError that gives the reason."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_utf8_path(name: str, path: str | os.PathLike) -> None:
    """Refuse a path whose bytes are no UTF-8 (a name from an old archive, in Latin-1): safetensors reads and writes
    only UTF-8 paths, so a run trained into such a folder wrote its weights and could not read them back to resume,
    nor could sample or export them (trial 64 F2). `name`: the flag or argument, as the error shows it."""
    try:
        os.path.abspath(os.path.expanduser(path)).encode()
    except UnicodeEncodeError:
        shown = repr(os.fsencode(path))[2:-1]  # its bytes: cafe\xe9
        raise UsageError(f"{name} {shown}".strip() + ": its path is not UTF-8 (a name from an old archive?), which "
                         "safetensors cannot read model weights from; rename it (convmv renames such names)") from None


def setting(default: Any, help: str, *, group: str, choices: tuple[str, ...] | None = None, seed: bool = False,
            positional: bool = False):
    """A config field: `seed=True` marks the flags that train_unconditional.py has, with the same default.
    `default=REQUIRED` makes it a required argument, positional (`positional=True`) or a flag."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "seed": seed,
                                            "positional": positional})


REQUIRED = dataclasses.MISSING


def inception_weights_setting(group: str):
    """--inception_weights, for `uncond train` and `uncond evaluate` alike."""
    return setting(None, "the FID InceptionV3 weights file (pt_inception-2015-12-05-6726825d.pth); default: found "
                   "in torch's hub cache, where pytorch-fid, torch-fidelity and torchmetrics keep it", group=group)


LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOGGERS = ("tensorboard", "wandb", "comet_ml", "mlflow", "aim", "clearml", "dvclive", "swanlab", "trackio", "all",
           "none")
CHANNEL_CHOICES = ("auto", "1", "3")
# The names of sampling.SAMPLERS (a test keeps the two equal); listed here so --help shows them without
# importing diffusers.
SAMPLER_NAMES = ("ddpm", "ddim", "pndm", "dpmsolver++", "dpmsolver++3", "sde-dpmsolver++", "dpmsolver-singlestep",
                 "unipc", "deis", "euler", "euler-ancestral", "heun", "kdpm2", "kdpm2-ancestral", "lms")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class TrainConfig:
    # ---- data
    dataset_name: str | None = setting(
        None, "a Hub dataset name, a dataset saved with save_to_disk, a local folder `datasets` understands, "
        "or builtin:mnist", group="data", seed=True)
    dataset_config_name: str | None = setting(None, "the dataset's config, if it has several", group="data", seed=True)
    train_data_dir: str | None = setting(
        None, "a plain folder of images (nested folders allowed); ignored when --dataset_name is given",
        group="data", seed=True)
    image_column: str | None = setting(None, "the dataset column holding the images (found automatically)",
                                       group="data")
    cache_dir: str | None = setting(None, "where downloaded datasets and models are stored, and the decoded images "
                                    "(in its uncond/ folder; default ~/.cache/uncond)", group="data", seed=True)
    resolution: int = setting(64, "training resolution in pixels: images are resized (shorter side) and cropped "
                              "to it; with --model_preset, the preset's resolution", group="data", seed=True)
    center_crop: bool = setting(False, "crop the centre of each image instead of a random crop", group="data",
                                seed=True)
    random_flip: bool = setting(False, "flip images horizontally at random", group="data", seed=True)
    num_channels: str = setting("auto", "image channels of the model: 1, 3, or auto (1 when every image is "
                                "grayscale, else 3)", group="data", choices=CHANNEL_CHOICES)
    preserve_input_precision: bool = setting(False, "keep 16-bit images at 16 bits instead of converting to 8",
                                             group="data", seed=True)
    dataloader_num_workers: int = setting(0, "worker threads that decode images (0: one per CPU core, up to 8)",
                                          group="data", seed=True)
    streaming: bool = setting(False, "read --dataset_name as a stream (Hub, or local Parquet/WebDataset shards), "
                              "decoding on the fly, without a full local copy; needs --max_train_steps", group="data")

    # ---- model
    model_config_name_or_path: str | None = setting(
        None, "a UNet2DModel config: Hub id, local folder, pipeline folder or config.json (weights are not loaded)",
        group="model", seed=True)
    model_preset: str | None = setting(None, "a named UNet size; `uncond presets` lists them (default: seed, "
                                                "train_unconditional.py's network, unless a model config is given)",
                                          group="model")
    pretrained_model_name_or_path: str | None = setting(
        None, "start from this model's weights, to fine-tune it on your images: a pipeline folder, a Hub id "
        "(google/ddpm-cifar10-32) or a checkpoint-N; its UNet, resolution and noise schedule are kept unless given",
        group="model")
    enable_xformers_memory_efficient_attention: bool = setting(False, "use xformers attention (needs xformers)",
                                                               group="model", seed=True)

    # ---- diffusion
    prediction_type: str = setting("epsilon", "what the network predicts", group="diffusion",
                                   choices=PREDICTION_TYPES, seed=True)
    ddpm_num_steps: int = setting(1000, "diffusion timesteps in training", group="diffusion", seed=True)
    ddpm_beta_schedule: str = setting("linear", "noise schedule", group="diffusion", choices=BETA_SCHEDULES, seed=True)
    ddpm_beta_start: float = setting(0.0001, "the first beta of the linear, scaled_linear and sigmoid schedules "
                                     "(Stable Diffusion's scaled_linear: 0.00085)", group="diffusion")
    ddpm_beta_end: float = setting(0.02, "their last beta (Stable Diffusion's: 0.012)", group="diffusion")
    rescale_betas_zero_snr: bool = setting(
        False, "rescale the betas to zero terminal SNR, so that the noisiest training input is pure noise, as "
        "sampling starts from (Lin et al. 2024; fuller darks and lights); needs --prediction_type v_prediction "
        "(or sample)",
        group="diffusion")
    snr_gamma: float | None = setting(None, "min-SNR loss weighting with this gamma (5.0 is usual; Hang et al. 2023)",
                                      group="diffusion")
    noise_offset: float | None = setting(None, "add this much per-channel offset noise (0.05-0.1 helps very dark or "
                                         "bright images)", group="diffusion")

    # ---- optimisation
    train_batch_size: int = setting(16, "images per device per micro-batch", group="training", seed=True)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", group="training", seed=True)
    num_epochs: int = setting(100, "passes over the dataset", group="training", seed=True)
    max_train_steps: int | None = setting(None, "optimizer steps to train for; overrides --num_epochs",
                                          group="training")
    learning_rate: float = setting(1e-4, "peak learning rate", group="training", seed=True)
    lr_scheduler: str = setting("cosine", "learning-rate schedule", group="training", choices=LR_SCHEDULERS,
                                seed=True)
    lr_warmup_steps: int = setting(500, "optimizer steps of linear warmup", group="training", seed=True)
    lr_step_rules: str | None = setting(None, "for --lr_scheduler piecewise_constant: multipliers of the learning "
                                        "rate and the optimizer step each lasts until, then the last multiplier, "
                                        "as diffusers reads them: 1:1000,0.1:2000,0.01", group="training")
    lr_num_cycles: int = setting(1, "for --lr_scheduler cosine_with_restarts: how many times the cosine starts "
                                 "again from the peak", group="training")
    lr_power: float = setting(1.0, "for --lr_scheduler polynomial: the power of its decay to 1e-7 (1: linear)",
                              group="training")
    adam_beta1: float = setting(0.95, "AdamW beta1", group="training", seed=True)
    adam_beta2: float = setting(0.999, "AdamW beta2", group="training", seed=True)
    adam_weight_decay: float = setting(1e-6, "AdamW weight decay", group="training", seed=True)
    adam_epsilon: float = setting(1e-08, "AdamW epsilon", group="training", seed=True)
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)", group="training")
    skip_nonfinite: bool = setting(False, "skip optimizer steps whose loss or gradients are NaN/inf instead of "
                                   "stopping (checks every step: one host sync per step)", group="training")
    mixed_precision: str = setting("no", "fp16 or bf16 autocast with fp32 master weights; without the flag, "
                                   "the accelerate launch's setting, else no", group="training",
                                   choices=MIXED_PRECISIONS, seed=True)
    seed: int | None = setting(None, "random seed; the one used is saved in training_config.json (default: random)",
                               group="training")

    # ---- exponential moving average of the weights
    use_ema: bool = setting(False, "keep an EMA of the weights; previews and the export use it", group="ema",
                            seed=True)
    ema_inv_gamma: float = setting(1.0, "EMA warmup inverse gamma", group="ema", seed=True)
    ema_power: float = setting(3 / 4, "EMA warmup power", group="ema", seed=True)
    ema_max_decay: float = setting(0.9999, "largest EMA decay", group="ema", seed=True)

    # ---- outputs
    output_dir: str = setting("ddpm-model-64", "where the pipeline, checkpoints, samples and logs go",
                              group="outputs", seed=True)
    overwrite_output_dir: bool = setting(False, "replace a trained model already in --output_dir and start afresh",
                                         group="outputs", seed=True)
    save_images_epochs: int = setting(10, "write a sample grid after epoch 1 and every this many epochs after it "
                                      "(1, 11, 21, ... for 10, as the seed script), and at the end",
                                      group="outputs", seed=True)
    save_model_epochs: int = setting(10, "export the pipeline after epoch 1 and every this many epochs after it, "
                                     "and at the end", group="outputs", seed=True)
    eval_batch_size: int = setting(16, "images in each sample grid", group="outputs", seed=True)
    sampler: str = setting("sde-dpmsolver++", "sampler for the sample grids (stochastic DPM-Solver++(2M): "
                           "clearer previews of a young model than the ODE solvers); `uncond sample --help` lists "
                           "the others", group="outputs")
    sample_steps: int = setting(25, "sampler steps for the sample grids (ddpm uses --ddpm_num_inference_steps)",
                                group="outputs")
    ddpm_num_inference_steps: int = setting(1000, "steps when --sampler ddpm", group="outputs", seed=True)
    checkpointing_steps: int = setting(500, "save a resumable checkpoint every this many optimizer steps",
                                       group="outputs", seed=True)
    checkpoints_total_limit: int | None = setting(None, "keep at most this many checkpoints", group="outputs",
                                                  seed=True)
    keep_checkpoints_every: int | None = setting(
        None, "with --checkpoints_total_limit: keep also each checkpoint whose step is a multiple of this (a "
        "milestone), beside the newest ones the limit keeps", group="outputs")
    resume_from_checkpoint: str | None = setting(
        None, "a checkpoint folder (or its name in --output_dir), or `latest`", group="outputs", seed=True)

    # ---- evaluation during training
    eval_every_steps: int | None = setting(
        None, "compute FID and KID of --eval_num_images samples of the EMA weights (drawn with --sampler) against "
        "the training images every this many optimizer steps; logged to metrics.jsonl and the trackers",
        group="evaluation")
    eval_num_images: int = setting(1000, "images sampled for each evaluation (more: steadier numbers, slower)",
                                   group="evaluation")
    keep_best: bool = setting(False, "also keep the export with the lowest FID so far, in output_dir/best",
                              group="evaluation")
    inception_weights: str | None = inception_weights_setting("evaluation")

    # ---- logging
    logger: str = setting("tensorboard", "experiment tracker", group="logging", choices=LOGGERS, seed=True)
    logging_dir: str = setting("logs", "tracker folder, relative to --output_dir", group="logging", seed=True)
    logging_steps: int = setting(10, "average and log the metrics every this many optimizer steps",
                                 group="logging")

    # ---- Hugging Face Hub
    push_to_hub: bool = setting(False, "upload the exported pipeline to the Hub", group="hub", seed=True)
    hub_token: str | None = setting(None, "Hub token (better: `hf auth login`; never written anywhere)",
                                    group="hub", seed=True)
    hub_model_id: str | None = setting(None, "Hub repository (default: the output folder's name)", group="hub",
                                       seed=True)
    hub_private_repo: bool = setting(False, "make the Hub repository private", group="hub", seed=True)

    # ---- speed (each is said in the log when it is on)
    channels_last: bool = setting(False, "keep activations in channels-last layout on GPUs (off: for these "
                                  "UNets it measured 1.4x slower on an H100, docs/benchmarks.md)", group="speed")
    allow_tf32: bool = setting(True, "let fp32 matrix products use TF32 tensor cores on NVIDIA GPUs",
                               group="speed")
    fused_adamw: bool = setting(True, "use PyTorch's fused AdamW kernel (GPUs and CPUs)", group="speed")
    compile: bool = setting(False, "torch.compile the UNet, with CUDA graphs, on GPUs (about 1.5 minutes of "
                            "compiling, then 1.8x faster steps on an H100; exports and checkpoints hold the plain "
                            "module); refused on CPUs, where torch 2.13 compiles wrong gradients", group="speed")
    cuda_graphs: bool = setting(False, "record the step's forward and backward passes once as a CUDA graph and "
                                "replay it (one GPU process; bf16 or fp32; not with gradient accumulation, gradient "
                                "checkpointing, --compile or xformers): the eager step of these UNets is bound by "
                                "launching kernels. Not yet measured on a GPU", group="speed")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                           "about a third more compute", group="speed")
    ema_update_every: int = setting(1, "update the EMA every this many steps, each update with the product "
                                    "of the steps' decays (the seed updates every step)", group="speed")

    # ---- run control
    local_rank: int = setting(-1, "set by launchers; accelerate reads it from the environment", group="run",
                              seed=True)
    dry_run: bool = setting(False, "print the resolved config, dataset size and model size, then exit",
                            group="run")
    demo: bool = setting(False, "start from the demo settings (what `uncond train` with no arguments runs)",
                         group="run")

    # ------------------------------------------------------------------ helpers
    def names_a_checkpoint(self) -> bool:
        """Whether --resume_from_checkpoint names one checkpoint (not `latest`; "" is not given, as in the seed
        script): the command, run again as it is, goes back to that one."""
        return self.resume_from_checkpoint not in (None, "", "latest")

    def to_dict(self) -> dict[str, Any]:
        """All settings but the Hub token, which is never written or logged."""
        values = dataclasses.asdict(self)
        values.pop("hub_token")
        return values

    def to_record(self) -> dict[str, Any]:
        """training_config.json, and --dry_run's stdout: the settings with local paths made absolute, so that the run
        is known for the same (and the file passed back with --config) from any working folder; without what a
        command does once (--overwrite_output_dir, --resume_from_checkpoint), which the file passed back would do
        again: replace the finished run, or go back to an old checkpoint."""
        values = {key: value for key, value in self.to_dict().items() if key not in ONE_TIME_SETTINGS}
        values.update({key: absolute_if_local(values[key]) for key in LOCAL_PATH_SETTINGS},
                      output_dir=os.path.abspath(self.output_dir))
        return values

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_record(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# The demo: `uncond train` with no arguments. Tuned to end in under ten minutes on a 2-core CPU with
# digits a person recognises (docs/benchmarks.md has the timing).
DEMO_SETTINGS: dict[str, Any] = {
    "dataset_name": "builtin:mnist",
    "model_preset": "tiny",
    "output_dir": "uncond-demo",
    "train_batch_size": 64,
    "max_train_steps": 1600,
    "snr_gamma": 5.0,
    "learning_rate": 2e-3,
    "lr_warmup_steps": 100,
    "adam_beta1": 0.9,
    "use_ema": True,
    "ema_max_decay": 0.999,
    "save_images_epochs": 2,
    "save_model_epochs": 10,
    "eval_batch_size": 64,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 1,
    "seed": 0,
}


@dataclass(kw_only=True)
class SamplingSettings:
    """How images are drawn from a model: shared by `uncond sample` and `uncond evaluate`."""
    num_images: int = setting(16, "images to generate", group="sampling")
    batch_size: int = setting(64, "images per batch; image i is the same whatever the batch size (up to float "
                              "rounding)", group="sampling")
    sampler: str = setting("sde-dpmsolver++", "the sampler; the default matched 1000 DDPM steps from 10 steps on, on "
                           "the demo model (docs/benchmarks.md compares them all)", group="sampling",
                           choices=SAMPLER_NAMES)
    steps: int | None = setting(None, "sampler steps (default: 25; 1000 for ddpm)", group="sampling")
    seed: int = setting(0, "image i starts from noise seeded seed + i", group="sampling")
    device: str = setting("auto", "cuda, cuda:N, mps, cpu, or auto (a GPU when there is one)", group="sampling")
    dtype: str = setting("float32", "the network's precision while sampling", group="sampling", choices=DTYPES)


@dataclass(kw_only=True)
class SampleConfig(SamplingSettings):
    """`uncond sample MODEL`: numbered PNGs, and a grid if asked."""
    model: str = setting(REQUIRED, "a pipeline folder (uncond's, or any diffusers DDPMPipeline or DDIMPipeline), "
                         "a Hub model id, or a training run's checkpoint-N folder", group="inputs", positional=True)
    output_dir: str = setting("samples", "the folder the numbered PNGs go to", group="results")
    overwrite: bool = setting(False, "replace the numbered images already in --output_dir (all of them) and the "
                                     "--grid file",
                              group="results")
    grid: str | None = setting(None, "also tile the images (the first 256) into this PNG file", group="results")


@dataclass(kw_only=True)
class EvaluateConfig(SamplingSettings):
    """`uncond evaluate GENERATED --reference REF`: FID, KID, precision and recall."""
    generated: str = setting(REQUIRED, "a folder of images, or a MODEL to sample from (as `uncond sample` takes)",
                             group="inputs", positional=True)
    reference: str = setting(REQUIRED, "the real images: a Hub dataset, a dataset saved with save_to_disk, "
                             "builtin:mnist, a folder of images, or a statistics file (.npz with mu and sigma, "
                             "as pytorch-fid writes)", group="inputs")
    num_images: int = setting(10000, "images to sample from MODEL, or to read from the folder (at most)",
                              group="sampling")
    reference_num_images: int = setting(50000, "reference images used, at most", group="inputs")
    resolution: int | None = setting(None, "the size both sets are compared at: reference images (and generated "
                                     "ones of another size) are resized, shorter side, and centre-cropped to it "
                                     "(default: the generated images' size)", group="inputs")
    inception_weights: str | None = inception_weights_setting("inputs")
    json: bool = setting(False, "print the results as one JSON object", group="results")


@dataclass(kw_only=True)
class ExportConfig:
    """`uncond export CHECKPOINT --output_dir DIR`: a checkpoint as a pipeline folder, the model to deliver."""
    checkpoint: str = setting(REQUIRED, "a training run's checkpoint-N folder (its EMA weights where the run kept "
                              "them, as its exports do), or checkpoint-N/unet for its trained weights", group="inputs",
                              positional=True)
    output_dir: str = setting(REQUIRED, "the pipeline folder to write (new, or empty)", group="results")
    overwrite_output_dir: bool = setting(False, "replace the model in --output_dir, a folder `uncond export` wrote",
                                         group="results")


@dataclass(kw_only=True)
class CacheConfig:
    """`uncond cache`: the decoded-image cache's entries and uncond evaluate's reference statistics, and
    removing them."""
    cache_dir: str | None = setting(None, "the cache in DIR/uncond, as `uncond train --cache_dir DIR` puts it "
                                    "(default: ~/.cache/uncond, or $XDG_CACHE_HOME/uncond)", group="inputs")
    remove_unused_days: int | None = setting(None, "remove the entries (and reference statistics) that no run "
                                             "has read for this many days", group="results")
    remove_all: bool = setting(False, "remove every entry and reference statistics file (runs decode their "
                               "images again)", group="results")


SETTINGS = {f.name: f for f in fields(TrainConfig)}
GROUP_TITLES = {  # in the order --help shows them
    "inputs": "inputs", "data": "data", "model": "model", "diffusion": "diffusion objective",
    "training": "optimisation", "ema": "exponential moving average", "sampling": "sampling",
    "outputs": "outputs, previews and checkpoints", "results": "outputs",
    "evaluation": "evaluation during training (FID, KID)", "logging": "logging", "hub": "Hugging Face Hub",
    "speed": "speed and memory", "run": "run control",
}
RUN_CONFIG_FILE = "training_config.json"  # in every run's output folder and checkpoints: it marks them
STATE_FILE = "training_state.json"  # beside it: the step, epoch and images seen of the export or checkpoint
# In a checkpoint's STATE_FILE: the share of its unet_ema/ in the model of its step, its unet/ the rest (the steps
# an EMA updated every N steps has not averaged yet); absent where the run kept no EMA or was uncond's before it.
EMA_SHARE_KEY = "ema_share"
# Beside it: the step its EMA was last updated at, which a resume counts the next update's decay from (a run with
# another --ema_update_every than the one that wrote it updates at other steps), and the step the EMA's warmup
# counts from (a resume's that added --use_ema; models.EMA, checkpoint.ema_clock).
EMA_LAST_UPDATE_KEY, EMA_CLOCK_START_KEY = "ema_last_update_step", "ema_clock_start_step"
SAMPLE_SETTINGS_FILE = "sample_settings.json"  # in every folder `uncond sample` writes: it marks them
PREVIEWS_DIR = "samples"  # a run's preview grids, in its output folder (a run artefact)
BEST_DIR = "best"  # --keep_best: the export with the lowest FID
# What uncond writes into a run's folder is staged under this prefix, then renamed: run_folder takes names so
# made for its own leftovers (a kill mid-write) and removes them
STAGING_PREFIX = ".tmp-"
REFERENCE_STATS_FILE = "fid_reference.npz"  # feature statistics of the training images, for FID during training
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")  # a run's checkpoint folders (checkpoint.py writes them)
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# What one command does, not a setting of the run: left out of training_config.json (TrainConfig.to_record)
ONE_TIME_SETTINGS = ("overwrite_output_dir", "resume_from_checkpoint", "dry_run", "local_rank")
# Settings that may name a local file or folder (dataset_name a Hub id too, as for `datasets`)
LOCAL_PATH_SETTINGS = ("dataset_name", "train_data_dir", "model_config_name_or_path", "pretrained_model_name_or_path",
                       "cache_dir", "inception_weights")
# Every command's settings that name a file or folder: a leading ~ is the home folder there as in a shell, which
# leaves it in `--output_dir=~/x`, a config file and uncond.main("...") (a folder named ~ was made; trial 64 F11)
PATH_SETTINGS = (*LOCAL_PATH_SETTINGS, "output_dir", "resume_from_checkpoint", "logging_dir", "model", "grid",
                 "generated", "reference", "checkpoint")


def absolute_if_local(value: Any) -> Any:
    """A path that exists here, made absolute; anything else (a Hub id, None) as it is."""
    return os.path.abspath(value) if isinstance(value, str) and value and os.path.exists(value) else value


def same_place(saved: Any, current: Any) -> bool:
    """Two values of a setting are the same: equal, or paths that lead to the same place from here (`../data`
    and `/jobs/data`, the same folder)."""
    if saved == current:
        return True
    both_paths = isinstance(saved, str) and isinstance(current, str) and bool(saved and current)
    return both_paths and os.path.realpath(saved) == os.path.realpath(current)


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest of the folders above it that exists: where a folder to be made will be."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Folders named checkpoint-N in `output_dir`, complete or not, oldest first (here, below the modules that
    read run folders: checkpoint, run_folder, sampling)."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def value_type(name: str, config_class: type = TrainConfig) -> type:
    """The scalar type of a setting (`int | None` -> int)."""
    hint = typing.get_type_hints(config_class)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def coerce(name: str, value: Any, config_class: type = TrainConfig) -> Any:
    """Turn a config-file or flag value into the setting's type, or say what is wrong."""
    spec = next(spec for spec in fields(config_class) if spec.name == name)
    if value is None:  # `resolution:` left empty in YAML, or JSON's null
        if type(None) in typing.get_args(typing.get_type_hints(config_class)[name]):
            return None
        # not naming the default: a preset, the demo or a model to fine-tune may give another
        leave_out = ", or leave it out for the default" * (spec.default is not REQUIRED)
        raise UsageError(f"--{name} is given no value; give one{leave_out}")
    kind = value_type(name, config_class)
    if isinstance(value, bool) and kind is not bool:  # YAML 1.1 reads no, yes, off and on as false and true
        choices = spec.metadata["choices"] or ()
        if kind is str and ("yes" if value else "no") in choices:
            return "yes" if value else "no"
        raise UsageError(f"--{name} expects {kind.__name__}, got {value!r} (YAML reads no, yes, off and on as false "
                         "and true; quote the value)")
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError
            return bool(value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind is str and name in PATH_SETTINGS:
            return home_expanded(name, str(value))
        return kind(value)
    except (TypeError, ValueError):
        raise UsageError(f"--{name} expects {kind.__name__}, got {value!r}") from None


def home_expanded(name: str, path: str) -> str:
    """`path` with a leading ~ or ~user made the home folder, as a shell does (PATH_SETTINGS)."""
    expanded = os.path.expanduser(path)
    if expanded.startswith("~"):  # no such user (pathlib's expanduser, used further on, raised a traceback)
        user = expanded[1:].split(os.sep, 1)[0]
        raise UsageError(f"--{name} {path}: no user {user!r} has a home folder here (a leading ~{user} means "
                         f"theirs); write ./{path} for a folder of that name")
    return expanded


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (plus --config), grouped as in TrainConfig. Only flags a user typed are set."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, type=flag_type("config", None),
                        help="a YAML or JSON file of settings (same keys as the flags); flags win")
    add_arguments(parser, TrainConfig)


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One argument per field of `config_class`, grouped; only those a user typed are set."""
    specs = sorted(fields(config_class), key=lambda spec: list(GROUP_TITLES).index(spec.metadata["group"]))
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in specs:
        name, meta = spec.name, spec.metadata
        group = groups.get(meta["group"]) or parser.add_argument_group(GROUP_TITLES[meta["group"]])
        groups[meta["group"]] = group
        kind = value_type(name, config_class)
        required = spec.default is REQUIRED
        default_text = "" if spec.default is None or required else f" (default: {spec.default})"
        help_text = meta["help"] + default_text
        if meta["positional"]:
            action = group.add_argument(name, metavar=name.upper(), help=help_text, type=flag_type(name, config_class))
        elif kind is bool:
            action = group.add_argument(f"--{name}", dest=name, action=argparse.BooleanOptionalAction,
                                        default=argparse.SUPPRESS, help=help_text)
        else:
            # torch.distributed.launch passes --local-rank=N since torch 2.0; the seed's --local_rank is the same
            spelled = (f"--{name}", "--local-rank") if name == "local_rank" else (f"--{name}",)
            action = group.add_argument(*spelled, dest=name, default=argparse.SUPPRESS, choices=meta["choices"],
                                        required=required, help=help_text, type=flag_type(name, config_class),
                                        metavar=None if meta["choices"] else kind.__name__.upper())
        action.seed_flag = meta["seed"]  # (cli.Parser: the seed script's abbreviations)


def flag_type(name: str, config_class: type | None) -> Callable[[str], Any]:
    """The flag's value converter (None: a path, as --config's): argparse says its refusal in one line (a
    UsageError raised inside argparse came out as a traceback)."""
    def convert(text: str) -> Any:
        try:
            return home_expanded(name, text) if config_class is None else coerce(name, text, config_class)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"--{name} ")) from None
    return convert


def public_argv(argv: list[str], config: TrainConfig) -> list[str]:
    """The command line with the Hub token replaced by <token>, however its flag was spelled
    (--hub_token X, --hub_token=X, or an abbreviation argparse accepts)."""
    if not config.hub_token:
        return list(argv)
    return [word.replace(config.hub_token, "<token>") for word in argv]


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a YAML or JSON file, keys as the flags' names (with - or _)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - any parse error becomes one clear line
        # PyYAML's first line names only what it was parsing; the problem and its place come after
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"--config {path} could not be read: {problem or first_line(error)}{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must hold a mapping of setting names to values")
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in SETTINGS:
            close = difflib.get_close_matches(name, SETTINGS, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; `uncond train --help` lists the settings"
            raise UsageError(f"--config {path}: unknown setting {key!r}{hint}")
        try:
            settings[name] = coerce(name, value)
        except UsageError as error:  # said as of the file, where the value is
            raise UsageError(f"--config {path}: {str(error).removeprefix('--')}") from None
    return settings


def without_replacing(path: str, values: dict[str, Any], flag_given: bool) -> dict[str, Any]:
    """A file's settings without overwrite_output_dir: every run of the file would replace the run in its output
    folder, a resume after a stop or preemption too. (A training_config.json of an earlier version of uncond holds
    it, where the recorded command had the flag.) `flag_given`: --overwrite_output_dir is on the command line."""
    if values.get("overwrite_output_dir") and not flag_given:
        logging.getLogger("uncond").warning(
            f"--config {path}: its overwrite_output_dir is ignored, since every run of the file would replace the "
            "run in --output_dir, a resumed one too; pass --overwrite_output_dir on the command line to replace it")
    return {key: value for key, value in values.items() if key != "overwrite_output_dir"}


def check_recorded_output_dir(path: str, output_dir: str) -> None:
    """A run's training_config.json names its folder as an absolute path; earlier versions wrote it as
    typed. Passed back from another folder, such a relative one would lead to a new run elsewhere, unsaid."""
    record = Path(path).resolve()
    run = record.parent
    if Path(output_dir).expanduser().is_absolute() or record.name != RUN_CONFIG_FILE:
        return
    if not (list_checkpoints(run) or (run / "model_index.json").is_file()):
        return
    leads_to = Path(output_dir).resolve()
    if leads_to != run:
        elsewhere = "" if run in leads_to.parents else f", or --output_dir {leads_to} to train there"  # not inside
        raise UsageError(f"--config {path}: its output_dir {output_dir} is relative (as earlier versions of uncond "
                         f"recorded it) and leads from here to {leads_to}, not to the run that holds the file; pass "
                         f"--output_dir {run} to go on with that run{elsewhere}")


def build_config(cli_values: dict[str, Any], *, use_demo: bool = False) -> tuple[TrainConfig, set[str]]:
    """Layer defaults < demo < config file < flags. Returns the config and the names set explicitly."""
    cli_values = dict(cli_values)
    config_file = cli_values.pop("config", None)
    file_values = read_config_file(config_file) if config_file else {}
    if config_file:
        file_values = without_replacing(config_file, file_values, "overwrite_output_dir" in cli_values)
        if "output_dir" in file_values and "output_dir" not in cli_values:
            check_recorded_output_dir(config_file, file_values["output_dir"])
    demo = use_demo or cli_values.get("demo") or file_values.get("demo")
    layered: dict[str, Any] = {}
    given = {**file_values, **cli_values}
    if demo:  # the demo's settings, on one's own images where a --train_data_dir is given
        layered.update(DEMO_SETTINGS, demo=True)
        if given.get("train_data_dir") and "dataset_name" not in given:
            del layered["dataset_name"]
    layered.update(given)
    config = TrainConfig(**layered)
    validate(config)
    return config, set(layered)


def check_choices(config: Any) -> None:
    for spec in fields(config):
        choices = spec.metadata["choices"]
        value = getattr(config, spec.name)
        if choices and value not in choices:
            raise UsageError(f"--{spec.name} {value}: not one of {', '.join(choices)}")


def check_at_least(config: Any, low: float, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise UsageError(f"--{name} is {value}; it must be at least {low}")


POLYNOMIAL_LR_END = 1e-7  # what diffusers' get_scheduler gives its polynomial decay to end at
SEED_LIMIT = 2**32  # numpy's seeds (accelerate's set_seed seeds numpy too)


def check_numbers(config: Any) -> None:
    """nan and inf pass every comparison of the other checks; a seed outside numpy's range fails deep in a library."""
    for spec in fields(config):
        value = getattr(config, spec.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{spec.name} is {value}; give a finite number")
    seed = getattr(config, "seed", None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed is {seed}; use a whole number from 0 to {SEED_LIMIT - 1}")


def check_weights_file(path: str | None) -> None:
    if path is not None and Path(path).expanduser().is_dir():
        raise UsageError(f"--inception_weights {path} is a folder; pass the weights file in it "
                         "(pt_inception-2015-12-05-6726825d.pth)")
    if path is not None and not Path(path).expanduser().is_file():
        raise UsageError(f"--inception_weights {path}: no such file")


def validate(config: TrainConfig) -> None:
    """The checks that need neither data nor a model. Raises UsageError on the first problem."""
    check_choices(config)
    check_numbers(config)
    check_at_least(config, 1, "train_batch_size", "eval_batch_size", "gradient_accumulation_steps", "num_epochs",
                   "lr_num_cycles",
                   "save_images_epochs", "save_model_epochs", "checkpointing_steps", "checkpoints_total_limit",
                   "ddpm_num_inference_steps", "sample_steps", "max_train_steps", "logging_steps",
                   "ema_update_every", "eval_every_steps", "keep_checkpoints_every")
    check_at_least(config, 0, "lr_warmup_steps", "dataloader_num_workers", "adam_weight_decay", "adam_epsilon",
                   "noise_offset", "max_grad_norm")
    check_at_least(config, 2, "ddpm_num_steps", "eval_num_images")
    check_at_least(config, 8, "resolution")
    check_step_rules(config.lr_scheduler, config.lr_step_rules)
    check_milestones(config)
    if config.keep_best and not config.eval_every_steps:
        raise UsageError("--keep_best needs --eval_every_steps N: the best export is chosen by FID")
    check_weights_file(config.inception_weights)
    if config.lr_scheduler == "polynomial" and config.learning_rate <= POLYNOMIAL_LR_END:
        raise UsageError(f"--lr_scheduler polynomial decays to {POLYNOMIAL_LR_END:g}, so --learning_rate "
                         f"{config.learning_rate:g} must be above that; raise it or choose another --lr_scheduler")
    for name in ("learning_rate", "ema_inv_gamma", "ema_power", "lr_power"):  # the EMA's warmup divides by one, and
        if getattr(config, name) <= 0:                               # a power of 0 or less makes its decay 0
            raise UsageError(f"--{name} is {getattr(config, name)}; it must be positive")
    if config.snr_gamma is not None and config.snr_gamma <= 0:
        raise UsageError(f"--snr_gamma is {config.snr_gamma}; it must be positive (5.0 is usual)")
    check_zero_snr(config)
    if not 0 < config.ddpm_beta_start < config.ddpm_beta_end < 1:
        raise UsageError(f"--ddpm_beta_start {config.ddpm_beta_start} and --ddpm_beta_end {config.ddpm_beta_end}: "
                         "they must rise from above 0 to below 1 (0.0001 and 0.02 are DDPM's)")
    for name in ("adam_beta1", "adam_beta2", "ema_max_decay"):
        if not 0 <= getattr(config, name) < 1:
            raise UsageError(f"--{name} is {getattr(config, name)}; it must be in [0, 1)")
    refuse_empty(config, ("dataset_name", "output_dir") + ("train_data_dir",) * (not config.dataset_name))
    if config.dataset_name is None and config.train_data_dir is None:
        raise UsageError("no dataset given: pass --dataset_name (a Hub dataset, a saved dataset, a folder, or "
                         "builtin:mnist) or --train_data_dir DIR; `uncond train` with no arguments runs the demo, "
                         "and --demo gives its settings to a command with flags (--demo --dry_run)")
    if config.streaming and not config.dataset_name:
        raise UsageError("--streaming reads --dataset_name (a Hub dataset, or a folder of Parquet or WebDataset "
                         "shards); a --train_data_dir folder is decoded once into the cache instead")
    if config.streaming and not config.max_train_steps:
        raise UsageError("--streaming needs --max_train_steps: the length of a stream is not known in advance")
    if config.streaming and config.eval_every_steps:
        raise UsageError("--eval_every_steps compares samples with the training images' statistics, which a "
                         "--streaming run does not hold; measure its exports with `uncond evaluate` instead")


def check_zero_snr(config: TrainConfig) -> None:
    """Also of a fine-tuning's settings, once the pretrained model's schedule is adopted (plan.adopt_pretrained)."""
    if config.rescale_betas_zero_snr and config.prediction_type == "epsilon":
        raise UsageError("--rescale_betas_zero_snr needs --prediction_type v_prediction (or sample): pure noise, the "
                         "noisiest input, tells nothing of the noise's image, so an epsilon model cannot denoise it")


def check_milestones(config: TrainConfig) -> None:
    """--keep_checkpoints_every exempts checkpoints from --checkpoints_total_limit; it must name steps that get one."""
    every = config.keep_checkpoints_every
    if every is None:
        return
    if config.checkpoints_total_limit is None:
        raise UsageError(f"--keep_checkpoints_every {every} keeps milestones that --checkpoints_total_limit would "
                         "remove, and there is no limit (every checkpoint is kept); pass --checkpoints_total_limit N")
    if every % config.checkpointing_steps:
        raise UsageError(f"--keep_checkpoints_every {every} is not a multiple of --checkpointing_steps "
                         f"{config.checkpointing_steps}, so not every milestone would have a checkpoint; use a "
                         "multiple")


def check_step_rules(scheduler: str, rules: str | None) -> None:
    """--lr_step_rules as diffusers' get_piecewise_constant_schedule parses them (it fails with a traceback)."""
    example = "e.g. --lr_step_rules 1:1000,0.1:2000,0.01 (x1 until step 1000, x0.1 until 2000, then x0.01)"
    if scheduler != "piecewise_constant":
        if rules:
            raise UsageError(f"--lr_step_rules applies to --lr_scheduler piecewise_constant, not {scheduler}")
        return
    if not rules:
        raise UsageError(f"--lr_scheduler piecewise_constant needs --lr_step_rules, {example}")
    *steps, last = rules.split(",")
    try:
        pairs = [rule.split(":") for rule in steps]
        multipliers = [float(value) for value, _ in pairs] + [float(last)]
        ends = [int(until) for _, until in pairs]
    except ValueError:
        raise UsageError(f"--lr_step_rules {rules}: not MULTIPLIER:STEP,...,MULTIPLIER; {example}") from None
    if ends != sorted(set(ends)) or min(multipliers) < 0:
        raise UsageError(f"--lr_step_rules {rules}: the steps must increase and the multipliers not be negative; "
                         f"{example}")


def refuse_empty(config: Any, names: Sequence[str]) -> None:
    """Refuse the settings `names` of `config` given as "" (an unset shell variable): Path("") is the current
    folder (trial 64 F3)."""
    positional = {spec.name for spec in fields(config) if spec.metadata["positional"]}
    for name in names:
        if getattr(config, name) == "":
            raise UsageError(f"{name.upper() if name in positional else '--' + name} is empty (an unset shell "
                             "variable?); give it a value")


def build_command_config(config_class: type, values: dict[str, Any]) -> Any:
    """`uncond sample` / `evaluate` / `export` / `cache` settings from parsed arguments, checked."""
    config = config_class(**values)
    refuse_empty(config, [spec.name for spec in fields(config)])  # (sample and export wrote into the current folder)
    check_choices(config)
    check_numbers(config)
    if isinstance(config, CacheConfig):
        check_at_least(config, 0, "remove_unused_days")
        return config
    if isinstance(config, ExportConfig):
        return config
    check_at_least(config, 1, "num_images", "batch_size", "steps")
    if isinstance(config, SampleConfig):
        if config.grid and Path(config.grid).suffix.lower() not in IMAGE_FILE_SUFFIXES:
            raise UsageError(f"--grid {config.grid}: name a {', '.join(IMAGE_FILE_SUFFIXES)} file")
    if isinstance(config, EvaluateConfig):
        check_at_least(config, 2, "num_images", "reference_num_images")
        check_at_least(config, 8, "resolution")
        check_weights_file(config.inception_weights)
    return config
