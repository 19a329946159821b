"""The DDPM training objective (Ho et al. 2020), separate from the network: noise, timesteps,
prediction targets and loss weighting, as pure functions of tensors and the noise schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


@dataclass(frozen=True)
class Objective:
    prediction_type: str = "epsilon"  # epsilon | sample | v_prediction
    snr_gamma: float | None = None  # min-SNR-gamma weighting (Hang et al. 2023); None: the seed's weighting
    noise_offset: float | None = None  # offset noise (Guttenberg 2023): a per-image, per-channel constant shift


def sample_noise(clean_images: torch.Tensor, noise_offset: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise like the images; with an offset, plus noise_offset * N(0, 1) per image and channel."""
    noise = torch.randn(clean_images.shape, generator=generator, device=clean_images.device,
                        dtype=clean_images.dtype)
    if noise_offset:
        batch, channels = clean_images.shape[:2]
        noise = noise + noise_offset * torch.randn((batch, channels, 1, 1), generator=generator,
                                                   device=clean_images.device, dtype=clean_images.dtype)
    return noise


def sample_timesteps(batch_size: int, num_train_timesteps: int, device: torch.device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Timesteps drawn uniformly from [0, T)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def sample_noise_and_timesteps(clean_images: torch.Tensor, objective: Objective, noise_scheduler: DDPMScheduler,
                               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's noise and timesteps, drawn in that order from `generator`: the training loop's draws, which a
    resumed run repeats from the step's seed."""
    noise = sample_noise(clean_images, objective.noise_offset, generator)
    timesteps = sample_timesteps(clean_images.shape[0], noise_scheduler.config.num_train_timesteps,
                                 clean_images.device, generator)
    return noise, timesteps


def prediction_target(prediction_type: str, clean_images: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor, noise_scheduler: DDPMScheduler) -> torch.Tensor:
    """What the network learns to output: the noise (epsilon), the clean image (sample), or
    v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean_images
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean_images, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def loss_weights(objective: Objective, noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor | None:
    """Per-image loss weights, or None for a plain mean squared error.

    With snr_gamma, min-SNR-gamma (Hang et al. 2023, eq. 9 rewritten per target): the x0 loss weighted by
    min(SNR, gamma), which is min(SNR, gamma) / SNR on the epsilon loss and min(SNR, gamma) / (SNR + 1)
    on the v loss. Without it, train_unconditional.py's choice: SNR weighting for x0 prediction only.
    """
    if objective.snr_gamma is None and objective.prediction_type != "sample":
        return None
    snr = compute_snr(noise_scheduler, timesteps)
    if objective.snr_gamma is None:
        return snr
    clipped = torch.clamp(snr, max=objective.snr_gamma)
    if objective.prediction_type == "epsilon":
        return clipped / snr
    if objective.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in float32, optionally weighted per image."""
    if weights is None:
        return F.mse_loss(model_output.float(), target.float())
    per_image = F.mse_loss(model_output.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (weights.float() * per_image).mean()


def training_loss(unet: torch.nn.Module, noise_scheduler: DDPMScheduler, clean_images: torch.Tensor,
                  objective: Objective, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Monte-Carlo estimate of the objective on a batch: draw noise and timesteps, then `denoising_loss`."""
    noise, timesteps = sample_noise_and_timesteps(clean_images, objective, noise_scheduler, generator)
    return denoising_loss(unet, noise_scheduler, clean_images, noise, timesteps, objective)


def denoising_loss(unet: torch.nn.Module, noise_scheduler: DDPMScheduler, clean_images: torch.Tensor,
                   noise: torch.Tensor, timesteps: torch.Tensor, objective: Objective) -> torch.Tensor:
    """The loss for given noise and timesteps: noise the images (the forward process,
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)), predict, and compare.
    A mean over the batch, so equal shards on several processes average to the whole batch's loss."""
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    model_output = unet(noisy_images, timesteps).sample
    target = prediction_target(objective.prediction_type, clean_images, noise, timesteps, noise_scheduler)
    return diffusion_loss(model_output, target, loss_weights(objective, noise_scheduler, timesteps))
