"""One of two CPU processes (gloo) in which work of the main process alone fails: a full disk met while
preparing the output folder (`case setup`, parts.on_main_process) or while writing a checkpoint's last files
(`case checkpoint`). Writes how this process ended to FOLDER/../ending-RANK.txt (two processes printing to one
pipe at once ran their lines together). Used by test_distributed.py;
`python main_failure_worker.py CASE FOLDER` with torch.distributed's environment variables set."""

from __future__ import annotations

import errno
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs

from uncond import checkpoint, parts
from uncond.config import TrainConfig


def disk_full(*args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def main(case: str, folder: Path) -> None:
    torch.set_num_threads(1)
    # a process left waiting ends in 30 s with gloo's error, not with uncond's message
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=30))])
    try:
        if case == "setup":
            parts.on_main_process(accelerator, disk_full)
        else:
            accelerator.prepare(torch.nn.Linear(2, 2))
            if accelerator.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                checkpoint.write_manifest = disk_full  # the main process writes the checkpoint's last files
            accelerator.wait_for_everyone()
            checkpoint.save_checkpoint(accelerator, folder, 1, {"step": 1},
                                       TrainConfig(dataset_name="x", output_dir=str(folder)), None)
        ending = "finished"
    except Exception as error:  # noqa: BLE001 - how the process ended is what the test reads
        ending = f"{type(error).__name__}: {error}"
    rank = accelerator.process_index
    (folder.parent / f"ending-{rank}.txt").write_text(f"rank {rank}: {ending}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
