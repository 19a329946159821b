"""What a run shows of its progress besides the loss: sample grids (previews) and FID/KID evaluations of
samples against the training images."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import UNet2DModel

from . import data, metrics, progress, run_folder, sampling, tracking
from .config import REFERENCE_STATS_FILE, TrainConfig, UsageError, counted
from .outputs import export_best
from .parts import Run, averaged_unet, off_the_clock, on_main_process

logger = logging.getLogger("uncond")  # cli shows its records on the main process only

T = TypeVar("T")

MAX_REFERENCE_IMAGES = 50_000  # the usual size of an FID reference set


def preview_sampler(run: Run) -> tuple[Any, int]:
    """The scheduler and step count of the sample grids and evaluations."""
    config = run.config
    return (sampling.make_sampler(config.sampler, run.noise_scheduler.config),
            sampling.steps_for(config.sampler, config.sample_steps, config.ddpm_num_inference_steps))


def save_sample_grid(run: Run, unet: UNet2DModel) -> Path | None:
    """Sample images with a fixed seed (grids stay comparable over the run), as a PNG and to the trackers."""
    config = run.config
    scheduler, steps = preview_sampler(run)
    stop = run.stop
    try:
        images = sampling.generate(unet, scheduler, num_images=config.eval_batch_size, num_steps=steps, seed=0,
                                   batch_size=config.eval_batch_size, device=run.accelerator.device,
                                   progress=shows_inner_bars(run),  # 1,000 DDPM steps take minutes
                                   cancelled=stop.asked if stop else None)
    except sampling.SamplingCancelled:  # a preview can take minutes; launchers kill a stopping run after 30 s
        logger.info(f"the sample grid of step {run.step} is left out: the run is stopping")
        run.preview_owed = run.step
        return None
    run.preview_owed = None
    path = run_folder.preview_path(run.output_dir, run.step)
    path.parent.mkdir(exist_ok=True)
    grid = sampling.image_grid(images)
    sampling.write_whole(grid, path)
    with tracking.tracker_writes(run.accelerator.logging_dir):
        tracking.log_sample_grid(run.accelerator.trackers, grid, run.step)
    logger.info(f"samples ({config.sampler}, {steps} steps): {path}")
    return path


def open_feature_extractor(config: TrainConfig, accelerator: Accelerator) -> metrics.FeatureExtractor | None:
    """The FID network for --eval_every_steps, on every process (each measures its share of the samples).
    Without it (no weights, no torch-fidelity) on any process: a warning, once, and no evaluations; but a
    weights file given with --inception_weights that cannot be used is an error, as any bad input."""
    if not config.eval_every_steps:
        return None
    extractor, problem = None, None
    with accelerator.main_process_first():  # a download of the weights, if needed, happens once
        try:
            extractor = metrics.inception_extractor(config.inception_weights, accelerator.device)
        except UsageError as error:
            problem = str(error)
    if accelerator.num_processes > 1:  # evaluations are collective: every process takes part, or none
        problem = next((p for p in gather_object([problem]) if p), None)
    if problem and config.inception_weights:
        raise UsageError(problem)  # it names the file
    if problem:
        logger.warning(f"--eval_every_steps: no FID/KID in this run; training goes on. {problem}")
        return None
    note = extractor.input_note
    if metrics.NOT_STANDARD in note:  # said once here; `uncond evaluate` says it with every report
        logger.warning(f"--eval_every_steps: {note[note.index(metrics.NOT_STANDARD):]}")
    return extractor


@off_the_clock
def evaluate_run(run: Run) -> None:
    """FID and KID of samples of the EMA weights (the preview sampler; image i seeded i) against the training
    images. Every process samples and measures its share of the images, so the set is the same whatever the
    process count; the main process scores them, logs to the trackers and metrics.jsonl, and keeps the best
    export with --keep_best."""
    if run.feature_extractor is None:
        return
    config, accelerator = run.config, run.accelerator
    first, end = evaluation_share(config.eval_num_images, accelerator.num_processes, accelerator.process_index)
    scheduler, steps = preview_sampler(run)
    # On one process a stop gives the evaluation up: it takes minutes (the first one also measures the training
    # images), and launchers kill a stopping run 30 s after the signal. Under several, the evaluation is
    # collective, and a process giving up alone would leave the others waiting: they finish it.
    stop = run.stop if accelerator.num_processes == 1 else None
    cancelled = stop.asked if stop else None
    try:
        with averaged_unet(run, everywhere=True) as unet:
            batches = sampling.sample_batches(unet, scheduler, num_images=end - first, num_steps=steps, seed=first,
                                              batch_size=config.eval_batch_size, device=accelerator.device,
                                              progress=shows_inner_bars(run), cancelled=cancelled)
            shares = [metrics.extract_features(run.feature_extractor, batches)] if end > first else []
            if accelerator.num_processes > 1:
                shares = gather_object(shares)  # in process order: images 0..N-1

            def score() -> metrics.Scores:
                reference = training_reference(run, cancelled)
                scores = metrics.compare(np.concatenate(shares), reference, accelerator.device)
                if config.keep_best and scores.fid < run.best_fid:
                    run.best_fid = scores.fid
                    export_best(run, unet, scores)
                return scores

            scores = on_main_process(accelerator, score)
    except sampling.SamplingCancelled:
        logger.info(f"the evaluation of step {run.step} is left out: the run is stopping (its resume makes it)")
        run.evaluation_owed = run.step
        return
    run.evaluation_owed = None
    if accelerator.is_main_process:
        values = {key: value for key, value in scores.as_dict().items() if key not in ("num_generated",
                                                                                        "num_reference")}
        with tracking.tracker_writes(run.accelerator.logging_dir):
            accelerator.log(values, step=run.step)
        run.metrics_file.write({"step": run.step, **values, "eval_images": scores.num_generated})
        logger.info(f"evaluation at step {run.step} ({scores.num_generated} images from "
                    f"{counted(accelerator.num_processes, 'process')}, {config.sampler}, {steps} steps, against "
                    f"{scores.num_reference} training images): {scores}")
    accelerator.wait_for_everyone()


def shows_inner_bars(run: Run) -> bool:
    """Progress bars inside the training bar: on each machine's main process, and only on a terminal (a second
    bar is drawn with cursor movements, which a redirected log keeps as escape codes in its text)."""
    return run.accelerator.is_local_main_process and progress.on_terminal()


def until_cancelled(batches: Iterable[T], cancelled: Callable[[], bool] | None) -> Iterator[T]:
    for batch in batches:
        if cancelled is not None and cancelled():
            raise sampling.SamplingCancelled
        yield batch


def evaluation_share(num_images: int, num_processes: int, process_index: int) -> tuple[int, int]:
    """The images [first, end) this process samples for an evaluation: contiguous, nearly equal shares."""
    return process_index * num_images // num_processes, (process_index + 1) * num_images // num_processes


def training_reference(run: Run, cancelled: Callable[[], bool] | None = None) -> metrics.FeatureStats:
    """Feature statistics of the training images (centre crops), computed once and kept in the output folder.
    Raises sampling.SamplingCancelled between two batches once `cancelled()` says so."""
    cache = run.batches.images.cache  # --streaming runs are refused --eval_every_steps (config.validate)
    indices = data.spread_choice(range(len(cache)), MAX_REFERENCE_IMAGES)
    gray = run.batches.channels == 1 and not cache.all_gray  # colour images, which a 1-channel model learns as gray
    key = f"{run.feature_extractor.identity}|{cache.folder.name}|{len(indices)} images|{run.config.resolution}px"
    key += "|as gray" if gray else ""  # (the other keys are as they were: statistics kept by runs under way stay valid)

    path = run.output_dir / REFERENCE_STATS_FILE

    def compute() -> metrics.FeatureStats:  # called where `path` holds no statistics of `key`
        if stats_key(path) is not None and math.isfinite(run.best_fid):
            # another network's weights, or images measured otherwise: the FIDs before are not comparable
            logger.warning("the FID reference was measured anew (other images, or other feature weights): the FIDs "
                           "logged before were measured against the earlier one; --keep_best chooses among those "
                           "measured from here")
            run.best_fid = math.inf
        logger.info(f"computing FID reference statistics of {len(indices)} training images"
                    + (", as gray as the model learns them" if gray else ""))
        batches = data.centre_crops((cache.image(i) for i in indices), run.config.resolution,
                                    run.config.eval_batch_size, gray=gray)
        batches = metrics.with_progress(until_cancelled(batches, cancelled), len(indices), "training",
                                        shown=shows_inner_bars(run))
        return metrics.feature_stats(metrics.extract_features(run.feature_extractor, batches),
                                     run.feature_extractor.name)

    # (it advised XDG_CACHE_HOME, which moves no run's folder; trial 68 F5)
    return metrics.cached_stats(path, key, compute, "free some space in the output folder: each evaluation "
                                "measures them again until they are kept")[0]


def stats_key(path: Path) -> str | None:
    """What the statistics kept in `path` were computed from; None where there are none, or unreadable ones."""
    try:
        return metrics.load_stats(path).key if path.is_file() else None
    except UsageError:
        return None
