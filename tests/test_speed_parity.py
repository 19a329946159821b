"""Speed never changes the math: the fast training step against a plain one written from the DDPM objective."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from conftest import TINY_UNET
from uncond.config import TrainConfig
from uncond.models import ema_weights, make_ema
from uncond.objective import Objective, training_loss


def reference_step(unet, alphas_cumprod, clean_images, noise, timesteps, share=1.0):
    """L = E || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t) ||^2 (Ho et al. 2020, eq. 14), times
    `share` (the micro-batch's part of the step's images); its gradients added to .grad; returns it."""
    abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * clean_images + (1 - abar).sqrt() * noise
    loss = ((unet(noisy, timesteps).sample - noise) ** 2).mean() * share
    loss.backward()
    return loss.detach()


def diffusers_ema(parameters, config):
    """diffusers' own EMA, with the run's settings."""
    return EMAModel(parameters, decay=config.ema_max_decay, use_ema_warmup=True, inv_gamma=config.ema_inv_gamma,
                    power=config.ema_power)


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
    reference_ema = diffusers_ema(reference.parameters(), config)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    reference_loss = reference_step(reference, schedule.alphas_cumprod, clean_images, noise, timesteps)

    torch.testing.assert_close(fast_loss, reference_loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)

    # The update kernels on identical gradients (Adam divides by |g|, so tiny gradient noise would show).
    gradients = [b.grad.clone() for b in reference.parameters()]
    for model, optimizer, ema in ((fast, fast_optimizer, fast_ema), (reference, reference_optimizer, reference_ema)):
        for _ in range(3):  # the EMA's warm-up decay is 0, then 0.41 and 0.56: the weights move between updates
            for parameter, gradient in zip(model.parameters(), gradients):
                layout = torch.channels_last if model is fast and parameter.dim() == 4 else torch.contiguous_format
                parameter.grad = gradient.clone().contiguous(memory_format=layout)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            ema.step(model.parameters())
    for a, b in zip(fast.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_ema.shadow_params, reference_ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [(a - b).abs().max() for a, b in zip(fast.parameters(), fast_ema.shadow_params)]
    assert max(moved) > 1e-4  # the average lags the weights: a decay that matters was compared


@pytest.mark.parametrize("batch_size, accumulation", [(2, 2), (5, 3)])
def test_training_step_of_a_run_follows_the_objective(color_folder, tiny_unet, tmp_path, monkeypatch, batch_size,
                                                      accumulation):
    """train.train_step as `uncond train` runs it (micro-batches accumulated, clipping, fused AdamW, the EMA)
    against the plain DDPM step over the step's images: loss, gradient norm, gradients, weights and average. A
    scale in the step (the loss of a micro-batch over the wrong count) changes neither Adam's first update nor
    clipped gradients: the loss and the norm before clipping are compared. With 12 images, 5 x 3 is one step
    of 5, 5 and 2 images, which weighed the 2 as much as each 5 (trial 52 F3)."""
    from conftest import reset_accelerate
    from uncond import parts, train
    from uncond.plan import plan_run

    reset_accelerate()
    config = TrainConfig(train_data_dir=str(color_folder), output_dir=str(tmp_path / "run"),
                         model_config_name_or_path=str(tiny_unet), resolution=16, train_batch_size=batch_size,
                         gradient_accumulation_steps=accumulation, use_ema=True, lr_scheduler="constant",
                         lr_warmup_steps=0, learning_rate=1e-3, max_grad_norm=1.0, logger="none", seed=0,
                         max_train_steps=10, cache_dir=str(tmp_path / "cache"))
    plan = plan_run(config, explicit={"resolution"})
    (tmp_path / "run").mkdir()
    run = parts.build_run(plan, parts.make_accelerator(plan.config, tmp_path / "run"))
    assert run.optimizer.defaults["fused"]
    reference = copy.deepcopy(run.accelerator.unwrap_model(run.unet)).to(memory_format=torch.contiguous_format)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, betas=(config.adam_beta1,
                                            config.adam_beta2), weight_decay=config.adam_weight_decay,
                                            eps=config.adam_epsilon)
    reference_ema = diffusers_ema(reference.parameters(), config)
    seen = {}
    optimizer_step = run.optimizer.step

    def seeing_the_gradients(*args, **kwargs):  # what the step hands the optimizer
        seen["gradients"] = [parameter.grad.clone() for parameter in run.parameters]
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(run.optimizer, "step", seeing_the_gradients)
    for micro_batches in list(train.optimizer_steps(run))[:3]:
        losses, images = [], sum(len(clean_images) for clean_images in micro_batches)
        assert sorted({len(clean_images) for clean_images in micro_batches}) == ([2] if batch_size == 2 else [2, 5])
        for i, clean_images in enumerate(micro_batches):  # the noise and timesteps the step draws
            _, noise, timesteps = train.batch_inputs(run, clean_images, i)
            losses.append(reference_step(reference, run.noise_scheduler.alphas_cumprod, clean_images, noise,
                                         timesteps, share=len(clean_images) / images))
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)

        loss = train.train_step(run, micro_batches)
        torch.testing.assert_close(loss, torch.stack(losses).sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run.running_grad_norm.pop(), norm, rtol=1e-4, atol=1e-6)
        for gradient, parameter in zip(seen["gradients"], reference.parameters()):
            torch.testing.assert_close(gradient, parameter.grad, rtol=1e-4, atol=1e-6)
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        reference_ema.step(reference.parameters())
        run.step += 1
        # Adam divides by |g|: where a gradient is near 0, float rounding of the gradients moves its update by a
        # percent of the learning rate (1e-3); a wrong rate, direction or missed update is off by all of it
        for a, b in zip(run.parameters, reference.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=5e-5)
        for a, b in zip(run.ema.shadow_params, reference_ema.shadow_params):
            torch.testing.assert_close(a, b, rtol=0, atol=5e-5)
    assert norm > 1  # clipping was at work


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


def test_sparse_ema_keeps_what_per_step_updates_keep(unet):
    """--ema_update_every 4 applied d^4 of the update's own step: a sixth of the random initial weights stayed in
    the average after its first update (per-step updates keep none: the first decay is 0), and a later update kept
    more of the old average than four per-step updates. Where the weights move only at updates, the two agree."""
    every_step = make_ema(unet, TrainConfig(dataset_name="x", ema_max_decay=0.999))
    every_fourth = make_ema(unet, TrainConfig(dataset_name="x", ema_max_decay=0.999, ema_update_every=4))
    weights = list(unet.parameters())
    with torch.no_grad():
        for step in range(1, 13):
            if step % 4 == 1:  # the weights move at the first step after each update, then stay
                for weight in weights:
                    weight.add_(1.0)
            every_step.step(weights)
            if step % 4 == 0:
                every_fourth.step(weights)
                if step == 4:  # the first update: the initial weights are gone, as with per-step updates
                    torch.testing.assert_close(every_fourth.shadow_params[0], weights[0], rtol=0, atol=0)
    for a, b in zip(every_step.shadow_params, every_fourth.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert (weights[0] - every_step.shadow_params[0]).abs().min() > 0.1  # the average lags: a real comparison

    with torch.no_grad():  # two steps after the last update: the weights used (grids, the export) are of step 14
        for weight in weights:
            weight.add_(1.0)
        for _ in range(2):
            every_step.step(weights)
    trained = [weight.detach().clone() for weight in weights]
    with ema_weights(unet, every_fourth, step=14):
        for a, b in zip(unet.parameters(), every_step.shadow_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), trained))  # and back afterwards


def test_adamw_is_fused_on_cpus_unless_turned_off(unet):
    """torch's per-tensor default on CPUs took three times as long a step (benchmarks/step_ops.py)."""
    from uncond.parts import make_optimizer

    optimizer, fused = make_optimizer(unet, TrainConfig(dataset_name="x"), torch.device("cpu"))
    assert fused and optimizer.defaults["fused"]
    optimizer, fused = make_optimizer(unet, TrainConfig(dataset_name="x", fused_adamw=False), torch.device("cpu"))
    assert not fused and not optimizer.defaults["fused"]
