"""Generating images from a UNet with any of diffusers' samplers, deterministically per image.

Image i of a run with seed s always starts from the same noise (and draws the same noise at every
stochastic step), whatever the batch size, because every image has its own generator seeded s + i.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                       HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .config import UsageError

# name -> (scheduler class, settings on top of the training schedule's config)
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


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise UsageError(f"--sampler {name}: unknown; choose one of {', '.join(SAMPLERS)}")


def make_sampler(name: str, training_scheduler_config: dict[str, Any]) -> Any:
    """A sampling scheduler for a model trained with `training_scheduler_config` (betas, prediction type).

    Few-step samplers use "trailing" timestep spacing so the first step starts from the last training
    timestep (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", table 2).
    """
    check_sampler(name)
    scheduler_class, settings = SAMPLERS[name]
    settings = dict(settings)
    if name != "ddpm":
        settings["timestep_spacing"] = "trailing"
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if training_scheduler_config.get("clip_sample") and "thresholding" in accepted:
        # DDPM clips its x0 estimate to the data range; solvers in x0 space do the same through
        # thresholding, whose bound at sample_max_value = 1 is plain clipping. Without it, an
        # undertrained model's overshooting x0 estimates show as speckles in few-step samples.
        settings.update(thresholding=True, sample_max_value=training_scheduler_config.get("clip_sample_range", 1.0))
    return scheduler_class.from_config(dict(training_scheduler_config), **settings)


def steps_for(sampler: str, sample_steps: int, ddpm_num_inference_steps: int) -> int:
    """The seed script's --ddpm_num_inference_steps applies to ddpm; --sample_steps to the others."""
    return ddpm_num_inference_steps if sampler == "ddpm" else sample_steps


@torch.no_grad()
def generate(unet: torch.nn.Module, scheduler: Any, *, num_images: int, num_steps: int, seed: int = 0,
             batch_size: int = 16, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None, progress: bool = False) -> np.ndarray:
    """Sample `num_images` images as uint8 NHWC arrays."""
    from tqdm.auto import tqdm

    config = unet.config
    device = torch.device(device) if device is not None else next(unet.parameters()).device
    dtype = dtype or next(unet.parameters()).dtype
    size = config.sample_size if isinstance(config.sample_size, (tuple, list)) else (config.sample_size,) * 2
    shape = (config.in_channels, *size)
    # Stochastic samplers draw fresh noise each step; deterministic ones take no generator.
    step_kwargs = {"generator": None} if "generator" in inspect.signature(scheduler.step).parameters else {}
    images = []
    with tqdm(total=num_images, desc="sampling", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, num_images, batch_size):
            count = min(batch_size, num_images - start)
            generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
            if step_kwargs:
                step_kwargs["generator"] = generators
            sample = randn_tensor((count, *shape), generator=generators, device=device, dtype=dtype)
            scheduler.set_timesteps(num_steps, device=device)
            sample = sample * scheduler.init_noise_sigma
            for timestep in scheduler.timesteps:
                model_input = scheduler.scale_model_input(sample, timestep)
                model_output = unet(model_input, timestep).sample
                sample = scheduler.step(model_output, timestep, sample, **step_kwargs).prev_sample
            images.append(to_uint8(sample))
            bar.update(count)
    return np.concatenate(images)


def to_uint8(sample: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1] NCHW -> uint8 NHWC, rounded as DDPMPipeline + numpy_to_pil round."""
    pixels = (sample.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    """One HWC uint8 array -> a PIL image, grayscale for one channel."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


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
