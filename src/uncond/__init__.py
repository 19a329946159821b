"""uncond: train unconditional image-generation diffusion models on your own images."""

__version__ = "0.1.0"

from .cli import main  # uncond.main(["train", ...]): a command run from Python (cli.main)

__all__ = ["main"]
