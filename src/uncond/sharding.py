"""FSDP2 (torch's fully_shard, through accelerate): what changes when each process holds only a shard of
every weight. local_tensors and full_tensor pass unsharded tensors through, so the EMA and the gradient
clipping need no branches.

The EMA averages each process's own shards (element-wise, no communication). Sample grids, evaluations,
exports and the diffusers folders in checkpoints gather the full weights into a plain UNet2DModel, which
is a collective: every process must make the same calls, in the same order.
"""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers import UNet2DModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def local_tensors(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's local shard (sharing its storage, so writes land in the parameter), or the parameter
    itself when it is not sharded. requires_grad is kept: EMAModel copies, rather than averages, the
    parameters that do not require gradients."""
    return [p.to_local().detach().requires_grad_(p.requires_grad) if isinstance(p, DTensor) else p
            for p in parameters]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every process (a collective); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered_copy(unet: torch.nn.Module, everywhere: bool = True) -> UNet2DModel | None:
    """A plain UNet2DModel holding the full current weights of a sharded `unet` (a collective: every process
    must call it). With `everywhere`, on every process, on its device; otherwise on the main process only,
    on the CPU (torch gathers to rank 0 with CPU offload), and None elsewhere: no process's accelerator
    memory holds a whole copy. Built on the meta device first: no random initialisation."""
    if everywhere:
        weights = {name: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.clone()
                   for name, tensor in unet.state_dict().items()}  # (state_dict's tensors are detached)
    else:
        weights = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not weights:  # not rank 0
            return None
    with torch.device("meta"):
        copy = UNet2DModel.from_config(unet.config)
    copy.load_state_dict(weights, assign=True)
    return copy


def local_shards(parameters: Iterable[torch.Tensor], full: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """This process's shards of whole tensors, cut as `parameters` are cut (for an EMA resumed from whole
    weights with any process count). Every process holds the whole tensors, so nothing is sent."""
    return [distribute_tensor(whole.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
            if isinstance(p, DTensor) else whole for p, whole in zip(parameters, full)]
