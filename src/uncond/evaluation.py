"""`uncond evaluate`: FID, KID, precision and recall of generated images (a folder, or sampled from a
model) against real ones (a dataset, a folder, or cached statistics). Every check comes before any
sampling; reference statistics are cached, so a second evaluation against the same images is quick.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from . import data, decoding, environment, metrics, run_folder, sampling, sources
from .cache import REFERENCE_STATS_DIR
from .config import RUN_CONFIG_FILE, EvaluateConfig, UsageError, counted

logger = logging.getLogger("uncond")


@dataclass
class Report:
    scores: metrics.Scores
    generated: str  # what was measured and how it was resized
    reference: str
    features: str
    resolution: int  # the size both sides were measured at, before Inception's 299 px
    sampled: dict[str, Any] | None = None  # sampler, steps, seed: where GENERATED was a model

    def as_dict(self) -> dict[str, Any]:
        """`--json`: every key always there (null where a score was not computed, or nothing was sampled), so that
        a script reads them without checking."""
        return {**vars(self.scores), "resolution": self.resolution,
                **(self.sampled or dict.fromkeys(("sampler", "steps", "seed"))),
                "generated": self.generated, "reference": self.reference, "features": self.features}

    def __str__(self) -> str:
        return (f"generated: {self.generated}\nreference: {self.reference}\nfeatures: {self.features}\n"
                f"{self.scores}")


@dataclass
class Generated:
    batches: Iterator[np.ndarray]
    count: int
    resolution: int
    description: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files of a folder, filled as read
    sampled: dict[str, Any] | None = None  # sampler, steps and seed, where the images are a model's samples
    gray: bool = False  # a 1-channel model's samples, or a folder of gray images only: measured against gray ones


def evaluate(config: EvaluateConfig) -> Report:
    if environment.launched_processes() > 1:  # every process would sample and measure the whole set
        raise UsageError("uncond evaluate runs as one process; to sample on several GPUs, run `accelerate launch "
                         "-m uncond sample MODEL --output_dir DIR`, then `uncond evaluate DIR`")
    generated = Path(config.generated).expanduser()
    sampling.refuse_unexported_run(generated, f"GENERATED {config.generated}",
                                   ", or pass the folder of images to measure")
    refuse_preview_folder(generated, "GENERATED", f"pass the run's folder {generated.resolve().parent} to sample "
                          "its model")
    device = sampling.pick_device(config.device)
    reference_source = open_reference(config.reference)
    generated = open_generated(config)  # a model that cannot be loaded is said before the Inception weights
    extractor = metrics.inception_extractor(config.inception_weights, device)
    if generated.count < 2:  # said before the reference images are measured (minutes on a large set)
        raise UsageError(f"GENERATED {config.generated}: {counted(generated.count, 'image')}; FID needs at least 2")
    resolution = config.resolution or generated.resolution
    reference, reference_note = reference_stats(config, reference_source, resolution, extractor, generated.gray)
    if reference.extractor not in (None, extractor.name):
        raise UsageError(f"--reference {config.reference} holds statistics of {reference.extractor} features, "
                         f"not {extractor.name}")
    batches = metrics.with_progress(generated.batches, generated.count, "generated")
    features = metrics.extract_features(extractor, batches)
    if len(features) < 2:
        raise UsageError(f"GENERATED {config.generated}: {counted(len(features), 'readable image')}"
                         f"{skipped_note(generated.skipped)}; FID needs at least 2")
    scores = metrics.compare(features, reference, device)
    # (not in a training run's evaluations: those compare equal image counts by construction)
    notes = [scores.note, metrics.small_sample_note(*features.shape)]
    scores = dataclasses.replace(scores, note="; ".join(note for note in notes if note) or None)
    return Report(scores, generated.description + skipped_note(generated.skipped), reference_note,
                  extractor.input_note, resolution, generated.sampled)


# ------------------------------------------------------------------------------------------------ generated


def open_generated(config: EvaluateConfig) -> Generated:
    """GENERATED as image batches: a folder's images, or a model's samples (drawn lazily, as they are measured)."""
    path = Path(config.generated).expanduser()
    if path.is_dir() and not sampling.holds_model(path):  # (checkpoint-N/unet too, as `uncond sample` takes it)
        return generated_folder(path, config)
    model, scheduler, steps = sampling.open_for_sampling(config, config.generated)
    size = model.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size

    def sampled() -> Iterator[np.ndarray]:  # said when it starts, after the reference's checks and statistics
        sampling.log_sampling(config, model, steps)
        yield from sampling.sample_batches(model.unet, scheduler, **{**sampling.sampling_options(config, steps),
                                                                     "progress": False})
    batches = sampled()
    resolution = config.resolution or min(height, width)
    as_they_are = height == width == resolution
    return Generated(batches if as_they_are else as_folders_are(batches, resolution, config.batch_size),
                     config.num_images, resolution, f"{config.num_images} images sampled from {model.description} "
                     f"with {config.sampler}, {steps} steps, seed {config.seed}, at the model's {width}x{height} px"
                     + ("" if as_they_are else f", {resizing(resolution)}"),
                     sampled={"sampler": config.sampler, "steps": steps, "seed": config.seed},
                     gray=model.unet.config.in_channels == 1)  # what sampling draws


def as_folders_are(batches: Iterator[np.ndarray], resolution: int, batch_size: int) -> Iterator[np.ndarray]:
    """A model's uint8 NHWC samples resized and cropped as the images of a folder are (data.image_batches: the
    shorter side to `resolution`, bilinear, then the centre square), so that a model and the folder of its
    samples measure the same (a non-square model's samples too: they were measured whole, and the FIDs differed)."""
    def decoded() -> Iterator[np.ndarray]:
        for batch in batches:
            for image in batch:
                yield decoding.decode_image(sampling.to_pil(image), resolution, preserve_precision=False)[0]
    return data.centre_crops(decoded(), resolution, batch_size)


def generated_folder(path: Path, config: EvaluateConfig) -> Generated:
    """A folder's images; of a folder `uncond sample` wrote, only its numbered images (not a --grid put there)."""
    source, what = numbered_images_only(sources.open_named_source(str(path), "GENERATED"), path)
    resolution = config.resolution or native_size(source, path)
    count = min(len(source.records), config.num_images)
    gray = all_gray(data.spread_choice(source.records, config.num_images), resolution)  # the images measured
    skipped: list[tuple[str, str]] = []  # filled as the batches are read
    batches = data.image_batches(source, resolution, config.batch_size, config.num_images, skipped)
    # Files, not images: which of them can be read is known once they are (skipped_note says how many could not).
    description = f"{counted(count, 'image file')} from {what}, {resizing(resolution)}"
    return Generated(batches, count, resolution, description, skipped, gray=gray)


def refuse_preview_folder(path: Path, name: str, instead: str) -> None:
    if run_folder.is_preview_folder(path):
        raise UsageError(f"{name} {path}: the sample grids of a training run, each tiling many small samples, not "
                         f"samples; {instead}")


def numbered_images_only(source: sources.Source, path: Path) -> tuple[sources.Source, str]:
    """Of a folder `uncond sample` wrote, its numbered images (not a --grid put there); and the source in words."""
    numbered = [record for record in source.records
                if Path(record.name).parent == path and sampling.is_numbered_image(Path(record.name))]
    if numbered and len(numbered) < len(source.records):
        return (dataclasses.replace(source, records=numbered),
                f"the numbered images of the folder {path} (as `uncond sample` names them; its other images left "
                "out)")
    return source, f"the folder {path}"


def native_size(source: sources.Source, path: Path) -> int:
    """The shorter side of the first image of `source` that can be read."""
    for record in source.records:
        try:
            with record.open() as image:
                return min(image.size)
        except Exception:  # noqa: BLE001 - unreadable: skipped here as when measuring
            continue
    raise UsageError(f"GENERATED {path}: none of its {len(source.records)} image files can be read")


def all_gray(records: Sequence[sources.Record], resolution: int) -> bool:
    """Whether every readable image of `records` is gray as measuring decodes it (a gray palette, or gray RGB
    pixels, too): only then is the reference measured as gray. One black or gray sample among colour ones made it
    so when the first image decided. A colour folder is told at its first colour image; a gray mode is read from
    the header, and only gray images stored as colour are decoded through."""
    for record in records:
        try:
            with record.open() as image:
                if image.mode not in decoding.GRAY_MODES and not decoding.decode_image(image, resolution, False)[1]:
                    return False
        except Exception:  # noqa: BLE001 - unreadable: skipped here as when measuring
            continue
    return True


def skipped_note(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    return f"; {counted(len(skipped), 'unreadable image')} skipped ({skipped[0][0]}: {skipped[0][1]})"


def resizing(resolution: int) -> str:
    return (f"resized (shorter side to {resolution} px, bilinear, as for training) and centre-cropped to "
            f"{resolution}x{resolution} where not already that size")


# ------------------------------------------------------------------------------------------------ reference


def open_reference(reference: str) -> sources.Source | None:
    """The reference images' source, checked; None for a statistics file (read later)."""
    if reference.endswith(".npz"):
        if not Path(reference).expanduser().is_file():
            raise UsageError(f"--reference {reference}: no such statistics file")
        return None
    path = Path(reference).expanduser()
    if path.is_dir() and (path / RUN_CONFIG_FILE).is_file():  # checkpoints hold one too
        raise UsageError(f"--reference {reference}: a training run's output folder (its images are sample grids and "
                         "plots, not real images); pass the training images' folder or dataset")
    refuse_preview_folder(path, "--reference", "pass the training images' folder or dataset")
    if sampling.holds_model(path):
        raise UsageError(f"--reference {reference}: a model; the reference is real images: pass a folder or dataset of "
                         "them (a model's samples go as GENERATED)")
    source = sources.open_named_source(reference, "--reference")
    return numbered_images_only(source, path)[0] if path.is_dir() else source


def reference_stats(config: EvaluateConfig, source: sources.Source | None, resolution: int,
                    extractor: metrics.FeatureExtractor, gray: bool = False) -> tuple[metrics.FeatureStats, str]:
    """Statistics of the reference images at `resolution`, from a file, the cache, or computed and cached. With
    `gray` (gray generated images) colour images are measured as their luma: gray samples against colour would
    put a floor under the FID that no model of them could get below (training's reference does the same)."""
    if source is None:
        stats = metrics.load_stats(Path(config.reference).expanduser())
        made_at = check_statistics_file(config.reference, stats, resolution, extractor, gray)
        kind = "mu and sigma only: FID alone" if stats.features is None else "with features"
        # The file cannot say whether colour images went into it measured as they are (a gray dataset's do too)
        colour_note = ("; the generated images are gray and these statistics were not measured as gray: if they are "
                       "of colour images, pass the images as --reference to measure them as gray"
                       if gray and not (stats.key or "").endswith("|as gray") else "")
        return stats, (f"statistics file {config.reference} ({stats.count or 'an unknown number of'} images"
                       f"{f' at {made_at} px' if made_at else ''}; {kind}){colour_note}")
    count = min(len(source.records), config.reference_num_images)
    key = "|".join([extractor.identity, source.fingerprint, f"{resolution}px",
                    f"{config.reference_num_images} at most"] + (["as gray"] if gray else []))
    digest = hashlib.sha256(key.encode(errors="surrogateescape")).hexdigest()[:16]
    cache = cache_folder() / f"{slug(config.reference)}-{resolution}px-{digest}.npz"
    skipped: list[tuple[str, str]] = []

    def compute() -> metrics.FeatureStats:
        batches = data.image_batches(source, resolution, config.batch_size, config.reference_num_images, skipped,
                                     gray)
        batches = metrics.with_progress(batches, count, "reference")
        features = metrics.extract_features(extractor, batches)
        if len(features) < 2:  # a covariance needs two; nothing is cached
            raise UsageError(f"--reference {config.reference}: {counted(len(features), 'readable image')}"
                             f"{skipped_note(skipped)}; FID needs at least 2")
        return metrics.feature_stats(features, extractor.name)

    stats, kept = metrics.cached_stats(cache, key, compute, "set XDG_CACHE_HOME to a writable folder to keep them")
    as_gray = ", as gray (the generated images are gray)" if gray else ""
    where = {"read": f"read from the cache {cache}", "saved": f"cached in {cache}",
             "not kept": "not kept (the cache cannot be written)"}[kept]  # (it said "cached in": trial 64 F7)
    note = f"{stats.count} images of {source.description}, {resizing(resolution)}{as_gray}; statistics {where}"
    return stats, note + skipped_note(skipped)


def check_statistics_file(reference: str, stats: metrics.FeatureStats, resolution: int,
                          extractor: metrics.FeatureExtractor, gray: bool) -> int | None:
    """A statistics file uncond wrote (a cached one, or a run's fid_reference.npz) records what it was computed
    from: statistics of images at another size, of other weights' features, or of colour images as gray for colour
    samples, would give a wrong FID without a word. Returns the resolution it was computed at (None for
    pytorch-fid's files, which do not say)."""
    if not stats.key:
        return None
    if not stats.key.startswith(f"{extractor.identity}|"):
        raise UsageError(f"--reference {reference}: its statistics were computed with other Inception weights than "
                         "this evaluation's; pass the same --inception_weights, or the images themselves as "
                         "--reference")
    if stats.key.endswith("|as gray") and not gray:
        raise UsageError(f"--reference {reference}: its statistics were measured as gray (for a 1-channel model: "
                         "colour images among them as their luma), and the generated images are in colour; pass the "
                         "images themselves as --reference")
    made_at = re.search(r"\|(\d+)px(\||$)", stats.key)
    if made_at is None:
        return None
    if int(made_at.group(1)) != resolution:
        raise UsageError(f"--reference {reference}: its statistics are of images at {made_at.group(1)} px, and "
                         f"this evaluation measures at {resolution} px; pass --resolution {made_at.group(1)}, or the "
                         "images themselves as --reference")
    return int(made_at.group(1))


def cache_folder() -> Path:
    """Where reference statistics are cached: beside the decoded images (~/.cache/uncond, or $XDG_CACHE_HOME)."""
    return data.cache_root(None) / REFERENCE_STATS_DIR


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name.rstrip("/")).name or name).strip("-") or "reference"
