"""uncond: train unconditional image-generation diffusion models on your own images."""

from . import start  # noqa: F401 - first: it reads what the imports below (seconds) could change

__version__ = "0.1.0"

from .cli import main  # uncond.main(["train", ...]): a command run from Python (cli.main)

__all__ = ["main"]
