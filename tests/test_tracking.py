"""The loss-curve picture, loss.png."""

from __future__ import annotations

import numpy as np
from PIL import Image

from uncond.tracking import plot_metrics

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (loss) and tab:orange (learning rate)


def pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(image.astype(int) - colour).max(axis=-1) <= 12).sum())


def test_a_single_logged_point_is_drawn(tmp_path):
    """A run stopped after its first log interval had an empty loss.png: a line through one point draws nothing."""
    assert plot_metrics([{"step": 10, "loss": 0.5, "lr": 1e-4}], tmp_path / "loss.png")
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    left_of_the_legend = image[:, : int(image.shape[1] * 0.7)]  # the legend (upper right) shows the colours anyway
    assert pixels_of(left_of_the_legend, BLUE) > 10 and pixels_of(image, ORANGE) > 10
