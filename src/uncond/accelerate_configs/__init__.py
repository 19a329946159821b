"""The accelerate launch configs uncond ships, as files of the installed package: `accelerate launch
--config_file "$(uncond launch-config fsdp)" -m uncond train ...` works from a wheel as from a checkout.
Torch-free: `uncond launch-config` prints a path at once."""

from __future__ import annotations

import re
from pathlib import Path

FOLDER = Path(__file__).parent
NAMES = ("multi_gpu", "multi_node", "fsdp")


def config_path(name: str) -> Path:
    """The installed file of launch config `name` (one of NAMES)."""
    return FOLDER / f"{name}.yaml"


def summary(name: str) -> str:
    """The config's first comment line: what launch it is for."""
    first = config_path(name).read_text().splitlines()[0].lstrip("# ")
    return re.split(r"[:.](?:\s|$)", first)[0]
