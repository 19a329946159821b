"""Speed never changes the math: the fast training step against a plain one written from the DDPM objective."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from conftest import TINY_UNET
from uncond.config import TrainConfig
from uncond.models import make_ema
from uncond.objective import Objective, training_loss


def reference_step(unet, alphas_cumprod, clean_images, noise, timesteps):
    """L = E || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2 (Ho et al. 2020, eq. 14)."""
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * clean_images + (1 - abar).sqrt() * noise
    loss = ((unet(noisy, timesteps).sample - noise) ** 2).mean()
    loss.backward()
    return loss


@pytest.fixture
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(**{k: v for k, v in TINY_UNET.items() if not k.startswith("_")})


def test_fast_step_equals_the_reference_step(unet):
    schedule = DDPMScheduler(num_train_timesteps=1000)
    clean_images = torch.rand(8, 3, 16, 16) * 2 - 1
    config = TrainConfig(dataset_name="x", use_ema=True, learning_rate=1e-3)

    # fast: channels-last weights and inputs, noise from the step's generator, fused AdamW, foreach EMA
    fast = copy.deepcopy(unet).to(memory_format=torch.channels_last)
    fast_ema = make_ema(fast, config)
    fast_optimizer = torch.optim.AdamW(fast.parameters(), lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(123)
    fast_loss = training_loss(fast, schedule, clean_images.contiguous(memory_format=torch.channels_last),
                              Objective("epsilon"), generator)
    fast_loss.backward()

    # reference: the same noise and timesteps, drawn in the same order from the same seed
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(clean_images.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    reference = copy.deepcopy(unet)
    reference_ema = EMAModel(reference.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                             inv_gamma=config.ema_inv_gamma, power=config.ema_power)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    reference_loss = reference_step(reference, schedule.alphas_cumprod, clean_images, noise, timesteps)

    torch.testing.assert_close(fast_loss, reference_loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)

    # The update kernels on identical gradients (Adam divides by |g|, so tiny gradient noise would show).
    for a, b in zip(fast.parameters(), reference.parameters()):
        a.grad = b.grad.clone().contiguous(memory_format=torch.channels_last) if a.dim() == 4 else b.grad.clone()
    for model, optimizer, ema in ((fast, fast_optimizer, fast_ema), (reference, reference_optimizer, reference_ema)):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())
        ema.step(model.parameters())  # a second update, where the decay is no longer 0
    for a, b in zip(fast.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_ema.shadow_params, reference_ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sparse_ema_spans_the_same_horizon(unet):
    """Updating every 4 steps with decay d^4 tracks per-step updates of a slowly moving model."""
    every_step = make_ema(unet, TrainConfig(dataset_name="x", ema_max_decay=0.99))
    every_fourth = make_ema(unet, TrainConfig(dataset_name="x", ema_max_decay=0.99, ema_update_every=4))
    weights = list(unet.parameters())
    with torch.no_grad():
        for step in range(1, 401):
            for weight in weights:
                weight.add_(0.001)  # the model drifts steadily
            every_step.step(weights)
            if step % 4 == 0:
                every_fourth.step(weights)
    lag_every = (weights[0] - every_step.shadow_params[0]).mean().item()
    lag_fourth = (weights[0] - every_fourth.shadow_params[0]).mean().item()
    assert lag_every == pytest.approx(lag_fourth, rel=0.05)  # same lag: same horizon
    assert 0.05 < lag_every < 0.2  # about 0.001 * d / (1 - d) = 0.099


def test_adamw_is_fused_on_cpus_unless_turned_off(unet):
    """torch's per-tensor default on CPUs took three times as long a step (benchmarks/step_ops.py)."""
    from uncond.parts import make_optimizer

    optimizer, fused = make_optimizer(unet, TrainConfig(dataset_name="x"), torch.device("cpu"))
    assert fused and optimizer.defaults["fused"]
    optimizer, fused = make_optimizer(unet, TrainConfig(dataset_name="x", fused_adamw=False), torch.device("cpu"))
    assert not fused and not optimizer.defaults["fused"]
