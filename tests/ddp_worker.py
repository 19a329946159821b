"""One data-parallel gradient computation, run by test_distributed.py under
`accelerate launch --multi_gpu --num_processes 2` (CPU processes talking over gloo).

Each process takes its equal share of the same batch of images, noise and timesteps, computes the real
objective (`objective.denoising_loss`) on the UNet as `parts.make_accelerator` and `accelerator.prepare`
wrap it (DistributedDataParallel), and backpropagates; DDP averages the gradients across processes.
Every process writes its loss (reduced over processes, as train.log_metrics reduces it) and gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from conftest import TINY_UNET
from uncond import models, sampling
from uncond.config import TrainConfig
from uncond.objective import Objective, denoising_loss

BATCH = 8
OBJECTIVE = Objective("v_prediction", snr_gamma=5.0)  # per-image weights, so the mean over images matters


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same 8 images, noise and timesteps on every process."""
    generator = torch.Generator().manual_seed(1234)
    clean_images = torch.rand(BATCH, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(clean_images.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
    return clean_images, noise, timesteps


def unet_and_scheduler() -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)  # the same initial weights everywhere
    return models.build_unet(dict(TINY_UNET)), sampling.training_noise_scheduler(TrainConfig().to_dict())


def shard_loss(unet: torch.nn.Module, scheduler: object, rows: slice) -> torch.Tensor:
    """The objective on rows `rows` of the batch."""
    clean_images, noise, timesteps = (tensor[rows] for tensor in batch())
    return denoising_loss(unet, scheduler, clean_images, noise, timesteps, OBJECTIVE)


def main(output_dir: Path) -> None:
    from uncond.parts import make_accelerator

    accelerator = make_accelerator(TrainConfig(logger="none", output_dir=str(output_dir)), output_dir)
    unet, scheduler = unet_and_scheduler()
    unet = accelerator.prepare(unet)
    share = BATCH // accelerator.num_processes
    rank = accelerator.process_index
    loss = shard_loss(unet, scheduler, slice(rank * share, (rank + 1) * share))
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
    tensors = {name: parameter.grad.contiguous() for name, parameter in
               accelerator.unwrap_model(unet).named_parameters()}
    tensors["loss"] = mean_loss.reshape(1)
    tensors["num_processes"] = torch.tensor([accelerator.num_processes])
    save_file(tensors, str(output_dir / f"rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
