"""Generating images from a UNet with any of diffusers' samplers, deterministically per image.

Image i of a run with seed s always starts from the same noise (and draws the same noise at every
stochastic step), whatever the batch size, because every image has its own generator seeded s + i.
`load_model` and `open_for_sampling` load any diffusers pipeline folder or Hub model, or a checkpoint of uncond's,
for sampling.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from . import cpu_threads, manifest, remote, signals
from .config import (CHECKPOINT_NAME, EMA_SHARE_KEY, RUN_CONFIG_FILE, STATE_FILE, SamplingSettings, UsageError,
                     check_utf8_path, counted, first_line, list_checkpoints)
from .progress import progress_bar

PARTIAL_SUFFIX = ".partial"  # an image being written; renamed into place once whole

logger = logging.getLogger("uncond")

# name -> (scheduler class, settings on top of the training schedule's config); config.SAMPLER_NAMES lists the
# names for --help (a test keeps the two equal)
SAMPLERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmsolver++3": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmsolver-singlestep": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2}),
    "deis": (DEISMultistepScheduler, {"solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
}
DEFAULT_STEPS, DDPM_STEPS = 25, 1000  # `uncond sample` without --steps
TRAIN_TIMESTEPS = 1000  # diffusers' schedulers' num_train_timesteps where a config gives none


def training_noise_scheduler(run_config: dict[str, Any]) -> DDPMScheduler:
    """The noise schedule a run trains with (its settings, as TrainConfig.to_dict() or a run's saved
    training_config.json give them); it is also the scheduler written into the exported pipeline."""
    beta_schedule = run_config["ddpm_beta_schedule"]
    try:
        scheduler = DDPMScheduler(num_train_timesteps=run_config["ddpm_num_steps"], beta_schedule=beta_schedule,
                                  prediction_type=run_config["prediction_type"],
                                  # runs before these settings recorded none: DDPM's
                                  beta_start=run_config.get("ddpm_beta_start", 0.0001),
                                  beta_end=run_config.get("ddpm_beta_end", 0.02),
                                  rescale_betas_zero_snr=run_config.get("rescale_betas_zero_snr", False))
    except NotImplementedError:
        raise UsageError(f"--ddpm_beta_schedule {beta_schedule}: this diffusers version's DDPMScheduler does not "
                         "implement it") from None
    # As the export's scheduler_config.json reads back, every setting written out. diffusers hands the settings
    # left at their defaults to another sampler class as that class's defaults: Heun's and KDPM2's clip_sample is
    # False, DDPM's True, so previews and a checkpoint's samples went unclipped where the export's are clipped.
    # The samplers made from it are now the export's to the last setting (tests/test_sampling.py).
    written = json.loads(scheduler.to_json_string())
    if beta_schedule not in SHARED_BETA_SCHEDULES:
        # Written out as trained_betas too, which every diffusers sampler takes: DDIMScheduler.from_config(
        # pipeline.scheduler.config) raised NotImplementedError for sigmoid, and so did the other samplers.
        written["trained_betas"] = scheduler.betas.tolist()
    return DDPMScheduler.from_config(written)


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise UsageError(f"--sampler {name}: unknown; choose one of {', '.join(SAMPLERS)}")


# The beta schedules every diffusers sampler computes itself; DDPM's others (sigmoid, laplace) are handed
# to the samplers as the training betas.
SHARED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_sampler(name: str, training_scheduler_config: dict[str, Any]) -> Any:
    """A sampling scheduler for a model trained with `training_scheduler_config` (betas, prediction type).

    Few-step samplers use "trailing" timestep spacing so the first step starts from the last training
    timestep (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", table 2).
    """
    scheduler_class, settings = sampler_settings(name, training_scheduler_config)
    return scheduler_class.from_config(dict(training_scheduler_config), **settings)


def sampler_settings(name: str, training_scheduler_config: dict[str, Any]) -> tuple[type, dict[str, Any]]:
    """The scheduler class of sampler `name` and the settings `make_sampler` puts on top of the training
    schedule's config."""
    check_sampler(name)
    scheduler_class, settings = SAMPLERS[name]
    settings = dict(settings)
    if name != "ddpm":
        settings["timestep_spacing"] = "trailing"
    if (training_scheduler_config.get("beta_schedule", "linear") not in SHARED_BETA_SCHEDULES
            and training_scheduler_config.get("trained_betas") is None):
        settings["trained_betas"] = DDPMScheduler.from_config(dict(training_scheduler_config)).betas.tolist()
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if (training_scheduler_config.get("clip_sample") and training_scheduler_config.get("clip_sample_range", 1.0) == 1
            and "thresholding" in accepted and "clip_sample" not in accepted):
        # DDPM clips its x0 estimate to [-1, 1]; solvers in x0 space do the same through thresholding,
        # whose bound at sample_max_value = 1 is plain clipping (at other values it rescales, so a foreign
        # schedule's other clip_sample_range is left unclipped). Without it, an undertrained model's
        # overshooting x0 estimates show as speckles in few-step samples.
        settings.update(thresholding=True, sample_max_value=1.0)
    return scheduler_class, settings


def check_sampler_fits(name: str, training_scheduler_config: dict[str, Any], num_steps: int,
                       steps_flag: str = "--steps") -> None:
    """Raise UsageError if sampler `name` cannot sample a model trained with `training_scheduler_config` in
    `num_steps` steps. diffusers refuses some combinations only when stepping (a prediction type a sampler
    does not handle, more steps than training timesteps), so the sampler takes one step on a dummy sample:
    otherwise training would meet the refusal at its first preview, after an epoch of work."""
    timesteps = training_scheduler_config.get("num_train_timesteps", TRAIN_TIMESTEPS)
    scheduler_class = SAMPLERS[name][0] if name in SAMPLERS else None  # (make_sampler refuses an unknown one)
    if (training_scheduler_config.get("rescale_betas_zero_snr") and scheduler_class is not None
            and "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters):
        # Its last noise level is infinite: a sampler that does not cap it (as those taking the setting do) makes NaN
        capable = [sampler for sampler, (kind, _) in SAMPLERS.items()
                   if "rescale_betas_zero_snr" in inspect.signature(kind.__init__).parameters]
        raise UsageError(f"--sampler {name} cannot sample this model (its noise schedule ends at zero SNR, which "
                         f"{name} does not handle); choose one of {', '.join(capable)}")
    if num_steps > timesteps:
        raise UsageError(f"{num_steps} sampling steps with {name}: the model was trained with {timesteps} "
                         f"timesteps; use at most {timesteps} steps ({steps_flag})")
    try:
        scheduler = make_sampler(name, training_scheduler_config)
        scheduler.set_timesteps(num_steps, device="cpu")
        sample, options = torch.zeros(1, 1, 2, 2), step_options(scheduler)
        if "generator" in options:
            options["generator"] = torch.Generator().manual_seed(0)
        timestep = scheduler.timesteps[0]
        scheduler.step(torch.zeros_like(sample), timestep, scheduler.scale_model_input(sample, timestep), **options)
    except (NotImplementedError, ValueError) as error:
        prediction = training_scheduler_config.get("prediction_type", "epsilon")
        # diffusers' own words for this differ per sampler, and some read garbled out of context
        reason = (f"it takes no prediction_type {prediction}" if "prediction_type" in str(error)
                  else first_line(error))
        raise UsageError(f"--sampler {name} cannot sample this model ({reason}); choose another sampler, "
                         "such as ddim or dpmsolver++") from None


def diffusers_usage_code(name: str, training_scheduler_config: dict[str, Any], repo: str, num_steps: int) -> str:
    """Python that samples from the exported pipeline with plain diffusers as `uncond sample` does (for model
    cards), to the same images: image i drawn with a generator seeded i, as `uncond sample --seed 0` draws it
    (one generator for the whole batch gives other images). Through DDPMPipeline where sampler `name` fits its
    loop, else with the loop written out."""
    scheduler_class, settings = sampler_settings(name, training_scheduler_config)
    arguments = ["pipeline.scheduler.config"] + [
        f"{key}=pipeline.scheduler.betas.tolist()" if key == "trained_betas" else f"{key}={value!r}"
        for key, value in settings.items()]
    arguments_text = textwrap.fill(", ".join(arguments), width=100, initial_indent="    ",
                                   subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    setup = f"{scheduler_class.__name__}.from_config(\n{arguments_text})"
    scheduler = make_sampler(name, training_scheduler_config)
    misfit = ddpm_pipeline_misfit(scheduler)
    imports = ["import torch", f"from diffusers import DiffusionPipeline, {scheduler_class.__name__}"]
    if misfit:
        imports.append("from diffusers.utils.torch_utils import randn_tensor")
    # The folder as a Python string and as a shell word, whatever its name (a quote in it was a SyntaxError, a space
    # or a leading dash broke the command; trial 64 F1). json's string is also Python's.
    python_string = json.dumps(repo, ensure_ascii=False)
    opening = "\n".join(imports) + f"\n\npipeline = DiffusionPipeline.from_pretrained({python_string})\n"
    shell_word = shlex.quote(f"./{repo}" if repo.startswith("-") else repo)
    # The flags named: the run's preview sampler and steps need not be `uncond sample`'s defaults.
    seeds = (f"# the images of `uncond sample {shell_word} --seed 0 --sampler {name} --steps {num_steps}`:\n"
             "num_images = 16\n"
             "generators = [torch.Generator().manual_seed(i) for i in range(num_images)]\n")
    if not misfit:
        return (f"{opening}# {name} with {num_steps} steps, as uncond samples (1000 DDPM steps without it):\n"
                f"pipeline.scheduler = {setup}\n{seeds}"
                f"images = pipeline(batch_size=num_images, num_inference_steps={num_steps}, "
                "generator=generators).images\n")
    options = "".join(f", {key}=generators" if key == "generator" else f", {key}={value!r}"
                      for key, value in step_options(scheduler).items())
    why = textwrap.fill(f"{name} with {num_steps} steps, as uncond samples (DDPMPipeline's own loop {misfit})",
                        width=100, initial_indent="# ", subsequent_indent="# ")
    return f"""{opening}{why}
scheduler = {setup}
scheduler.set_timesteps({num_steps})
{seeds}unet, size = pipeline.unet, pipeline.unet.config.sample_size
sample = randn_tensor((num_images, unet.config.in_channels, size, size), generator=generators)
sample = sample * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(model_output, t, sample{options}).prev_sample
images = pipeline.numpy_to_pil((sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
"""


def ddpm_pipeline_misfit(scheduler: Any) -> str:
    """Why DDPMPipeline's loop cannot sample with `scheduler` as `uncond sample` does ('' where it can): that loop
    passes a generator to every step, and nothing else, and never scales the initial noise or the model's input."""
    options = step_options(scheduler)
    if "generator" not in options:
        return "passes a generator, which this sampler's step does not take"
    if len(options) > 1:
        return f"passes no {', '.join(key for key in options if key != 'generator')}, as uncond does"
    scheduler.set_timesteps(4, device="cpu")
    probe = torch.ones(1)
    if scheduler.init_noise_sigma != 1 or not all(
            torch.equal(scheduler.scale_model_input(probe, timestep), probe) for timestep in scheduler.timesteps):
        return "scales neither the noise nor the model's input, as this sampler needs"
    return ""


def steps_for(sampler: str, sample_steps: int, ddpm_num_inference_steps: int) -> int:
    """The seed script's --ddpm_num_inference_steps applies to ddpm; --sample_steps to the others."""
    return ddpm_num_inference_steps if sampler == "ddpm" else sample_steps


def network_evaluations(scheduler: Any, num_steps: int) -> int:
    """UNet calls per image: one per entry of the timestep list (second-order samplers repeat entries)."""
    scheduler.set_timesteps(num_steps, device="cpu")
    return len(scheduler.timesteps)


def step_options(scheduler: Any) -> dict[str, Any]:
    """Keyword arguments for `scheduler.step`: a generator slot for stochastic samplers (filled per batch), and
    for DDIM the noise estimate recomputed from the clipped x0, so that each step stays consistent with the
    clipping (docs/benchmarks.md: without it DDIM gets worse with more steps on a young model)."""
    accepted = inspect.signature(scheduler.step).parameters
    options: dict[str, Any] = {"generator": None} if "generator" in accepted else {}
    if "use_clipped_model_output" in accepted:
        options["use_clipped_model_output"] = True
    return options


class SamplingCancelled(Exception):
    """Sampling given up part way (a training run's preview, when the run is asked to stop)."""


@torch.no_grad()
def sample_batches(unet: torch.nn.Module, scheduler: Any, *, num_images: int, num_steps: int, seed: int = 0,
                   batch_size: int = 16, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, progress: bool = False,
                   indices: Sequence[int] | None = None,
                   cancelled: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
    """Sample images 0..num_images-1 (or those of `indices`), yielded batch by batch as uint8 NHWC arrays.
    Raises SamplingCancelled between two network evaluations once `cancelled()` says so."""

    config = unet.config
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    dtype = dtype or next(unet.parameters()).dtype
    size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
    shape = (config.in_channels, *size)
    step_kwargs = step_options(scheduler)
    indices = range(num_images) if indices is None else indices
    scheduler.set_timesteps(num_steps, device=device)
    # Network evaluations are the progress to show: a batch of 1,000 DDPM steps takes minutes.
    batches = math.ceil(len(indices) / batch_size)
    # "sampling 300 images in 5 batches: 40/125 steps": the steps of all the batches, the unit of progress
    in_batches = f" in {batches} batches" if batches > 1 else ""
    with progress_bar(total=batches * len(scheduler.timesteps), unit="step",
                      desc=f"sampling {counted(len(indices), 'image')}{in_batches}",
                      disable=not progress, leave=False) as bar, \
            cpu_threads.governed_threads(device, "sampling") as threads:
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            count = len(batch)
            generators = [torch.Generator("cpu").manual_seed(seed + index) for index in batch]
            if "generator" in step_kwargs:
                step_kwargs["generator"] = generators
            sample = randn_tensor((count, *shape), generator=generators, device=device, dtype=dtype)
            scheduler.set_timesteps(num_steps, device=device)
            sample = sample * scheduler.init_noise_sigma
            for timestep in scheduler.timesteps:
                if cancelled is not None and cancelled():
                    raise SamplingCancelled
                model_input = scheduler.scale_model_input(sample, timestep)
                model_output = unet(model_input, timestep).sample
                sample = scheduler.step(model_output, timestep, sample, **step_kwargs).prev_sample
                bar.update(1)
                threads.adjust()  # on a CPU, to the cores other processes leave free
            yield to_uint8(sample)


def generate(unet: torch.nn.Module, scheduler: Any, **options: Any) -> np.ndarray:
    """Sample images as one uint8 NHWC array; `options` as for `sample_batches`."""
    return np.concatenate(list(sample_batches(unet, scheduler, **options)))


def to_uint8(sample: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1] NCHW -> uint8 NHWC, rounded as DDPMPipeline + numpy_to_pil round."""
    pixels = (sample.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    """One HWC uint8 array -> a PIL image, grayscale for one channel."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def write_whole(image: Image.Image, path: Path) -> None:
    """Written under another name and renamed, so an interrupted run (or a full disk) leaves no half-written image,
    and the earlier one whole."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        image.save(partial, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
        os.replace(partial, path)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)  # Pillow's failed write names no file: cli's message names this one
        raise


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile NHWC uint8 images into one picture, about square, with a thin white border."""
    count, height, width, channels = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, channels), 255,
                   dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        grid[top:top + height, left:left + width] = image
    return to_pil(grid)


# ------------------------------------------------------------------------------------------ uncond sample


@dataclass
class Model:
    """A UNet to sample from, with the noise schedule it was trained with."""
    unet: Any
    scheduler_config: dict[str, Any]
    description: str


def pick_device(name: str) -> torch.device:
    """--device: `auto` is the first GPU (CUDA, then Apple's MPS), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def load_model(name_or_path: str, device: torch.device, dtype: torch.dtype) -> Model:
    """The UNet and noise schedule of a diffusers pipeline folder (uncond's export, DDPMPipeline,
    DDIMPipeline), Hub id, or training checkpoint of uncond's. Weights load as safetensors, or .bin with
    weights_only (diffusers' loader); no remote code runs."""
    from diffusers import DiffusionPipeline, UNet2DModel

    path = Path(name_or_path).expanduser()
    if path.exists():  # (a Hub id is no path)
        check_utf8_path("", name_or_path)
    if is_checkpoint(path) and has_noise_schedule(path):
        return checkpoint_as_model(path, name_or_path, device, dtype)
    weights = absolute(path)  # `.` inside checkpoint-N/unet
    if is_checkpoint_weights(path) and has_noise_schedule(weights.parent):
        return checkpoint_as_model(weights.parent, name_or_path, device, dtype, weights=weights.name)
    if path.exists():
        if not (path / "model_index.json").is_file():
            refuse_unexported_run(path, name_or_path)
            raise UsageError(f"{name_or_path}: not a diffusers pipeline folder (no model_index.json)"
                             f"{not_a_pipeline_hint(path)}")
        where = f"the pipeline folder {path}"
    elif (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or name_or_path.endswith("/")
          or Path(name_or_path).parent.is_dir()):  # runs/exp1 with runs/ here: a mistyped folder, not owner/name
        raise UsageError(f"{name_or_path}: no such folder ({missing_checkpoint_hint(path)})")
    else:
        where = f"the Hub model {name_or_path}"
    pickled = pickled_unet_weights(path)
    try:
        with remote.quiet_hub_clients():
            # A Hub model's files first (a download can be stopped at any time), then its weights are read from the
            # local copy with a stop held: one raised inside safetensors came out as its error, "could not load"
            local = path if path.exists() else Path(DiffusionPipeline.download(name_or_path))
            with signals.deferred():
                pipeline = DiffusionPipeline.from_pretrained(str(local), dtype=dtype)
    except Exception as error:  # noqa: BLE001 - offline, missing, private or malformed: one line with the reason
        if pickled:
            raise UsageError(f"{name_or_path}: could not load {where}: its UNet's weights, {pickled}, are pickled and "
                             "hold more than tensors, or are damaged (uncond reads pickled weights as tensors only: no "
                             "code in them runs); save the model with safetensors, save_pretrained's default "
                             f"({remote.load_failure(error)})") from None
        raise UsageError(f"{name_or_path}: could not load {where} ({remote.load_failure(error)})") from None
    if pickled:
        logger.info(f"{name_or_path}: the UNet's weights are the pickled {pickled}, read as tensors only "
                    "(torch.load's weights_only: no code in it runs)")
    unet, scheduler = getattr(pipeline, "unet", None), getattr(pipeline, "scheduler", None)
    if not isinstance(unet, UNet2DModel) or scheduler is None or getattr(pipeline, "vqvae", None) is not None:
        raise UsageError(f"{name_or_path} is a {type(pipeline).__name__}; uncond samples unconditional pixel-space "
                         "UNet2DModel pipelines (DDPMPipeline, DDIMPipeline)")
    return Model(unet.to(device).eval(), dict(scheduler.config),
                 f"{where} ({type(pipeline).__name__}{trained_steps(path)})")


def trained_steps(folder: Path) -> str:
    """', trained N steps' for a pipeline uncond exported (its training_state.json), else '': a live run's export
    changes as it trains."""
    try:
        step = json.loads((folder / STATE_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return ""
    return f", trained {counted(step, 'step')}" if isinstance(step, int) else ""


CHECKPOINT_WEIGHTS = ("unet", "unet_ema")  # the folders of a checkpoint's trained and averaged weights


def pickled_unet_weights(path: Path) -> str | None:
    """A local pipeline's UNet weights file when it is a pickled .bin and no safetensors file is beside it."""
    unet = path / "unet"
    if not unet.is_dir() or any(unet.glob("*.safetensors")):
        return None
    return next((f"unet/{file.name}" for file in sorted(unet.glob("*.bin"))), None)


def checkpoint_as_model(path: Path, name: str, device: torch.device, dtype: torch.dtype,
                        weights: str | None = None) -> Model:
    """A training checkpoint as a model: its EMA weights where the run kept an EMA (what its exports hold), else
    its trained ones, or the `weights` folder named (unet, unet_ema), with the noise schedule of its
    training_config.json (uncond's) or of its run's pipeline (train_unconditional.py's, seed_run_schedule). Any
    checkpoint of uncond's can so be sampled and evaluated, also of a run stopped before its first export."""
    from diffusers import UNet2DModel

    settings: dict[str, Any] = {}  # train_unconditional.py's checkpoints record none
    if not (path / RUN_CONFIG_FILE).is_file():
        scheduler_config = seed_run_schedule(path)
    else:
        try:
            settings = json.loads((path / RUN_CONFIG_FILE).read_text())
            scheduler_config = dict(training_noise_scheduler(settings).config)
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(f"{name}: its {RUN_CONFIG_FILE} does not give the noise schedule "
                             f"({first_line(error)})") from None
    # (a unet_ema/ gone since is then said by check_unchanged: the trained weights were sampled instead)
    weights = weights or ("unet_ema" if kept_ema(path, settings) else "unet")
    # (the state is read for the EMA's share in the model of the step: unet/ alone needs none of it)
    check_unchanged(path, name, (RUN_CONFIG_FILE, f"{weights}/", *([STATE_FILE] if weights == "unet_ema" else [])))
    ema_share = pending_ema_share(path) if weights == "unet_ema" else 1.0
    unet = load_checkpoint_unet(path, weights, name, dtype if ema_share == 1.0 else torch.float32)
    if ema_share < 1.0:  # as the run's export of this step holds it (models.ema_weights), blended in float32
        check_unchanged(path, name, ("unet/",), " (the model of its step blends them into its unet_ema/)")
        trained = load_checkpoint_unet(path, "unet", name, torch.float32)
        with torch.no_grad():
            for average, parameter in zip(unet.parameters(), trained.parameters()):
                average.copy_(parameter.lerp_(average, ema_share))
        with remote.quiet_hub_clients():  # diffusers' note on casting (no module of this UNet stays in float32)
            unet = unet.to(dtype)
    unet_settings = set(inspect.signature(UNet2DModel.__init__).parameters)
    if any(key not in unet_settings and not key.startswith("_") for key in unet.config):
        # The EMA's own settings (decay, optimization_step...) stay in the config of the UNet loaded from its
        # folder, and an export would write them out for every load of it to warn about: a UNet of the UNet's
        # settings alone takes its weights.
        with remote.quiet_hub_clients():  # diffusers' note on casting (no module of this UNet stays in float32)
            clean = UNet2DModel.from_config({key: value for key, value in unet.config.items() if key in unet_settings})
            clean.load_state_dict(unet.state_dict())
            unet = clean.to(dtype)
    kind = "EMA" if weights == "unet_ema" else "trained"
    return Model(unet.to(device).eval(), scheduler_config, f"the checkpoint {path} ({kind} weights)")


def kept_ema(path: Path, settings: dict[str, Any]) -> bool:
    """Whether the run that wrote checkpoint `path`, with `settings` (its training_config.json's), kept an EMA of
    the weights (train_unconditional.py's checkpoints record no settings and say it by their unet_ema/ alone)."""
    return settings.get("use_ema", (path / "unet_ema").is_dir())


def check_unchanged(path: Path, name: str, under: tuple[str, ...], why: str = "") -> None:
    """Refuse checkpoint `path` where a file it lists under `under` is gone or changed since it was written: bytes
    damaged in place loaded as NaN weights, and sampling wrote black images without a word (trial 60 F5)."""
    changed = manifest.changed_file(path, under)
    if changed == manifest.MANIFEST_FILE:
        raise UsageError(f"{name}: the checkpoint's {changed} cannot be read; use another checkpoint")
    if changed:
        raise UsageError(f"{name}: the checkpoint's {changed}{why} is missing or differs from its "
                         f"{manifest.MANIFEST_FILE} (damaged or changed since it was written); use another checkpoint")


def load_checkpoint_unet(path: Path, weights: str, name: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DModel

    if not (path / weights / "config.json").is_file():  # (diffusers would say it could not reach the Hub)
        raise UsageError(f"{name}: the checkpoint's {weights}/ has no config.json; use another checkpoint")
    try:
        # (the EMA's own settings in its config.json are ignored with a warning; signals: as in load_model)
        with remote.quiet_hub_clients(), signals.deferred():
            return UNet2DModel.from_pretrained(str(path / weights), torch_dtype=dtype)  # safetensors
    except (OSError, ValueError) as error:
        raise UsageError(f"{name}: could not load the checkpoint's {weights}/ ({first_line(error)})") from None


def pending_ema_share(checkpoint: Path) -> float:
    """The share of checkpoint `checkpoint`'s unet_ema/ in the model of its step (its training_state.json's, from
    a run with --ema_update_every N at a step the EMA was not updated at), the trained weights of its unet/ the
    rest; 1 where the EMA is the model (updated every step, at this step, or a checkpoint that does not say)."""
    try:
        share = json.loads((checkpoint / STATE_FILE).read_text()).get(EMA_SHARE_KEY, 1.0)
    except (OSError, ValueError, AttributeError):
        return 1.0
    return float(share) if isinstance(share, (int, float)) and 0.0 <= share < 1.0 else 1.0


def has_noise_schedule(checkpoint: Path) -> bool:
    """Whether the noise schedule of training checkpoint `checkpoint` is known (checkpoint_as_model)."""
    return (checkpoint / RUN_CONFIG_FILE).is_file() or seed_run_schedule(checkpoint) is not None


def seed_run_schedule(checkpoint: Path) -> dict[str, Any] | None:
    """The noise schedule of a train_unconditional.py checkpoint, which records none: that of the pipeline the
    script exports into its output folder, the checkpoint's parent, at the end of each --save_model_epochs
    epoch from the first on (the same noise_scheduler object it trains with). None before the first export."""
    run = checkpoint.resolve().parent  # `.` in the checkpoint, or a link to it
    scheduler_file = run / "scheduler" / "scheduler_config.json"
    if not (run / "model_index.json").is_file() or not scheduler_file.is_file():
        return None
    try:
        config = json.loads(scheduler_file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "num_train_timesteps" in config else None


def unexported_run(path: Path) -> str | None:
    """What shows `path` to be a training run's output folder without an exported pipeline yet: its newest
    checkpoint-N, or its training_config.json before the first checkpoint; None for any other path."""
    if not path.is_dir() or (path / "model_index.json").is_file() or is_checkpoint(path):
        return None
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1][1].name
    return RUN_CONFIG_FILE if (path / RUN_CONFIG_FILE).is_file() else None


def refuse_unexported_run(path: Path, name: str, instead: str = "") -> None:
    """A run's output folder is no pipeline until its first export: its samples/ and loss.png are no model's images."""
    found = unexported_run(path)
    if found:
        checkpoint = f"pass its checkpoint ({path / found}), or " if found != RUN_CONFIG_FILE else ""
        raise UsageError(f"{name}: a training run that has not exported a pipeline yet (it has {found}, no "
                         "model_index.json; training exports it every --save_model_epochs epochs and at the end): "
                         f"{checkpoint}wait for the export{instead}")


def is_checkpoint(path: Path) -> bool:
    """Whether folder `path` is a training checkpoint, uncond's or train_unconditional.py's: the UNet (and its EMA
    copy) without the model_index.json of a pipeline folder (uncond's also hold training_config.json)."""
    return ((path / "unet_ema").is_dir() or (path / "unet").is_dir()) and not (path / "model_index.json").is_file()


def holds_model(path: Path) -> bool:
    """Whether folder `path` is a model to sample (a pipeline, a checkpoint or one of its sets of weights), not a
    folder of images."""
    return (path / "model_index.json").is_file() or is_checkpoint(path) or is_checkpoint_weights(path)


def is_checkpoint_weights(path: Path) -> bool:
    """Whether `path` is one of a training checkpoint's two sets of weights: unet/ is the trained one, without EMA,
    unet_ema/ the EMA's (a run folder's unet/ is its export's, which holds the EMA weights where the run kept them)."""
    path = absolute(path)  # `.` inside it
    return path.name in CHECKPOINT_WEIGHTS and path.is_dir() and is_checkpoint(path.parent)


def absolute(path: Path) -> Path:
    """`path` from the root, `.` and `..` taken away as the shell takes them (a link is not followed)."""
    return Path(os.path.abspath(path))


def missing_checkpoint_hint(path: Path) -> str:
    """What a run folder holds instead of a checkpoint that is not there (--checkpoints_total_limit removes the
    oldest ones); for other missing paths, the form of a Hub model id."""
    checkpoints = list_checkpoints(path.parent)  # none where the parent is not a folder
    if path.name == "latest" and checkpoints:  # as `uncond train --resume_from_checkpoint latest` says it
        return f"`latest` names a checkpoint for `uncond train` only; pass {checkpoints[-1][1]}"
    if not CHECKPOINT_NAME.match(path.name) or not path.parent.is_dir():
        return "a Hub model id has the form owner/name"
    held = ", ".join(found.name for _, found in checkpoints) or "no checkpoints"
    pipeline = "; its exported pipeline is the folder itself" if (path.parent / "model_index.json").is_file() else ""
    return (f"{path.parent} holds {held}{pipeline}; --checkpoints_total_limit removes a run's oldest checkpoints "
            "as it saves new ones")


def not_a_pipeline_hint(path: Path) -> str:
    """What to pass instead of a path that exists but is not a pipeline folder, where that can be told."""
    if is_checkpoint(path):  # train_unconditional.py's, before its run exported a pipeline beside it
        return (" (a train_unconditional.py checkpoint, which does not record its noise schedule, and its run's "
                f"folder {path.resolve().parent} holds no pipeline that would; resume it with "
                f"`uncond train --resume_from_checkpoint {path}` and the run's flags to export a pipeline)")
    if (path.parent / "model_index.json").is_file():
        return (f" (it is {'a file' if path.is_file() else 'a component folder'} of the pipeline folder "
                f"{path.parent}; pass that folder)")
    if is_checkpoint(path.parent) and has_noise_schedule(path.parent):
        return (f" (it is a folder of the checkpoint {path.parent}; pass that folder, or its unet/ for the weights "
                "without EMA)")
    return ""


def numbered_name(index: int) -> str:
    return f"{index:06d}.png"


def is_numbered_image(path: Path) -> bool:
    """Whether `path` is named as `uncond sample` names its images."""
    return re.fullmatch(r"\d{6,}\.png", path.name) is not None


def open_for_sampling(settings: SamplingSettings, model_name: str) -> tuple[Model, Any, int]:
    """The model, its sampler and the step count, as `settings` say; all checks before any sampling."""
    device = pick_device(settings.device)
    dtype = getattr(torch, settings.dtype)
    if device.type == "cpu" and dtype == torch.float16:  # measured 20x slower than float32 on a 2-core CPU
        logger.warning("--dtype float16 on a CPU is emulated and slow; float32 (or bfloat16) is faster there")
    model = load_model(model_name, device, dtype)
    channels = model.unet.config.in_channels
    if model.unet.config.out_channels != channels:  # the samplers step on outputs shaped as the sample
        raise UsageError(f"{model_name}: its UNet outputs {model.unet.config.out_channels} channels for "
                         f"{channels} (a learned variance, as improved DDPM's); uncond samples models that predict "
                         "their images' own channels (noise, images or v), as it trains them")
    steps = settings.steps or min(steps_for(settings.sampler, DEFAULT_STEPS, DDPM_STEPS),
                                  model.scheduler_config.get("num_train_timesteps", TRAIN_TIMESTEPS))
    check_sampler_fits(settings.sampler, model.scheduler_config, steps)
    scheduler = make_sampler(settings.sampler, model.scheduler_config)
    if settings.sampler == "ddpm":
        warn_of_a_late_start(scheduler, steps)
    return model, scheduler, steps


def warn_of_a_late_start(scheduler: Any, steps: int, steps_flag: str = "--steps") -> None:
    """ddpm keeps DDPMPipeline's "leading" timesteps (so it draws what diffusers' own pipeline does), which
    with fewer steps than were trained start below the last timestep: 1 step starts (and ends) at 0, leaving
    the noise as it was drawn. Said where the start takes the noise to hold noticeably more of the image than
    the last timestep does (more than half a percent: 10 steps or fewer of the linear schedule)."""
    scheduler.set_timesteps(steps, device="cpu")
    first, last = int(scheduler.timesteps[0]), scheduler.config.num_train_timesteps - 1
    signal = scheduler.alphas_cumprod.sqrt()  # the share of the clean image in a noisy one at each timestep
    if signal[first] - signal[last] > 0.005:
        logger.warning(f"ddpm with {counted(steps, 'step')} starts at timestep {first}, not at {last} (diffusers' "
                       f"DDPMPipeline spaces them so), taking the noise to hold {signal[first]:.1%} of the image: "
                       f"its images stay noisy; give it {steps_flag} {last + 1}, or use a fast sampler (the default, "
                       "sde-dpmsolver++)")


def log_sampling(settings: SamplingSettings, model: Model, steps: int) -> None:
    """The line that starts a sampling: said once its checks have passed."""
    logger.info(f"sampling {counted(settings.num_images, 'image')} from {model.description} on {model.unet.device} "
                f"({settings.dtype}) with {settings.sampler}, {steps} steps, seed {settings.seed}")


def sampling_options(settings: SamplingSettings, steps: int) -> dict[str, Any]:
    """`sample_batches` keyword arguments from the shared sampling settings."""
    return {"num_images": settings.num_images, "num_steps": steps, "seed": settings.seed,
            "batch_size": settings.batch_size, "progress": True}
