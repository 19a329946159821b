"""uncond's CLI with the tiny stand-in feature network in place of Inception, for test_distributed.py's
evaluation test under `accelerate launch` (the in-process fixture cannot reach launched processes)."""

from __future__ import annotations

import sys

import uncond.metrics
from conftest import make_tiny_extractor
from uncond import cli

def main(argv: list[str]) -> int:
    uncond.metrics.inception_extractor = lambda weights, device: make_tiny_extractor()
    return cli.console(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
