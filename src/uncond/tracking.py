"""Training metrics: accumulated on the device every step, written at log intervals to metrics.jsonl
and the experiment trackers, and drawn as a loss-curve picture."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image
import torch

METRICS_FILE = "metrics.jsonl"
IMAGES_TAG = "test_samples"  # the sample grids' name in TensorBoard and W&B, as in the seed script
LOSS_PLOT_FILE = "loss.png"
FEW_POINTS = 10  # up to this many logged points are marked: one alone draws no line at all


class RunningMean:
    """Sum of a per-step tensor kept on its device: adding never waits for the accelerator. `pop` gives the
    mean as a device tensor, which the caller reads at log intervals; `state` reads it (at checkpoints)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.total = value.clone() if self.total is None else self.total.add_(value)
        self.count += 1

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of it (a host synchronisation), for `restore`."""
        return {"total": None if self.total is None else self.total.item(), "count": self.count}

    def restore(self, state: dict[str, Any], device: torch.device) -> None:
        total = state.get("total")
        self.total = None if total is None else torch.tensor(total, dtype=torch.float32, device=device)
        self.count = state.get("count", 0)

    def pop(self) -> torch.Tensor | None:
        if self.total is None:
            return None
        mean = self.total / self.count
        self.total, self.count = None, 0
        return mean


class MetricsFile:
    """metrics.jsonl: one JSON object per log interval. Lines past `resume_step` are dropped on resume, and
    with `evaluation_owed` its evaluation's line too (a run stopped again before its next checkpoint may have
    made it; the resume makes it again), so the file never shows the same record twice."""

    def __init__(self, output_dir: Path, resume_step: int = 0, evaluation_owed: bool = False):
        self.path = output_dir / METRICS_FILE
        if self.path.exists():
            write_metrics(self.path, [record for record in self.read() if record.get("step", 0) < resume_step
                                      or record.get("step", 0) == resume_step
                                      and not (evaluation_owed and "fid" in record)])

    def write(self, values: dict[str, Any]) -> None:
        with self.path.open("a") as file:
            file.write(json_line(values))

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line cut short by a killed run is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def json_line(record: dict[str, Any]) -> str:
    """A metrics record as a line, a NaN or infinite value as null: Python writes NaN and Infinity, which are not
    JSON, and strict readers (jq, JavaScript's, Go's) refuse the whole file for one of them (also those of a run
    logged before, rewritten at a resume)."""
    finite = {key: None if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """A metrics.jsonl of these records, one JSON object per line, renamed into place: a run killed while
    rewriting it (at each resume) would otherwise leave a history cut short."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text("".join(json_line(record) for record in records))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def log_sample_grid(trackers: Iterable[Any], grid: Image.Image, step: int) -> None:
    """Send a sample grid to the trackers that show images: the picture of samples/step-N.png (TensorBoard tiled
    the images its own way, in rows of 8 without borders)."""
    pixels = np.asarray(grid)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels  # grayscale: one channel
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({IMAGES_TAG: pixels[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({IMAGES_TAG: [pixels]}, step=step)


def smooth(values: list[float], half_width: int | None = None) -> list[float]:
    """Centred moving average: unlike a running average it does not lag behind a fast-falling loss."""
    half_width = max(1, len(values) // 50) if half_width is None else half_width
    smoothed = []
    for i in range(len(values)):
        window = values[max(0, i - half_width):i + half_width + 1]
        smoothed.append(sum(window) / len(window))
    return smoothed


def plain_log_formatter(ticker: Any) -> Any:
    """A log axis's tick labels as plain numbers (0.07, 1.12), not matplotlib's 7x10^-2: a loss is read as a
    number. matplotlib's own formatter still chooses which ticks get a label, so the minor ones don't crowd."""

    class PlainLogFormatter(ticker.LogFormatter):
        def __call__(self, value: float, position: Any = None) -> str:
            return f"{value:.3g}" if super().__call__(value, position) else ""

    return PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(3, 1))  # under a decade: every tick


def plot_metrics(records: list[dict[str, Any]], path: Path) -> bool:
    """Write `metrics_figure` as a PNG. False if there is no loss to draw."""
    figure = metrics_figure(records)
    if figure is None:
        return False
    import matplotlib.pyplot as plt

    partial = path.with_name(f".{path.name}.partial")  # renamed into place: a viewer never reads half a file
    try:
        figure.savefig(partial, dpi=100, format="png")
        os.replace(partial, path)
    except BaseException:  # a full disk: nothing half-written left behind
        partial.unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    return True


def metrics_figure(records: list[dict[str, Any]]) -> Any:
    """Loss (raw and smoothed, log scale), learning rate and, when evaluated, FID against the step: a matplotlib
    figure, or None if no loss was logged."""
    points = [r for r in records if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    evaluations = [r for r in records if isinstance(r.get("fid"), (int, float))]
    heights = [3, 1] + ([2] if evaluations else [])
    figure, axes = plt.subplots(len(heights), 1, figsize=(7, 5 + 2 * bool(evaluations)), sharex=True,
                                gridspec_kw={"height_ratios": heights})
    loss_axis, lr_axis = axes[0], axes[1]
    steps = [r["step"] for r in points]
    losses = [r["loss"] for r in points]
    logarithmic = min(losses) > 0
    if logarithmic:
        loss_axis.set_yscale("log")
        loss_axis.yaxis.set_major_formatter(plain_log_formatter(ticker))
        loss_axis.yaxis.set_minor_formatter(plain_log_formatter(ticker))
    few = len(points) <= FEW_POINTS
    marker = {"marker": "o", "markersize": 4} if few else {}
    if few:  # drawn as they are: averaging a few points flattens the curve they make
        loss_axis.plot(steps, losses, color="tab:blue", linewidth=2, label="loss", **marker)
    else:
        loss_axis.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        if logarithmic:  # smoothed in log space, as it is drawn: early large losses do not drag the curve
            smoothed = [math.exp(v) for v in smooth([math.log(loss) for loss in losses])]
        else:
            smoothed = smooth(losses)
        loss_axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label="loss (smoothed)")
    loss_axis.set_ylabel("training loss")
    loss_axis.legend(loc="upper right")
    lr_axis.plot(steps, [r.get("lr", float("nan")) for r in points], color="tab:orange", **marker)
    lr_axis.set_ylabel("learning rate")
    lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))  # 1.0 under "1e-4", not 0.000100
    if evaluations:
        axes[2].plot([r["step"] for r in evaluations], [r["fid"] for r in evaluations], color="tab:green",
                     marker="o")
        axes[2].set_ylabel("FID")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # steps are whole: no tick at 1.5
    figure.tight_layout()
    return figure


@contextlib.contextmanager
def tracker_writes(folder: str | Path):
    """Around a log to the trackers: a failed write there (a full disk) names their folder, as TensorBoard's
    writer does not."""
    try:
        yield
    except OSError as error:
        if error.filename is None:
            error.filename = f"the trackers' logs in {folder}"
        raise


def quiet_tensorboard_writer_errors() -> None:
    """TensorBoard's writer thread keeps a failed write (a full disk) for the training thread, which raises it at
    its next log or at the tracker's start, where uncond says it in one line; the thread raises it too, and Python
    prints that thread's traceback besides. Those tracebacks are left out (once per process)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook
