"""Metrics: FID, KID and precision/recall against direct computations; statistics files; the feature
networks (a tiny stand-in, and torch-fidelity's InceptionV3 imported without torchvision)."""

from __future__ import annotations

import importlib.util
import pickle
import sys
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import make_tiny_extractor
from uncond import metrics
from uncond.config import UsageError


def random_covariance(rng: np.random.Generator, dimensions: int) -> np.ndarray:
    factor = rng.normal(size=(dimensions, dimensions))
    return factor @ factor.T / dimensions + 0.1 * np.eye(dimensions)


def test_fid_of_a_set_against_itself_is_about_zero():
    features = np.random.default_rng(0).normal(size=(400, 16))
    scores = metrics.compare(features, metrics.feature_stats(features, "test"))
    assert abs(scores.fid) < 1e-8 and scores.precision == scores.recall == 1.0
    shifted = metrics.compare(features + 0.5, metrics.feature_stats(features, "test"))
    assert shifted.fid == pytest.approx(16 * 0.25, rel=1e-6)  # only the means differ: |mu1 - mu2|^2


def test_fid_of_fewer_images_than_feature_dimensions_says_it_is_biased():
    """Trial 41: FID came out for 3 images with no word of its bias (4,739 against 2,428 for 500 images of the
    same distribution, on 2048 dimensions)."""
    assert metrics.small_sample_note(2048, 2048) is None
    assert metrics.small_sample_note(1000, 2048) == ("FID of 1000 images is biased upwards (fewer than its 2048 "
                                                     "feature dimensions): compare FIDs of equal image counts")


def test_fid_matches_scipy_sqrtm_on_known_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    sigma1, sigma2 = random_covariance(rng, 12), random_covariance(rng, 12)
    direct = (np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
              - 2 * np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(direct, rel=1e-9)
    # diagonal covariances have a closed form: sum((sqrt(a) - sqrt(b))^2)
    a, b = rng.uniform(0.5, 2, size=12), rng.uniform(0.5, 2, size=12)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-9)


def test_fid_of_samples_approaches_the_gaussians_distance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 4))
    y = rng.normal(size=(20000, 4)) * 2 + 1  # N(1, 4 I): FID = 4 * 1 + 4 * (1 - 2)^2 = 8
    fid = metrics.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fid == pytest.approx(8.0, abs=0.2)


def test_fid_handles_singular_covariances():
    # fewer samples than dimensions, as with a few hundred images and 2048 Inception features
    features = np.random.default_rng(3).normal(size=(20, 64))
    assert abs(metrics.compare(features, metrics.feature_stats(features, "test")).fid) < 1e-4  # traces are ~64


def unbiased_mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    kernel = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(6, 5)) + 0.3
    expected = unbiased_mmd2_by_loops(x, y)
    assert metrics.polynomial_mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(expected, rel=1e-12)
    # one subset holding both whole sets is the estimator itself; order does not matter
    y7 = np.vstack([y, rng.normal(size=(1, 5))])
    mean, std = metrics.kernel_inception_distance(x, y7, subset_size=7)
    assert mean == pytest.approx(unbiased_mmd2_by_loops(x, y7), rel=1e-12) and std == 0


def test_kid_averages_subsets_and_separates_distributions():
    rng = np.random.default_rng(5)
    x, same, other = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1
    same_mean, same_std = metrics.kernel_inception_distance(x, same, subsets=20, subset_size=100)
    other_mean, _ = metrics.kernel_inception_distance(x, other, subsets=20, subset_size=100)
    assert abs(same_mean) < 3 * same_std + 1e-3 and same_std > 0
    assert other_mean > 10 * abs(same_mean)
    # the subsets are drawn from a seed: the same images give the same KID at every evaluation
    assert metrics.kernel_inception_distance(x, other, subsets=20, subset_size=100)[0] == other_mean
    assert metrics.kernel_inception_distance(x, other, subsets=20, subset_size=100, seed=1)[0] != other_mean


def test_the_neighbourhood_radius_is_the_kth_nearest_other_point():
    """Kynkäänniemi et al.'s k (3): a ball one neighbour further inflates precision and recall."""
    line = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert metrics.kth_neighbour_distances(line, 2).tolist() == [3.0, 2.0, 3.0, 4.0, 7.0]
    assert metrics.kth_neighbour_distances(line, 2, chunk=2).tolist() == [3.0, 2.0, 3.0, 4.0, 7.0]


def test_precision_and_recall_on_known_sets():
    rng = np.random.default_rng(6)
    real = rng.uniform(size=(400, 2))
    left = real[real[:, 0] < 0.5] + 1e-4  # on the left half of the data
    generated = np.vstack([left, rng.uniform(size=(len(left), 2)) + 10])  # and as many far off
    precision, recall = metrics.precision_recall(generated, real)
    assert precision == 0.5
    assert 0.45 < recall < 0.65  # the left half of the data, and a little beyond its edge
    assert metrics.precision_recall(real, real) == (1.0, 1.0)
    collapsed = real[:5].repeat(40, axis=0)  # mode collapse: precise, little recall
    precision, recall = metrics.precision_recall(collapsed, real)
    assert precision == 1.0 and recall < 0.2


def test_statistics_files_round_trip_and_pytorch_fid_files_give_fid_alone(tmp_path):
    features = np.random.default_rng(7).normal(size=(50, 6))
    stats = metrics.feature_stats(features, "tiny-test-features", key="k")
    metrics.save_stats(stats, tmp_path / "ours.npz")
    loaded = metrics.load_stats(tmp_path / "ours.npz")
    assert np.allclose(loaded.mu, stats.mu) and np.allclose(loaded.sigma, stats.sigma)
    assert loaded.count == 50 and loaded.extractor == "tiny-test-features" and loaded.key == "k"
    assert np.allclose(loaded.features, features)
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # what pytorch-fid --save-stats writes
    fid_only = metrics.compare(features, metrics.load_stats(tmp_path / "pytorch_fid.npz"))
    assert abs(fid_only.fid) < 1e-8 and fid_only.kid is None and fid_only.precision is None


def test_statistics_files_are_never_unpickled(tmp_path):
    np.savez(tmp_path / "objects.npz", mu=np.array([object()], dtype=object), sigma=np.eye(1))
    with pytest.raises(UsageError, match="not a statistics file"):
        metrics.load_stats(tmp_path / "objects.npz")
    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(UsageError, match="statistics files hold mu and sigma"):
        metrics.load_stats(tmp_path / "other.npz")


def test_cached_statistics_are_computed_once_per_key(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return metrics.feature_stats(np.random.default_rng(len(calls)).normal(size=(10, 3)), "test")

    first, kept = metrics.cached_stats(tmp_path / "cache.npz", "key-a", compute, "")
    again, kept_again = metrics.cached_stats(tmp_path / "cache.npz", "key-a", compute, "")
    assert (kept, kept_again) == ("saved", "read") and len(calls) == 1 and np.allclose(first.mu, again.mu)
    _, kept_other = metrics.cached_stats(tmp_path / "cache.npz", "key-b", compute, "")
    assert kept_other == "saved" and len(calls) == 2
    # where they cannot be kept, the caller's advice (a run's said "set XDG_CACHE_HOME", which moves no run's
    # output folder; trial 68 F5)
    (tmp_path / "a-file").write_text("")
    _, kept_nowhere = metrics.cached_stats(tmp_path / "a-file" / "cache.npz", "key-a", compute, "free some space")
    assert kept_nowhere == "not kept" and caplog.messages[-1].endswith("used without being kept (free some space)")


def test_a_stand_in_extractor_works_through_the_same_interface():
    extractor = make_tiny_extractor()
    rng = np.random.default_rng(8)
    gray = rng.integers(0, 256, (5, 12, 12, 1), dtype=np.uint8)
    features = metrics.extract_features(extractor, [gray[:3], gray[3:]])
    assert features.shape == (5, 8) and features.dtype == np.float64
    # grayscale is the same image as RGB with three equal channels
    assert np.allclose(features, metrics.extract_features(extractor, [gray.repeat(3, axis=-1)]))
    assert metrics.extract_features(extractor, []).shape == (0, 0)  # the caller says which set is empty


def test_dimension_mismatch_is_refused():
    with pytest.raises(UsageError, match="different networks"):
        metrics.compare(np.zeros((4, 8)), metrics.feature_stats(np.random.default_rng(0).normal(size=(5, 3)), "x"))


# ---------------------------------------------------------------------------------------- Inception

needs_torch_fidelity = pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                                          reason="torch-fidelity is not installed (pip install --no-deps "
                                                 "torch-fidelity==0.4.0)")


def random_inception_weights(path):
    """A weights file of the right shapes with random values (the real file cannot be downloaded here)."""
    module = metrics.torch_fidelity_inception()
    with mock.patch.object(module, "load_state_dict_from_url", lambda *args, **kwargs: None), \
            mock.patch.object(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        network = module.FeatureExtractorInceptionV3("random", ["2048"])
    torch.save(network.state_dict(), path)
    return path


@needs_torch_fidelity
def test_inception_comes_from_torch_fidelity_without_torchvision(tmp_path):
    weights = random_inception_weights(tmp_path / "random-inception.pth")
    extractor = metrics.inception_extractor(str(weights), torch.device("cpu"))
    images = np.random.default_rng(9).integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)
    features = metrics.extract_features(extractor, [images])
    assert features.shape == (2, 2048) and np.isfinite(features).all()
    assert extractor.name == metrics.INCEPTION_NAME and "299x299" in extractor.input_note
    # random values: the report says these are not the standard weights (it called them the TensorFlow FID ones)
    assert "NOT the standard FID weights" in extractor.input_note and "not comparable" in extractor.input_note
    assert "torchvision" not in sys.modules
    assert "torch_fidelity" not in sys.modules  # the bare package entry is gone again


@needs_torch_fidelity
def test_statistics_cached_with_other_inception_weights_are_not_reused_and_broken_weights_are_said(tmp_path):
    weights = random_inception_weights(tmp_path / "a.pth")
    again = metrics.inception_extractor(str(weights), torch.device("cpu")).identity
    assert again == metrics.inception_extractor(str(weights), torch.device("cpu")).identity
    state = torch.load(weights, weights_only=True)
    torch.save({name: torch.full_like(value, float("nan")) if value.is_floating_point() else value
                for name, value in state.items()}, tmp_path / "nan.pth")
    broken = metrics.inception_extractor(str(tmp_path / "nan.pth"), torch.device("cpu"))
    assert broken.identity != again  # the evaluation cache's key holds it
    images = np.random.default_rng(9).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(UsageError, match="gave non-finite features: its weights are not the FID weights"):
        metrics.extract_features(broken, [images])  # it was a LinAlgError traceback from FID


@needs_torch_fidelity
def test_inception_weights_are_read_without_running_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"weight": Payload()}, protocol=2))
    with pytest.raises(UsageError, match="is not a PyTorch weights file") as refused:
        metrics.inception_extractor(str(path), torch.device("cpu"))
    assert "weights_only" not in str(refused.value)  # torch's advice to unpickle it in full is not passed on
    path.write_bytes(b"hello\n")  # torch's reason for this one was a bare "101"
    with pytest.raises(UsageError, match=r"damaged, another format, or pickled objects.*the FID weights are"):
        metrics.inception_extractor(str(path), torch.device("cpu"))
    torch.save({"unrelated": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(UsageError, match="does not hold the FID InceptionV3 weights"):
        metrics.inception_extractor(str(tmp_path / "other.pth"), torch.device("cpu"))


def test_missing_inception_weights_say_which_file_goes_where(no_inception_weights):
    with pytest.raises(UsageError) as error:
        metrics.inception_extractor(None, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message
    assert f"put it at {no_inception_weights}" in message
    assert "download https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" \
           "pt_inception-2015-12-05-6726825d.pth" in message
    assert "or pass --inception_weights PATH" in message


def test_inception_weights_in_torch_fidelitys_name_are_found(no_inception_weights):
    theirs = no_inception_weights.with_name("weights-inception-2015-12-05-6726825d.pth")
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"")
    assert metrics.find_inception_weights(None) == theirs
