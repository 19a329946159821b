"""The objective against the formulas it implements."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from uncond.objective import Objective, diffusion_loss, loss_weights, prediction_target, sample_noise, training_loss


@pytest.fixture
def schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000)


def test_v_target_is_the_velocity(schedule):
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    alpha_bar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    torch.testing.assert_close(prediction_target("v_prediction", x0, noise, t, schedule), expected)
    assert prediction_target("epsilon", x0, noise, t, schedule) is noise
    assert prediction_target("sample", x0, noise, t, schedule) is x0


@pytest.mark.parametrize("prediction_type, weight", [
    ("epsilon", lambda snr, g: torch.minimum(snr, torch.tensor(g)) / snr),
    ("v_prediction", lambda snr, g: torch.minimum(snr, torch.tensor(g)) / (snr + 1)),
    ("sample", lambda snr, g: torch.minimum(snr, torch.tensor(g))),
])
def test_min_snr_weights(schedule, prediction_type, weight):
    t = torch.tensor([1, 100, 400, 999])
    alpha_bar = schedule.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    got = loss_weights(Objective(prediction_type, snr_gamma=5.0), schedule, t)
    torch.testing.assert_close(got, weight(snr, 5.0))


def test_seed_weighting_without_gamma(schedule):
    t = torch.tensor([10, 900])
    assert loss_weights(Objective("epsilon"), schedule, t) is None
    assert loss_weights(Objective("v_prediction"), schedule, t) is None
    alpha_bar = schedule.alphas_cumprod[t]
    torch.testing.assert_close(loss_weights(Objective("sample"), schedule, t), alpha_bar / (1 - alpha_bar))


def test_weighted_loss_is_the_per_image_weighted_mean():
    output, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert diffusion_loss(output, target, None).item() == pytest.approx((1 + 4) / 2)
    assert diffusion_loss(output, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)


def test_noise_offset_shifts_each_channel(schedule):
    images = torch.zeros(64, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    plain = sample_noise(images, None, generator)
    offset = sample_noise(images, 1.0, torch.Generator().manual_seed(0))
    # the per-image, per-channel means of the offset noise spread like N(0, 1), the plain ones like N(0, 1/64)
    assert plain.mean(dim=(2, 3)).std() < 0.25 < offset.mean(dim=(2, 3)).std()
    # one offset per image and channel (diffusers' scripts): the channels of an image shift apart, a colour cast
    means = offset.mean(dim=(2, 3))
    assert (means[:, 0] - means[:, 1]).std() > 0.5


def test_training_loss_matches_the_ddpm_formula(schedule):
    """L = || eps - eps_theta(sqrt(a) x0 + sqrt(1 - a) eps, t) ||^2 with the same eps and t drawn."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 1, 3, padding=1)
    unet = lambda x, t: type("Out", (), {"sample": network(x) * (t.view(-1, 1, 1, 1) / 1000)})()  # noqa: E731
    x0 = torch.randn(4, 1, 8, 8)
    loss = training_loss(unet, schedule, x0, Objective("epsilon"), generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    eps = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (4,), generator=generator)
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = ((eps - unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample) ** 2).mean()
    torch.testing.assert_close(loss, expected)
