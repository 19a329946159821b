"""The network: UNet presets, UNet configs from files and the Hub, their builders, and the EMA of its weights (the
noise schedule is sampling.training_noise_scheduler's)."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.training_utils import EMAModel

from . import remote, sharding
from .config import TrainConfig, UsageError, first_line

logger = logging.getLogger("uncond")


@dataclass(frozen=True)
class Preset:
    name: str
    resolution: int  # the resolution it was designed for; any multiple of its downsampling factor works
    description: str
    unet: dict[str, Any]


def _blocks(levels: int, attention_levels: tuple[int, ...]) -> dict[str, tuple[str, ...]]:
    """Down/up block types for `levels` resolutions with self-attention at the given levels (0 = full size)."""
    down = tuple("AttnDownBlock2D" if level in attention_levels else "DownBlock2D" for level in range(levels))
    up = tuple("AttnUpBlock2D" if level in attention_levels else "UpBlock2D" for level in reversed(range(levels)))
    return {"down_block_types": down, "up_block_types": up}


# train_unconditional.py's UNet, used when neither --model_preset nor --model_config_name_or_path is given.
SEED_UNET = {
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    **_blocks(6, attention_levels=(4,)),
}

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("tiny", 28, "CPU-sized, for the built-in MNIST demo",
               {"layers_per_block": 1, "block_out_channels": (16, 32, 64), **_blocks(3, attention_levels=(2,)),
                "norm_num_groups": 8, "attention_head_dim": 16}),
        Preset("small-32", 32, "a quick 32 px model",
               {"layers_per_block": 2, "block_out_channels": (64, 128, 128), **_blocks(3, attention_levels=(2,))}),
        Preset("ddpm-32", 32, "the DDPM paper's CIFAR-10 network (Ho et al. 2020)",
               {"layers_per_block": 2, "block_out_channels": (128, 256, 256, 256),
                **_blocks(4, attention_levels=(1,))}),
        Preset("ddpm-64", 64, "a 64 px model in the DDPM layout",
               {"layers_per_block": 2, "block_out_channels": (128, 256, 384, 512),
                **_blocks(4, attention_levels=(2, 3))}),
        Preset("ddpm-128", 128, "a 128 px model in the DDPM layout",
               {"layers_per_block": 2, "block_out_channels": (128, 128, 256, 384, 512),
                **_blocks(5, attention_levels=(3, 4))}),
        Preset("seed", 64, "train_unconditional.py's network, the default",
               dict(SEED_UNET)),
    )
}


def downsampling_factor(unet_config: dict[str, Any]) -> int:
    """How much the UNet shrinks its input: every down block but the last halves it."""
    return 2 ** (len(unet_config["down_block_types"]) - 1)


def check_resolution(unet_config: dict[str, Any], resolution: int, what: str = "--resolution") -> None:
    factor = downsampling_factor(unet_config)
    if resolution % factor:
        below, above = resolution // factor * factor, (resolution // factor + 1) * factor
        suggestion = f"use {below} or {above}" if below else f"use {above}"
        if what != "--resolution":
            suggestion = f"pass --resolution {below or above}" + f" or {above}" * bool(below)
        halvings = len(unet_config["down_block_types"]) - 1
        raise UsageError(f"{what} {resolution} is not divisible by {factor} (the model halves it "
                         f"{halvings} times); {suggestion}")


def load_unet_config(name_or_path: str, cache_dir: str | None = None) -> dict[str, Any]:
    """A UNet2DModel config from a Hub id, a model folder, a pipeline folder (its unet/) or a config.json."""
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        path = path / "unet"
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            missing = "no config.json there" if path.parent.is_dir() and path.name == "config.json" else "no such file"
            raise UsageError(f"--model_config_name_or_path {name_or_path}: {missing}")
        try:
            unet_config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UsageError(f"--model_config_name_or_path {path} is not valid JSON: {error}") from None
    else:
        try:
            with remote.quiet_hub_clients():
                unet_config = dict(UNet2DModel.load_config(name_or_path, cache_dir=cache_dir))
        except Exception as error:  # noqa: BLE001 - network, auth and missing-repo errors all end the same way
            reason = remote.load_failure(error)
            raise UsageError(f"--model_config_name_or_path {name_or_path}: could not load a UNet config from the "
                             f"Hub ({reason}); pass a local folder or config.json instead") from None
    class_name = unet_config.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise UsageError(f"--model_config_name_or_path {name_or_path} describes a {class_name}; uncond trains "
                         "UNet2DModel (unconditional) networks")
    check_trainable(unet_config, f"--model_config_name_or_path {name_or_path}")
    # A config written by another diffusers version may name settings this one lacks: UNet2DModel.from_config
    # (the seed script's way) drops them with a warning, as here; UNet2DModel(**config) would raise.
    known = inspect.signature(UNet2DModel.__init__).parameters
    unknown = sorted(key for key in unet_config if not key.startswith("_") and key not in known)
    if unknown:
        logger.warning(f"--model_config_name_or_path {name_or_path}: ignoring {', '.join(unknown)}, which this "
                       f"diffusers version's UNet2DModel does not take")
    return unet_settings(unet_config)


def unet_settings(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a saved UNet config that UNet2DModel takes, those it leaves out at UNet2DModel's defaults (as
    from_config gives them): without diffusers' _keys, or an EMA's own (decay, inv_gamma...) in a checkpoint's."""
    known = inspect.signature(UNet2DModel.__init__).parameters
    defaults = {name: parameter.default for name, parameter in known.items()
                if name != "self" and parameter.default is not inspect.Parameter.empty}
    given = {key: value for key, value in unet_config.items() if not key.startswith("_") and key in known}
    return {**defaults, **given}


def check_trainable(unet_config: dict[str, Any], given_as: str) -> None:
    """What a UNet2DModel config can describe that uncond's unconditional DDPM training cannot train."""
    if unet_config.get("num_class_embeds") is not None or unet_config.get("class_embed_type") is not None:
        raise UsageError(f"{given_as} describes a class-conditional UNet2DModel (num_class_embeds "
                         f"{unet_config.get('num_class_embeds')}, class_embed_type "
                         f"{unet_config.get('class_embed_type')}); uncond trains unconditional networks: set both "
                         "to null")
    if unet_config.get("time_embedding_type") == "fourier":  # GaussianFourierProjection takes log(t): NaN at t=0
        raise UsageError(f"{given_as}: time_embedding_type fourier takes the logarithm of the timestep (it is made "
                         "for continuous noise levels), and DDPM's timestep 0 makes it NaN; use positional")


def model_source(config: TrainConfig) -> str:
    """The flag that gave the run's UNet config, with its value, for messages."""
    if config.pretrained_model_name_or_path:
        return f"--pretrained_model_name_or_path {config.pretrained_model_name_or_path}"
    return f"--model_config_name_or_path {config.model_config_name_or_path}"


def unet_config_for(config: TrainConfig, resolution: int, loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The UNet config this run trains, before the channel count is known (channels are set later). `loaded`:
    --model_config_name_or_path's config (or the pretrained model's) when the caller has read it already."""
    if config.model_config_name_or_path and config.model_preset:
        raise UsageError("give either --model_preset or --model_config_name_or_path, not both")
    if loaded is not None or config.model_config_name_or_path:
        unet_config = dict(loaded) if loaded is not None else load_unet_config(config.model_config_name_or_path,
                                                                               config.cache_dir)
    else:
        unet_config = dict(preset_named(config.model_preset or "seed").unet)
    unet_config["sample_size"] = resolution
    check_resolution(unet_config, resolution)
    learned = unet_config.get("time_embedding_type") == "learned"  # one embedding per timestep, looked up
    if learned and (unet_config.get("num_train_timesteps") or 0) < config.ddpm_num_steps:
        has = f"{unet_config['num_train_timesteps']} timesteps" if unet_config.get("num_train_timesteps") else \
            "no num_train_timesteps"
        raise UsageError(f"{model_source(config)}: its learned time embedding has {has}, fewer than --ddpm_num_steps "
                         f"{config.ddpm_num_steps}; set its num_train_timesteps to {config.ddpm_num_steps}")
    try:  # on the meta device: the structure only, in milliseconds, before the data is decoded
        weightless_unet(unet_config)
    except (ValueError, TypeError, KeyError, IndexError) as error:
        raise UsageError(f"{model_source(config)}: UNet2DModel cannot be "
                         f"built from it ({first_line(error)})") from None
    return unet_config


def preset_named(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"--model_preset {name}: unknown; choose one of {', '.join(PRESETS)} (`uncond presets`)")
    return PRESETS[name]


def with_channels(unet_config: dict[str, Any], channels: int) -> dict[str, Any]:
    return {**unet_config, "in_channels": channels, "out_channels": channels}


def build_unet(unet_config: dict[str, Any]) -> UNet2DModel:
    return UNet2DModel(**unet_config)


def weightless_unet(unet_config: dict[str, Any]) -> UNet2DModel:
    """The UNet on the meta device: its structure, without allocating or initialising weights."""
    with torch.device("meta"):
        return UNet2DModel(**unet_config)


def count_parameters(unet_config: dict[str, Any]) -> int:
    return sum(parameter.numel() for parameter in weightless_unet(unet_config).parameters())


class EMA(EMAModel):
    """diffusers' EMAModel, optionally updated every `every` optimizer steps. Each update applies the product of
    the per-step decays of the steps since the last one, so the old average keeps the share per-step updates would
    leave it: exactly so where the weights moved only at updates, and none of the random initial weights is kept
    (the first step's decay is 0). The same horizon at 1/every of the memory traffic.

    Steps are the run's optimizer steps: `last_update_step`, the one the average was last updated at (or taken
    from); `clock_start`, the one its warmup counts from: 0, or that of a resume adding --use_ema, whose average
    warms up afresh, as the seed script's new EMAModel does (checkpoint.ema_clock)."""

    def __init__(self, *args: Any, every: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.every = every
        self.last_update_step = self.clock_start = 0
        self.updating_at = 0

    def step(self, parameters: Any, at_step: int | None = None) -> None:
        """The update at optimizer step `at_step` (train.update_ema: the multiples of `every`; by default the
        next one after the last update)."""
        self.updating_at = self.last_update_step + self.every if at_step is None else at_step
        super().step(parameters)
        self.last_update_step = self.updating_at

    def get_decay(self, optimization_step: int) -> float:  # (diffusers' step asks it with its update count)
        return self.decay_since_update(self.updating_at)

    def decay_since_update(self, step: int) -> float:
        """The decay of the optimizer steps after the last update up to `step` (1 where it was updated at `step`):
        the share of the average that its next update, at `step`, would keep."""
        return self.decay_over(self.last_update_step + 1, step)

    def decay_over(self, first: int, last: int) -> float:
        """The product of diffusers' per-step decays of optimizer steps `first` to `last`, on the warmup's clock."""
        per_step_decay = super().get_decay  # (not inside the generator, where super() has no instance)
        return math.prod(per_step_decay(step - self.clock_start) for step in range(first, last + 1))

    @property
    def decay_per_step(self) -> float | None:
        """The per-step decay at the last update's step: the value a run updating every step would show, so
        that runs with other --ema_update_every compare."""
        return None if self.cur_decay_value is None else super().get_decay(self.last_update_step - self.clock_start)


def make_ema(unet: torch.nn.Module, config: TrainConfig) -> EMA:
    """The seed's EMA: warmup 1 - (1 + step / inv_gamma) ** -power, capped at ema_max_decay; foreach updates.
    Under FSDP it averages this process's shards of the weights (give it the sharded UNet)."""
    return EMA(sharding.local_tensors(unet.parameters()), decay=config.ema_max_decay, use_ema_warmup=True,
               inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=True, model_cls=UNet2DModel,
               model_config=unet.config, every=config.ema_update_every)


def speed_up(unet: UNet2DModel, config: TrainConfig, device: torch.device) -> list[str]:
    """Put the speed settings that suit `device` on the UNet; returns what is on, for the log."""
    done = []
    if uses_channels_last(config, device):
        unet.to(memory_format=torch.channels_last)
        done.append("channels-last")
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        done.append("gradient checkpointing")
    if config.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        done.append("xformers attention")
    elif any(type(module.processor).__name__ == "AttnProcessor2_0" for module in unet.modules()
             if isinstance(module, Attention)):
        done.append("SDPA attention")  # diffusers' default: torch's fused scaled_dot_product_attention
    return done


def uses_channels_last(config: TrainConfig, device: torch.device) -> bool:
    """Whether this run keeps the UNet and its inputs channels-last: --channels_last, on GPUs only."""
    return config.channels_last and device.type == "cuda"


@contextlib.contextmanager
def ema_weights(unet: torch.nn.Module, ema: Any | None, step: int | None = None) -> Iterator[torch.nn.Module]:
    """Temporarily put the EMA weights into `unet` (for previews and export); the trained weights come back
    afterwards, even if the body raises. Without EMA, yields `unet` unchanged. `step`: the optimizer steps done,
    where an EMA updated every N steps has not averaged the last ones in yet: the trained weights are blended in
    as its update at `step` would (the export of a run of 3 steps with --ema_update_every 4 was its random initial
    weights; trial 58 F2). The EMA itself is left as it is: a checkpoint keeps it for an exact resume."""
    if ema is None:
        yield unet
        return
    parameters = sharding.local_tensors(unet.parameters())  # under FSDP the EMA holds this process's shards
    ema.store(parameters)
    kept = ema.decay_since_update(step) if step is not None and isinstance(ema, EMA) else 1.0
    if kept == 1.0:
        ema.copy_to(parameters)
    else:
        with torch.no_grad():
            for parameter, average in zip(parameters, ema.shadow_params):
                parameter.lerp_(average.to(parameter.device), kept)  # kept * average + (1 - kept) * trained
    try:
        yield unet
    finally:
        ema.restore(parameters)


def describe_unet(unet_config: dict[str, Any]) -> str:
    levels = len(unet_config["down_block_types"])
    attention = [i for i, kind in enumerate(unet_config["down_block_types"]) if kind.startswith("Attn")]
    sizes = [unet_config["sample_size"] // 2**level for level in attention]
    return (f"{levels} levels, channels {tuple(unet_config['block_out_channels'])}, "
            f"attention at {', '.join(f'{s}x{s}' for s in sizes) or 'none'}")
