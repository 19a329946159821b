"""The loss-curve picture, loss.png."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from uncond.tracking import metrics_figure, plot_metrics

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (loss) and tab:orange (learning rate)


def pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(image.astype(int) - colour).max(axis=-1) <= 12).sum())


def test_a_single_logged_point_is_drawn(tmp_path):
    """A run stopped after its first log interval had an empty loss.png: a line through one point draws nothing."""
    assert plot_metrics([{"step": 10, "loss": 0.5, "lr": 1e-4}], tmp_path / "loss.png")
    image = np.asarray(Image.open(tmp_path / "loss.png").convert("RGB"))
    left_of_the_legend = image[:, : int(image.shape[1] * 0.7)]  # the legend (upper right) shows the colours anyway
    assert pixels_of(left_of_the_legend, BLUE) > 10 and pixels_of(image, ORANGE) > 10


@pytest.fixture(autouse=True)
def closed_figures():
    """matplotlib keeps every figure it made until closed: the tests' figures are closed after each test."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def test_a_few_logged_points_are_drawn_as_they_are():
    """Two log lines drew a flat 'smoothed' line at their mean over the real curve: a falling loss looked flat."""
    records = [{"step": 1, "loss": 1.12, "lr": 1e-4}, {"step": 2, "loss": 1.05, "lr": 1e-4}]
    figure = metrics_figure(records)
    loss_axis = figure.axes[0]
    assert [list(line.get_ydata()) for line in loss_axis.get_lines()] == [[1.12, 1.05]]


def test_loss_ticks_read_as_plain_numbers_and_steps_as_whole_numbers():
    """A loss between 1.05 and 1.12 was labelled 1.08x10^0 on its log axis, and two steps had a tick at 1.5."""
    records = [{"step": 1, "loss": 1.12, "lr": 1e-4}, {"step": 2, "loss": 1.05, "lr": 1e-4}]
    figure = metrics_figure(records)
    figure.canvas.draw()
    loss_axis, lr_axis = figure.axes[0], figure.axes[1]
    labels = [t.get_text() for t in loss_axis.get_yticklabels(minor=True) + loss_axis.get_yticklabels()]
    labels = [text for text in labels if text]
    values = [float(text) for text in labels]  # "1.08": mathtext ("$1.08\\times10^{0}$") does not parse
    assert sum(1.04 < value < 1.13 for value in values) >= 3, labels
    steps = [float(t.get_text().replace("\u2212", "-")) for t in lr_axis.get_xticklabels() if t.get_text()]
    assert steps and all(step == int(step) for step in steps), steps


def test_a_loss_spanning_less_than_a_decade_has_a_label_at_each_tick():
    """A loss from 0.15 down to 0.04 had three labels (0.04, 0.06, 0.1): 0.05, 0.07 to 0.09 were bare ticks."""
    records = [{"step": step, "loss": 0.04 + 0.11 * 0.9 ** step, "lr": 1e-4} for step in range(60)]
    figure = metrics_figure(records)
    figure.canvas.draw()
    loss_axis = figure.axes[0]
    low, high = loss_axis.get_ylim()
    labels = {float(t.get_text()) for t in loss_axis.get_yticklabels(minor=True) + loss_axis.get_yticklabels()
              if t.get_text() and low <= t.get_position()[1] <= high}
    assert {0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1} <= labels, labels


def test_a_long_run_draws_its_loss_smoothed_too():
    records = [{"step": i, "loss": 1.0 / (1 + i), "lr": 1e-4} for i in range(100)]
    loss_axis = metrics_figure(records).axes[0]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["loss", "loss (smoothed)"]


def test_a_failed_rewrite_of_metrics_leaves_the_history_whole(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl without the lines past its checkpoint: a full disk (or a kill) during the
    rewrite cut the whole loss history short."""
    import errno
    from pathlib import Path

    from uncond import tracking

    path = tmp_path / "metrics.jsonl"
    tracking.write_metrics(path, [{"step": step, "loss": 1.0} for step in range(1, 5)])
    write_text = Path.write_text

    def disk_full(self: Path, text: str, *args, **kwargs) -> None:
        write_text(self, text[:len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError):
        tracking.MetricsFile(tmp_path, resume_step=2)
    monkeypatch.undo()
    assert [record["step"] for record in tracking.read_metrics(path)] == [1, 2, 3, 4]
    assert [file.name for file in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_resume_rewrites_an_earlier_runs_nan_lines_as_strict_json(tmp_path):
    """metrics.jsonl of a run logged before uncond wrote null for NaN: a resume rewrote its NaN lines as they were,
    beside its own strict ones, and jq or JavaScript still refused the whole file."""
    from conftest import strict_json_lines
    from uncond import tracking

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": NaN, "lr": 0.1}\n{"step": 10, "loss": 0.5, "grad_norm": Infinity}\n')
    tracking.MetricsFile(tmp_path, resume_step=10).write({"step": 12, "loss": float("inf")})
    assert strict_json_lines(path) == [{"step": 5, "loss": None, "lr": 0.1},
                                       {"step": 10, "loss": 0.5, "grad_norm": None}, {"step": 12, "loss": None}]
