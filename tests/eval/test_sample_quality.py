"""KID with its spread, the bootstrap FID interval and precision/recall/density/coverage, against independent
computations on constructed feature sets."""
import numpy as np
import pytest
from cleanfid.fid import kernel_distance

import eval.sample_quality as sample_quality_module
from eval.fid import Features, Stats, frechet_distance
from eval.sample_quality import _fid_to, fid_interval, kid, prdc_metrics, sample_quality


def gaussian(n: int, d: int = 16, scale: float = 1.0, shift: float = 0.0, seed: int = 0) -> Features:
    return Features(np.random.default_rng(seed).normal(shift, scale, (n, d)))


@pytest.mark.parametrize("gram_limit", [sample_quality_module.GRAM_LIMIT, 0], ids=["kernel-matrices", "per-subset"])
def test_kid_equals_clean_fid_and_reports_its_spread(gram_limit, monkeypatch):
    monkeypatch.setattr(sample_quality_module, "GRAM_LIMIT", gram_limit)
    gen, ref = gaussian(300, shift=0.3, seed=1), gaussian(400, seed=2)
    np.random.seed(7)
    theirs = kernel_distance(gen.array, ref.array, num_subsets=20, max_subset_size=100)
    mean, std = kid(gen, ref, num_subsets=20, max_subset_size=100, seed=7)
    assert mean == pytest.approx(theirs, rel=1e-12)
    assert std > 0
    _, small_std = kid(gaussian(150, shift=0.3, seed=1), gaussian(150, seed=2), num_subsets=10)
    assert small_std > 0  # subsets of half the set differ, unlike clean-fid's whole-set subsets
    same_mean, _ = kid(gaussian(300, seed=3), ref, num_subsets=20, max_subset_size=100)
    assert abs(same_mean) < mean  # same distribution: near zero, far below a shifted one


def test_fast_fid_against_fixed_reference_equals_the_frechet_distance():
    gen, ref = gaussian(120, scale=1.3, seed=4), gaussian(500, seed=5)
    assert _fid_to(Stats.of(ref))(gen.array) == pytest.approx(frechet_distance(Stats.of(gen), Stats.of(ref)),
                                                               rel=1e-8)


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    ref = Stats.of(gaussian(2000, seed=6))
    widths = []
    for n in (200, 1600):
        point, (lo, hi) = fid_interval(gaussian(n, shift=0.2, seed=n), ref, num_boot=60)
        assert point == pytest.approx(frechet_distance(Stats.of(gaussian(n, shift=0.2, seed=n)), ref))
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]  # ~1/sqrt(N): 8x the samples, about a third of the width
    with pytest.raises(ValueError, match="level"):
        fid_interval(gaussian(50), ref, level=1.5)


def knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.: a sample is in the manifold of a set if within some member's k-NN radius."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # index 0 is the point itself
    rr, rf = radii(real), radii(fake)
    d = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # (real, fake)
    precision = (d < rr[:, None]).any(axis=0).mean()
    recall = (d < rf[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_prdc_shows_a_collapsed_generator_as_low_recall():
    ref = gaussian(400, d=2, seed=8)
    good, collapsed = gaussian(400, d=2, seed=9), gaussian(400, d=2, scale=0.15, seed=10)
    fair, narrow = prdc_metrics(good, ref), prdc_metrics(collapsed, ref)
    for fake, got in ((good, fair), (collapsed, narrow)):
        precision, recall = knn_precision_recall(ref.array, fake.array, 5)
        assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
    assert narrow["precision"] > 0.95 and narrow["recall"] < 0.3 and narrow["coverage"] < 0.3
    assert fair["recall"] > 0.8 and fair["coverage"] > 0.8
    with pytest.raises(ValueError, match="nearest_k"):
        prdc_metrics(gaussian(6, d=2), ref)


def test_prdc_compares_equal_set_sizes_whatever_the_reference_count():
    gen, ref = gaussian(120, d=2, scale=1.2, seed=14), gaussian(600, d=2, seed=15)
    got = prdc_metrics(gen, ref)
    precision, recall = knn_precision_recall(ref.array[:120], gen.array, 5)
    assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
    assert got == prdc_metrics(Features(gen.array), Features(ref.array[:120]))
    assert prdc_metrics(ref, gen) == prdc_metrics(Features(ref.array[:120]), gen)  # a larger generated set too
    whole = knn_precision_recall(ref.array, gen.array, 5)[0]
    assert whole != pytest.approx(precision)  # the whole reference would have given another precision


def test_sample_quality_collects_every_metric():
    out = sample_quality(gaussian(150, seed=11), gaussian(150, seed=12), num_boot=10)
    assert set(out) == {"fid", "fid_ci", "kid", "kid_std", "precision", "recall", "density", "coverage", "num_boot"}
    assert out["fid_ci"][0] < out["fid"] < out["fid_ci"][1]
    with pytest.warns(UserWarning, match="recorded as null"):
        few = sample_quality(gaussian(6, seed=13), gaussian(150, seed=12), num_boot=5)
    assert few["recall"] is None and few["kid"] is not None
