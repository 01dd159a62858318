"""Generation metrics that carry their own noise, all from the same Inception features as FID.

- KID (clean-fid's estimator: unbiased polynomial-kernel MMD^2 averaged over random subsets) with its std over
  the subsets, so a KID difference can be weighed against the estimator's spread;
- a bootstrap 95% interval for FID, resampling the generated features;
- precision, recall, density and coverage (Naeem et al. 2020, the ``prdc`` package): a collapsed tokenizer's
  narrow, easy samples show as low recall / coverage instead of hiding behind a good FID.
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np

from .fid import Features, Stats

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
BOOTSTRAP = 100
NEAREST_K = 5
GRAM_LIMIT = 5000  # features per set up to which KID's kernel matrices are held whole (<= 200 MB each)


def kid(gen: Features, ref: Features, num_subsets: int = KID_SUBSETS, max_subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> tuple[float, float]:
    """(KID, std over subsets). The draws are clean-fid's ``kernel_distance`` draws under ``np.random.seed(seed)``,
    so for the same subset size the mean equals clean-fid's value on the same features. Subsets hold at most
    ``max_subset_size`` and at most half the smaller set: clean-fid's whole-set subsets (n <= 1000) would all be
    the same images and give a std of 0. Sets of up to ``GRAM_LIMIT`` features get their kernel matrices once and
    each subset indexes them (100 subsets of 1,000 from 2,000 reuse every entry ~25 times)."""
    f1, f2 = gen.array.astype(np.float64), ref.array.astype(np.float64)
    d = f1.shape[1]
    m = min(max_subset_size, max(2, min(len(f1), len(f2)) // 2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {len(f1)} and {len(f2)}")

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1) ** 3

    whole = max(len(f1), len(f2)) <= GRAM_LIMIT
    if whole:
        k_rr, k_gg, k_rg = kernel(f2, f2), kernel(f1, f1), kernel(f2, f1)
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        ix = rng.choice(len(f2), m, replace=False)
        iy = rng.choice(len(f1), m, replace=False)
        if whole:
            a, b = k_rr[np.ix_(ix, ix)] + k_gg[np.ix_(iy, iy)], k_rg[np.ix_(ix, iy)]
        else:
            x, y = f2[ix], f1[iy]
            a, b = kernel(x, x) + kernel(y, y), kernel(x, y)
        values[i] = ((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m
    return float(values.mean()), float(values.std(ddof=1)) if num_subsets > 1 else 0.0


def _fid_to(ref: Stats):
    """FID of centred feature sets against fixed reference statistics, with the reference's square root computed
    once: ``tr (S1 S2)^1/2 = tr (R S1 R)^1/2`` for ``R = S2^1/2``, whose non-zero eigenvalues are those of
    ``(A R)(A R)' / (n - 1)`` or ``(A R)'(A R) / (n - 1)`` (whichever is smaller) of the centred features ``A``."""
    w, v = np.linalg.eigh(ref.sigma)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    trace_ref = float(np.trace(ref.sigma))

    def fid(features: np.ndarray) -> float:
        n = len(features)
        mu = features.mean(0)
        centred = features - mu
        projected = centred @ root
        small = projected @ projected.T if n <= projected.shape[1] else projected.T @ projected  # same spectrum
        eig = np.linalg.eigvalsh(small / (n - 1))
        eig[eig < 1e-12 * eig.max()] = 0  # rounding noise of a rank-deficient matrix, whose roots would add up
        tr_cross = np.sqrt(eig).sum()
        diff = mu - ref.mu
        return float(diff @ diff + (centred * centred).sum() / (n - 1) + trace_ref - 2 * tr_cross)

    return fid


def fid_interval(gen: Features, ref: Stats, num_boot: int = BOOTSTRAP, level: float = 0.95,
                 seed: int = 0) -> tuple[float, tuple[float, float]]:
    """(FID, (lo, hi)): a bootstrap interval from ``num_boot`` resamples of the generated features.

    Resampling with replacement repeats images, which inflates FID (fewer distinct samples), so the raw bootstrap
    quantiles sit above the estimate; the interval is their spread re-centred on the point estimate:
    ``FID + (q_lo - mean, q_hi - mean)``.
    """
    if not 0 < level < 1 or num_boot < 2:
        raise ValueError(f"need 0 < level < 1 and num_boot >= 2, got {level}, {num_boot}")
    features = gen.array.astype(np.float64)
    fid = _fid_to(ref)
    point = fid(features)  # the Frechet distance, with the reference's root already at hand
    rng = np.random.default_rng(seed)
    boot = np.array([fid(features[rng.integers(0, len(features), len(features))]) for _ in range(num_boot)])
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    shift = point - boot.mean()
    return point, (float(lo + shift), float(hi + shift))


def prdc_metrics(gen: Features, ref: Features, nearest_k: int = NEAREST_K) -> dict:
    """Precision, recall, density and coverage of the generated features against the reference (k-NN balls), on
    equal set sizes (the first ``min(len)`` of each, as Naeem et al. and Kynkaanniemi et al. measure): k-NN radii
    shrink as a set grows, so unequal sizes would make precision depend on the reference count (docs/demo.md)."""
    from prdc import compute_prdc

    n = min(len(gen.array), len(ref.array))
    if n < nearest_k + 2:
        raise ValueError(f"precision/recall need at least nearest_k + 2 = {nearest_k + 2} images per set")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        out = compute_prdc(real_features=ref.array[:n].astype(np.float64),
                           fake_features=gen.array[:n].astype(np.float64), nearest_k=nearest_k)
    return {k: float(v) for k, v in out.items()}


def sample_quality(gen: Features, ref: Features, num_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Every metric of this module, as a flat dict: ``fid``, ``fid_ci``, ``kid``, ``kid_std``, ``precision``,
    ``recall``, ``density``, ``coverage``."""
    point, interval = fid_interval(gen, Stats.of(ref), num_boot, seed=seed)
    kid_mean, kid_std = kid(gen, ref, seed=seed)
    if min(len(gen.array), len(ref.array)) < NEAREST_K + 2:
        warnings.warn(f"precision/recall/density/coverage need at least {NEAREST_K + 2} images per set; "
                      "recorded as null", stacklevel=2)
        manifold = dict.fromkeys(("precision", "recall", "density", "coverage"))
    else:
        manifold = prdc_metrics(gen, ref)
    return {"fid": point, "fid_ci": list(interval), "kid": kid_mean, "kid_std": kid_std, **manifold,
            "num_boot": num_boot}
