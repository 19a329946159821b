"""Samplers: every one runs on a tiny pipeline, images are deterministic per seed whatever the batch size,
grids tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import TINY_UNET, save_tiny_pipeline
from uncond.config import SAMPLER_NAMES, UsageError
from uncond.sampling import (SAMPLERS, check_sampler, check_sampler_fits, diffusers_usage_code, generate,
                             image_grid, load_model, make_sampler, step_options)


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


class ExactNoise(UNet2DModel):
    """A "network" that knows the data, every image being the constant LEVEL, so the noise in x_t is
    (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t): a sampler that follows the training schedule ends on that image,
    one that does not (other betas, unscaled inputs or initial noise) does not. Fractional timesteps (KDPM2's)
    are placed between the integer ones linearly in log sigma, as diffusers' samplers place them."""
    LEVEL = 191
    # Samplers that end at training timestep 0 (DDIM, PNDM) keep its noise, std sqrt(beta_0) = 0.01, 1.3 levels;
    # a sampler off the schedule is off by tens of levels.
    TOLERANCE = 8

    def __init__(self, alphas_cumprod: torch.Tensor, **config):
        super().__init__(**config)
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod).sqrt().log()).double().numpy()

    def forward(self, sample, timestep, *args, **kwargs):
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        sigma = float(np.exp(np.interp(t, np.arange(len(self.log_sigmas)), self.log_sigmas)))
        alpha_bar = 1 / (1 + sigma ** 2)
        clean = self.LEVEL / 127.5 - 1
        noise = (sample - alpha_bar ** 0.5 * clean) / (1 - alpha_bar) ** 0.5
        return __import__("diffusers").models.unets.unet_2d.UNet2DOutput(sample=noise)


def exact_noise_unet(training: DDPMScheduler) -> ExactNoise:
    config = {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}
    return ExactNoise(training.alphas_cumprod, **{**config, "sample_size": 8, "in_channels": 1, "out_channels": 1})


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_sampler_follows_the_training_schedule(name, schedule):
    """DDPM's sigmoid and laplace schedules, which the other diffusers samplers do not compute, reach them
    as the training betas (they raised NotImplementedError at the first preview). Laplace goes the same way
    but is not measured here: its timestep 0 keeps noise of std 0.15, where DDIM and PNDM end."""
    training = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)
    images = generate(exact_noise_unet(training), make_sampler(name, training.config), num_images=2, num_steps=6)
    assert np.abs(images.astype(int) - ExactNoise.LEVEL).max() <= ExactNoise.TOLERANCE


@pytest.mark.parametrize("schedule", ["linear", "sigmoid"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_previews_and_checkpoints_sample_as_the_export_does(name, schedule, tmp_path):
    """The training schedule (previews, a checkpoint's samples) and the export's scheduler_config.json read back
    make the same sampler, to the settings a sample folder records: diffusers gave Heun and KDPM2 their own
    clip_sample default (False) from the one and DDPM's (True) from the other, so previews went unclipped where
    the export's samples are clipped."""
    from uncond.config import TrainConfig
    from uncond.sample_folder import schedule_of
    from uncond.sampling import training_noise_scheduler

    training = training_noise_scheduler(TrainConfig(ddpm_beta_schedule=schedule).to_dict())
    training.save_pretrained(tmp_path)
    exported = DDPMScheduler.from_pretrained(tmp_path)
    made = [schedule_of(make_sampler(name, scheduler.config)) for scheduler in (training, exported)]
    assert made[0] == made[1]
    if "clip_sample" in made[0]:
        assert made[0]["clip_sample"] is True


@pytest.mark.parametrize("schedule", ["sigmoid", "laplace"])
def test_an_export_of_ddpms_own_betas_takes_any_diffusers_sampler(schedule, tmp_path):
    """DDIMScheduler.from_config(pipeline.scheduler.config), diffusers' way to swap samplers, raised
    NotImplementedError for a sigmoid or laplace export: the export now writes its betas out."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
                           UniPCMultistepScheduler)

    from uncond.config import TrainConfig
    from uncond.sampling import training_noise_scheduler

    training = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule)  # what the run trains on
    training_noise_scheduler(TrainConfig(ddpm_beta_schedule=schedule).to_dict()).save_pretrained(tmp_path)
    exported = DDPMScheduler.from_pretrained(tmp_path)
    for sampler in (exported, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler,
                    UniPCMultistepScheduler):
        assert torch.equal(sampler.from_config(exported.config).betas, training.betas), sampler


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_model_card_code_samples_like_uncond_with_every_sampler(name, monkeypatch):
    """The card's code, run as written with plain diffusers: through DDPMPipeline where the sampler fits its loop,
    else its own loop (DDPMPipeline with Euler-type samplers gave wrong images, with PNDM or UniPC a TypeError)."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    training = DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid")
    pipeline = DDPMPipeline(unet=exact_noise_unet(training), scheduler=training)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda repo: pipeline)
    namespace: dict = {}
    exec(diffusers_usage_code(name, training.config, "someone/model", 6), namespace)  # noqa: S102 - the card's code
    images = np.stack([np.asarray(image) for image in namespace["images"]])
    assert images.shape == (16, 8, 8) and np.abs(images.astype(int) - ExactNoise.LEVEL).max() <= ExactNoise.TOLERANCE


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_model_card_code_gives_the_images_of_uncond_sample(name, monkeypatch):
    """The card's code with a network of random weights gives `uncond sample --seed 0`'s images to the bit: it
    drew the whole batch from one generator (other images), and for DDIM left out uncond's clipped noise
    estimate (DDPMPipeline's loop passes no use_clipped_model_output)."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    torch.manual_seed(0)
    config = {k: v for k, v in TINY_UNET.items() if not k.startswith("_")}
    unet = UNet2DModel(**{**config, "sample_size": 8}).eval()
    training = DDPMScheduler(num_train_timesteps=1000)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda repo: DDPMPipeline(unet=unet, scheduler=training))
    namespace: dict = {}
    code = diffusers_usage_code(name, training.config, "someone/model", 4)
    exec(code, namespace)  # noqa: S102 - the card's code
    # the command it matches, with the flags (a run's preview steps are not `uncond sample`'s default 25)
    assert f"# the images of `uncond sample someone/model --seed 0 --sampler {name} --steps 4`:" in code
    card_images = np.stack([np.asarray(image) for image in namespace["images"]])
    uncond_images = generate(unet, make_sampler(name, training.config), num_images=16, num_steps=4, seed=0)
    assert np.array_equal(card_images, uncond_images)


def test_model_card_code_names_any_folder_as_python_and_the_shell_read_it():
    """A quote in the output folder's name made the card's code a SyntaxError; a space or a leading dash broke the
    `uncond sample` command it gives (trial 64 F1)."""
    import ast
    import re
    import shlex

    folder = '-my "run" 2'
    code = diffusers_usage_code("ddim", DDPMScheduler(num_train_timesteps=1000).config, folder, 4)
    calls = [node for node in ast.walk(ast.parse(code))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained"]
    assert [ast.literal_eval(call.args[0]) for call in calls] == [folder]
    command = re.search(r"# the images of `(.*)`:", code).group(1)
    assert shlex.split(command)[:3] == ["uncond", "sample", f"./{folder}"]


def test_a_sampler_that_cannot_sample_the_model_is_refused_before_any_work():
    for sampler in ("pndm", "kdpm2"):  # diffusers says it in two garbled ways
        with pytest.raises(UsageError, match=rf"^--sampler {sampler} cannot sample this model \(it takes no "
                                             r"prediction_type sample\); choose another sampler"):
            check_sampler_fits(sampler, DDPMScheduler(prediction_type="sample").config, 25)
    with pytest.raises(UsageError, match="the model was trained with 100 timesteps; use at most 100 steps"):
        check_sampler_fits("euler", DDPMScheduler(num_train_timesteps=100).config, 101)


def test_a_foreign_clip_range_is_not_turned_into_rescaling():
    """Thresholding is plain clipping only at sample_max_value 1; DDIM and DDPM clip by themselves."""
    foreign = DDPMScheduler(clip_sample_range=0.5).config
    assert not make_sampler("dpmsolver++", foreign).config.thresholding
    assert not make_sampler("ddim", DDPMScheduler().config).config.thresholding


def test_unknown_sampler_is_a_usage_error():
    with pytest.raises(UsageError, match="--sampler plms: unknown; choose one of ddpm, ddim"):
        check_sampler("plms")


def test_grid_tiles_images_in_rows():
    images = np.stack([np.full((4, 4, 3), value, np.uint8) for value in (0, 100, 200, 50)])
    grid = np.asarray(image_grid(images, padding=1))
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 100 and grid[6, 1, 0] == 200 and grid[6, 6, 0] == 50
    assert (grid[:, [0, 5, 10]] == 255).all() and (grid[[0, 5, 10]] == 255).all()  # a white line between any two
    assert grid[1, 9, 0] == 100 and grid[9, 9, 0] == 50  # each image whole, up to its last pixel
    assert image_grid(np.zeros((10, 4, 4, 3), np.uint8), padding=1).size == (4 * 5 + 1, 3 * 5 + 1)  # wider
    gray = image_grid(np.zeros((3, 4, 4, 1), np.uint8))
    assert gray.mode == "L"
