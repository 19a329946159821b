"""Samplers: every one runs on a tiny pipeline, images are deterministic per seed whatever the batch size,
grids tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import TINY_UNET, save_tiny_pipeline
from uncond.config import SAMPLER_NAMES, UsageError
from uncond.sampling import (SAMPLERS, check_sampler, generate, image_grid, load_model, make_sampler,
                             step_options)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    config = {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}
    return UNet2DModel(**{**config, "sample_size": 8, "in_channels": 1, "out_channels": 1}).eval()


@pytest.fixture(scope="module")
def pipeline_model(tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "gray", channels=1)
    return load_model(str(folder), torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_generates_from_a_pipeline(pipeline_model, name):
    scheduler = make_sampler(name, pipeline_model.scheduler_config)
    images = generate(pipeline_model.unet, scheduler, num_images=2, num_steps=4, seed=0, batch_size=2)
    assert images.shape == (2, 16, 16, 1) and images.dtype == np.uint8
    assert len(np.unique(images)) > 2  # an image, not a constant


def test_sampler_names_for_help_are_the_samplers():
    assert tuple(SAMPLERS) == SAMPLER_NAMES


@pytest.mark.parametrize("name", ["ddpm", "sde-dpmsolver++", "dpmsolver++"])
def test_image_i_does_not_depend_on_the_batch_size(unet, name):
    scheduler = make_sampler(name, DDPMScheduler(num_train_timesteps=1000).config)
    together = generate(unet, scheduler, num_images=5, num_steps=3, seed=7, batch_size=5)
    in_pieces = generate(unet, scheduler, num_images=5, num_steps=3, seed=7, batch_size=2)
    np.testing.assert_allclose(together.astype(int), in_pieces.astype(int), atol=1)
    other_seed = generate(unet, scheduler, num_images=5, num_steps=3, seed=8, batch_size=5)
    assert not np.array_equal(together, other_seed)


def test_samplers_inherit_the_training_schedule():
    training = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                             prediction_type="v_prediction")
    sampler = make_sampler("dpmsolver++", training.config)
    assert sampler.config.num_train_timesteps == 500
    assert sampler.config.beta_schedule == "squaredcos_cap_v2"
    assert sampler.config.prediction_type == "v_prediction"
    assert sampler.config.thresholding and sampler.config.sample_max_value == 1.0  # DDPM's clip_sample
    assert sampler.config.timestep_spacing == "trailing"


def test_ddim_recomputes_its_noise_from_the_clipped_image():
    # without it, DDIM with clipping got worse with more steps (docs/benchmarks.md)
    sampler = make_sampler("ddim", DDPMScheduler(num_train_timesteps=1000).config)
    assert step_options(sampler) == {"generator": None, "use_clipped_model_output": True}
    assert step_options(make_sampler("unipc", DDPMScheduler().config)) == {}


def test_unknown_sampler_is_a_usage_error():
    with pytest.raises(UsageError, match="--sampler plms: unknown; choose one of ddpm, ddim"):
        check_sampler("plms")


def test_grid_tiles_images_in_rows():
    images = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (0, 100, 200, 50)])
    grid = np.asarray(image_grid(images, padding=1))
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 100 and grid[6, 1, 0] == 200 and grid[6, 6, 0] == 50
    gray = image_grid(np.zeros((3, 4, 4, 1), np.uint8))
    assert gray.mode == "L"
