"""uncond's CLI where the second process's decoded-image cache holds one image fewer, as when two machines
each decode their own copy of a folder and one copy lacks a file (test_distributed.py)."""

from __future__ import annotations

import os
import sys

from uncond import cli, data


class OneImageFewer:
    def __init__(self, cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache) - 1

    def __getattr__(self, name: str):
        return getattr(self.cache, name)


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        load_images = data.load_images
        data.load_images = lambda *args, **kwargs: OneImageFewer(load_images(*args, **kwargs))
    sys.exit(cli.console(sys.argv[1:]))
