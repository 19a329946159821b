"""One of two processes that make and destroy a DDP process group over gloo many times, ending each the
way `uncond train` ends a run (environment.finish_collectives, then destroy_process_group, then the
model goes). Used by test_teardown.py; `python teardown_worker.py RANK PORT ITERATIONS`."""

from __future__ import annotations

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from uncond import environment


def main(rank: int, port: int, iterations: int) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    for iteration in range(iterations):
        dist.init_process_group("gloo", store=dist.PrefixStore(str(iteration), store), rank=rank, world_size=2)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.ones(2, 4)).sum().backward()
        metric = torch.ones(8)  # a tensor Python made, in the last collective before the end (a logged loss)
        dist.all_reduce(metric)
        del metric
        environment.finish_collectives()
        dist.destroy_process_group()
        del model  # DDP's Reducer destroys the group here, with the GIL held
        print(iteration + 1, flush=True)


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
