"""`python -m uncond` for the FSDP tests, run under `accelerate launch --config_file "$(uncond launch-config fsdp)"`
on CPU processes. Test-only: accelerate 1.15 shards on GPU-like devices only and runs CPU processes
data-parallel even under an FSDP launch (accelerate/state.py sets DistributedType.FSDP for GPU types only),
so this takes its FSDP path on gloo, exactly as it does on GPUs with NCCL: FSDP2's fully_shard, its
all-gathers and reduce-scatters, its checkpoints, all run for real on the CPU. It runs eval_worker.py's CLI,
with the tiny stand-in feature network for evaluations.
"""

from __future__ import annotations

import os
import sys

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import eval_worker

plain_init = Accelerator.__init__


def init_with_fsdp_on_cpu(self: Accelerator, *args, **kwargs) -> None:
    plain_init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and self.num_processes > 1:
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
        if self.state.mixed_precision != "no":  # as accelerate/state.py does on GPUs
            self.state.fsdp_plugin.set_mixed_precision(self.state.mixed_precision)
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # accelerate reads both


Accelerator.__init__ = init_with_fsdp_on_cpu

if __name__ == "__main__":
    sys.exit(eval_worker.main(sys.argv[1:]))
