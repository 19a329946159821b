"""uncond: train unconditional image-generation diffusion models on your own images."""

__version__ = "0.1.0"
