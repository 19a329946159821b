"""How close generated images are to real ones: FID, KID, precision and recall over network features.

Images come in as batches of uint8 NHWC arrays (what `sampling` yields and `data` decodes); grayscale
is repeated to RGB. The standard feature network is the FID InceptionV3 (TensorFlow's 2015-12-05
graph, as `pt_inception-2015-12-05-6726825d.pth`), taken from torch-fidelity so the numbers compare
with published ones; any `FeatureExtractor` (a small digit classifier, a test's stand-in) works the
same way. Reference statistics are kept in pytorch-fid's .npz format (mu, sigma), with a sample of
the features added for KID and precision/recall.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from unittest import mock

import numpy as np
import torch

from . import cpu_threads
from .cache import mark_used
from .config import STAGING_PREFIX, UsageError, first_line
from .progress import progress_bar

logger = logging.getLogger("uncond")

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity (and torchmetrics, through it) keeps the same file under its own name.
INCEPTION_FILES = (INCEPTION_FILE, "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_NAME = "inception-v3-2015-12-05/pool3"
NOT_STANDARD = "NOT the standard FID weights"  # in a FeatureExtractor's note of other weights
INCEPTION_NOTE = ("InceptionV3 pool3 features (2048-d; TensorFlow FID weights pt_inception-2015-12-05, "
                  "torch-fidelity's network); each image enters as 8-bit RGB (grayscale repeated) and is resized "
                  "to 299x299 inside the network with TensorFlow-1-compatible bilinear interpolation, as in the "
                  "original FID code")
TORCH_FIDELITY = "torch-fidelity==0.4.0"
MAX_STORED_FEATURES = 10_000  # features kept with reference statistics, for KID and precision/recall
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # torch-fidelity's defaults
NEIGHBOURS = 3  # k of the k-NN manifolds in precision/recall (Kynkäänniemi et al. 2019)


# ------------------------------------------------------------------------------------------------ features


@dataclass
class FeatureExtractor:
    """A network from uint8 RGB images (N, 3, H, W) to feature vectors (N, D)."""
    name: str  # the feature space; statistics record it, and only those of the same space are compared
    network: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    input_note: str  # how images reach the features, for the output
    weights: str = ""  # a fingerprint of the weights file: statistics cached with other weights are not reused

    @property
    def identity(self) -> str:
        """What cached statistics must have been computed with to be reused."""
        return f"{self.name}|{self.weights}"


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, batches: Iterable[np.ndarray]) -> np.ndarray:
    """Features of every image in `batches` (uint8 NHWC, 1 or 3 channels), as a float64 (N, D) array; (0, 0)
    when there is none (the callers say which set, and why)."""
    features = []
    # on a CPU, InceptionV3 runs on the cores other processes leave free, as sampling does (cpu_threads)
    with cpu_threads.governed_threads(extractor.device, "measuring features") as threads:
        for batch in batches:
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, 3, -1, -1)
            features.append(extractor.network(pixels.to(extractor.device)).double().cpu().numpy())
            threads.adjust()
    if not features:
        return np.empty((0, 0))
    features = np.concatenate(features)
    if not np.isfinite(features).all():  # NaN features made FID a LinAlgError traceback, or NaN
        raise UsageError(f"the feature network ({extractor.name}) gave non-finite features: its weights are "
                         f"not the FID weights; pass --inception_weights with {INCEPTION_FILE} ({INCEPTION_URL})")
    return features


def with_progress(batches: Iterable[np.ndarray], total: int, what: str, shown: bool = True) -> Iterator[np.ndarray]:
    """`batches` of images, with a progress bar (and ETA) over their feature extraction if `shown`."""

    with progress_bar(total=total, desc=f"features of {what} images", unit="img", leave=False,
                      disable=not shown) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def inception_extractor(weights: str | None, device: torch.device) -> FeatureExtractor:
    """The FID InceptionV3 with the standard weights (found, downloaded or given), on `device`. Both of its parts
    missing are said together: one at a time, the second came out in a second run."""
    problems = []
    try:
        module = torch_fidelity_inception()
    except UsageError as error:
        problems.append(str(error))
    try:
        path = find_inception_weights(weights)
    except UsageError as error:
        problems.append(str(error))
    if problems:
        raise UsageError("; and ".join(problems))
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a weights file, truncated, or pickled code: refused
        # torch's own reasons are no help here: a bare key from the unpickler, or advice to load with
        # weights_only=False, which would run whatever code the file holds.
        raise UsageError(f"{path} is not a PyTorch weights file uncond can read (damaged, another format, or "
                         f"pickled objects, which are never unpickled); the FID weights are {INCEPTION_URL}") from None
    # torch-fidelity's constructor reads its weights itself: with torch.hub from its URL, or a given file
    # unpickled in full. Handing it the state dict read above with weights_only=True means a weights file
    # can never run code.
    with mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: state_dict):
        try:
            network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        except (RuntimeError, TypeError) as error:  # TypeError: a file holding something other than a state dict
            raise UsageError(f"{path} does not hold the FID InceptionV3 weights ({first_line(error)}); they are "
                             f"{INCEPTION_URL}") from None
    network.to(device)
    fingerprint, sha256 = file_digests(path)
    note = INCEPTION_NOTE
    if not sha256.startswith(INCEPTION_SHA256_PREFIX):  # a file of the right shape, but other values
        note += (f". {NOT_STANDARD}: {path}'s SHA-256 begins {sha256[:8]}, the standard file's "
                 f"{INCEPTION_SHA256_PREFIX}; these scores are not comparable with published FID")
    return FeatureExtractor(INCEPTION_NAME, lambda pixels: network(pixels)[0], device, note, weights=fingerprint)


def file_digests(path: Path) -> tuple[str, str]:
    """A short fingerprint of the file's bytes (cached statistics record it) and their SHA-256 (the standard
    weights are known by its first digits), in one read: about 0.4 s for the 92 MB Inception weights."""
    fingerprint, sha256 = hashlib.blake2b(digest_size=8), hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            fingerprint.update(chunk)
            sha256.update(chunk)
    return fingerprint.hexdigest(), sha256.hexdigest()


def inception_cache_path() -> Path:
    """Where pytorch-fid, torch-fidelity and torchmetrics keep downloaded weights: torch.hub's cache."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(weights: str | None) -> Path:
    """--inception_weights, else the file in torch.hub's cache under either library's name, else downloaded
    there (unless HF_HUB_OFFLINE=1, uncond's offline switch). Missing: one line naming the file and where."""
    if weights:
        return Path(weights).expanduser()
    folder = inception_cache_path()
    for name in INCEPTION_FILES:
        if (folder / name).is_file():
            return folder / name
    target = folder / INCEPTION_FILE
    place = (f"download {INCEPTION_URL} and put it at {target}, or pass --inception_weights PATH")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"FID needs the Inception weights file {INCEPTION_FILE}, which is not on this machine "
                         f"(offline: HF_HUB_OFFLINE is set): {place}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), hash_prefix=INCEPTION_SHA256_PREFIX)
    except Exception as error:  # noqa: BLE001 - offline, blocked, or a bad download: say what to do by hand
        raise UsageError(f"FID needs the Inception weights file {INCEPTION_FILE}, which is not on this machine "
                         f"and could not be downloaded ({first_line(error)}): {place}") from None
    return target


def torch_fidelity_inception() -> types.ModuleType:
    """torch-fidelity's `feature_extractor_inceptionv3` module, imported without `torch_fidelity/__init__.py`.

    That __init__ imports all of torch-fidelity's extractors, some of which import torchvision, which uncond
    cannot depend on (its PyPI build pulls a CUDA build of PyTorch, and fails to import beside other builds).
    The InceptionV3 module needs only torch and two small helper modules, so it is imported through a bare
    package entry, which is removed again afterwards.
    """
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"FID needs torch-fidelity's InceptionV3 network: pip install --no-deps {TORCH_FIDELITY} "
                         "(--no-deps: its torchvision requirement would replace PyTorch with a CUDA build)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    before = {key: module for key, module in sys.modules.items() if key.split(".")[0] == "torch_fidelity"}
    sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(name)
    finally:
        for key in [key for key in sys.modules if key.split(".")[0] == "torch_fidelity"]:
            del sys.modules[key]
        sys.modules.update(before)


# ------------------------------------------------------------------------------------------------ statistics


@dataclass
class FeatureStats:
    """Mean and covariance of a set's features, and up to MAX_STORED_FEATURES of the features themselves."""
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: np.ndarray | None  # None for statistics files with only mu and sigma (pytorch-fid's)
    extractor: str | None  # None when the file does not say (pytorch-fid's: Inception pool3)
    key: str = ""  # what the statistics were computed from, for caches


def feature_stats(features: np.ndarray, extractor: str, key: str = "") -> FeatureStats:
    stored = features
    if len(features) > MAX_STORED_FEATURES:
        keep = np.sort(np.random.default_rng(0).choice(len(features), MAX_STORED_FEATURES, replace=False))
        stored = features[keep]
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features),
                        stored.astype(np.float32), extractor, key)


def save_stats(stats: FeatureStats, path: Path) -> None:
    """pytorch-fid's .npz (mu, sigma), plus count, extractor, key and features; written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{STAGING_PREFIX}{path.name}")  # (run_folder removes it, left by a kill)
    try:
        with staging.open("wb") as file:
            np.savez(file, mu=stats.mu, sigma=stats.sigma, count=stats.count, extractor=stats.extractor or "",
                     key=stats.key, **({"features": stats.features} if stats.features is not None else {}))
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a part written before a full disk, or an interrupt
            staging.unlink(missing_ok=True)
        raise


def load_stats(path: Path) -> FeatureStats:
    """A statistics .npz (ours or pytorch-fid's); never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as data:
            values = {name: data[name] for name in data.files}
    except Exception as error:  # noqa: BLE001 - not an .npz, or one holding pickled objects
        raise UsageError(f"{path}: not a statistics file ({first_line(error)})") from None
    if "mu" not in values or "sigma" not in values:
        raise UsageError(f"{path} holds {', '.join(values) or 'nothing'}; statistics files hold mu and sigma")
    if not (np.isfinite(values["mu"]).all() and np.isfinite(values["sigma"]).all()):
        raise UsageError(f"{path} holds non-finite statistics; compute them again from the images")
    extractor = str(values.get("extractor", "")) or None
    return FeatureStats(values["mu"].astype(np.float64), values["sigma"].astype(np.float64),
                        int(values.get("count", 0)), values.get("features"), extractor, str(values.get("key", "")))


def cached_stats(path: Path, key: str, compute: Callable[[], FeatureStats],
                 to_keep_them: str) -> tuple[FeatureStats, str]:
    """Statistics from `path` when it was computed from `key`, else computed and saved there. Returns them and
    where they are: "read" from the cache, "saved" in it, or "not kept" (it cannot be written: the warning ends
    with `to_keep_them`, the caller's advice)."""
    if path.is_file():
        try:
            stats = load_stats(path)
            if stats.key == key:
                mark_used(path)
                return stats, "read"
        except UsageError:
            pass  # unreadable: computed afresh and replaced
    stats = compute()
    stats.key = key
    try:
        save_stats(stats, path)
    except OSError as error:  # a read-only or full cache: the statistics, minutes of work, are used all the same
        logger.warning(f"could not keep the statistics in {path.parent} ({error.strerror or error}); they are used "
                       f"without being kept ({to_keep_them})")
        return stats, "not kept"
    return stats, "saved"


# ------------------------------------------------------------------------------------------------ metrics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians (FID: Heusel et al. 2017):
    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^1/2).

    tr((sigma1 sigma2)^1/2) is computed as the sum of the square roots of the eigenvalues of the symmetric
    sigma1^1/2 sigma2 sigma1^1/2, which has the same eigenvalues: symmetric eigendecompositions are faster
    and steadier than scipy's sqrtm (pytorch-fid's way) and need no fallback for singular covariances.
    """
    diff = mu1 - mu2
    values, vectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((product + product.T) / 2).clip(min=0)).sum()
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)
    return max(distance, 0.0)  # a distance: rounding can take identical sets a hair below zero


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 between samples x (m, d) and y (n, d) with the kernel k(a, b) = (a.b / d + 1)^3."""
    d, m, n = x.shape[1], len(x), len(y)
    k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
                 + (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1)) - 2 * k_xy.mean())


def kernel_inception_distance(generated: np.ndarray, reference: np.ndarray, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, device: torch.device | str = "cpu",
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased polynomial-kernel MMD^2 averaged over
    random subsets, as torch-fidelity computes it. Returns (mean, standard deviation over subsets)."""
    size = min(subset_size, len(generated), len(reference))
    if size < 2:
        raise UsageError("KID needs at least 2 images in each set")
    x_all = torch.as_tensor(generated, dtype=torch.float64, device=device)
    y_all = torch.as_tensor(reference, dtype=torch.float64, device=device)
    if size == len(generated) == len(reference):
        subsets = 1  # every subset is the whole of both sets: one value, no spread
    rng = np.random.default_rng(seed)
    values = [polynomial_mmd2(x_all[torch.from_numpy(rng.choice(len(x_all), size, replace=False))],
                              y_all[torch.from_numpy(rng.choice(len(y_all), size, replace=False))])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def kth_neighbour_distances(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point."""
    radii = [torch.cdist(features[i:i + chunk], features).kthvalue(k + 1, dim=1).values  # +1: itself, at 0
             for i in range(0, len(features), chunk)]
    return torch.cat(radii)


def fraction_covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """The fraction of `points` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(points[i:i + chunk], centres) <= radii).any(dim=1) for i in range(0, len(points), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(generated: np.ndarray, reference: np.ndarray, *, k: int = NEIGHBOURS,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the fraction of generated images
    inside the real images' k-NN manifold (a ball around each real image reaching its k-th nearest neighbour);
    recall, the fraction of real images inside the generated images' manifold."""
    if min(len(generated), len(reference)) <= k:
        raise UsageError(f"precision/recall need more than {k} images in each set")
    x = torch.as_tensor(generated, dtype=torch.float32, device=device)
    y = torch.as_tensor(reference, dtype=torch.float32, device=device)
    precision = fraction_covered(x, y, kth_neighbour_distances(y, k))
    recall = fraction_covered(y, x, kth_neighbour_distances(x, k))
    return precision, recall


@dataclass
class Scores:
    fid: float
    kid: float | None
    kid_std: float | None
    precision: float | None
    recall: float | None
    num_generated: int
    num_reference: int | None  # None: a statistics file that does not say
    note: str | None = None  # why a score is missing, for people; not in as_dict, whose numbers trackers log

    def as_dict(self) -> dict[str, Any]:
        return {name: value for name, value in vars(self).items() if value is not None and name != "note"}

    def __str__(self) -> str:
        parts = [f"FID {self.fid:.3f}"]
        if self.kid is not None:
            parts.append(f"KID {self.kid:.5f} ± {self.kid_std:.5f}")
        if self.precision is not None:
            parts.append(f"precision {self.precision:.3f}, recall {self.recall:.3f}")
        return " | ".join(parts + [self.note] * bool(self.note))


def small_sample_note(count: int, dimensions: int) -> str | None:
    """Said of a FID from fewer images than feature dimensions (a singular covariance), whose bias upwards is
    large: FID falls as the image count grows, long after, too."""
    if count >= dimensions:
        return None
    return (f"FID of {count} images is biased upwards (fewer than its {dimensions} feature dimensions): compare FIDs "
            "of equal image counts")


def compare(generated: np.ndarray, reference: FeatureStats, device: torch.device | str = "cpu") -> Scores:
    """FID of generated features against reference statistics; KID and precision/recall too when the
    reference keeps features (statistics files with only mu and sigma allow FID alone)."""
    if reference.mu.shape[0] != generated.shape[1]:
        raise UsageError(f"the reference statistics have {reference.mu.shape[0]} dimensions, the features "
                         f"{generated.shape[1]}: they come from different networks")
    if len(generated) < 2:
        raise UsageError("FID needs at least 2 generated images")
    fid = frechet_distance(generated.mean(axis=0), np.cov(generated, rowvar=False), reference.mu, reference.sigma)
    kid = kid_std = precision = recall = note = None
    if reference.features is not None and len(reference.features) > NEIGHBOURS and len(generated) > NEIGHBOURS:
        kid, kid_std = kernel_inception_distance(generated, reference.features, device=device)
        precision, recall = precision_recall(generated, reference.features, device=device)
    elif reference.features is not None:  # (without features the reference's description says FID alone)
        note = f"KID and precision/recall need more than {NEIGHBOURS} images per set"
    return Scores(fid, kid, kid_std, precision, recall, len(generated), reference.count or None, note)
