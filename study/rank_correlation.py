"""Does one metric predict another across quantizers? Spearman's rho over variants, with a bootstrap interval.

Each variant contributes the mean of its runs (seeds). The interval is a two-level bootstrap: variants are drawn
with replacement (the quantizers are the sample), then each drawn variant's runs (its seed noise), and rho is
recomputed on the resampled means; the interval is the percentile range of those rhos.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr

MIN_VARIANTS = 3  # a rank correlation over fewer variants says nothing


def _rho(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of ``x``, ``y`` (B, n): Pearson's r of their average ranks; NaN for a
    row where either side is constant (no ranking)."""
    rx, ry = rankdata(x, axis=-1), rankdata(y, axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / den, np.nan)


def spearman_interval(points: dict[str, list[tuple[float, float]]], resamples: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict | None:
    """``points``: variant -> its runs' (x, y). Returns rho and its p-value on the variant means, the bootstrap
    ``level`` interval, and the number of variants; None with fewer than ``MIN_VARIANTS`` variants or no ranking."""
    runs = [np.asarray(pts, dtype=float).reshape(-1, 2) for pts in points.values() if len(pts)]
    if len(runs) < MIN_VARIANTS:
        return None
    means = np.array([g.mean(axis=0) for g in runs])
    if np.isnan(_rho(means[:, 0], means[:, 1])):
        return None
    # two-level bootstrap, vectorised: runs padded to the largest variant; a slot's draws beyond its size are masked
    sizes = np.array([len(g) for g in runs])
    padded = np.zeros((len(runs), sizes.max(), 2))
    for i, g in enumerate(runs):
        padded[i, : len(g)] = g
    rng = np.random.default_rng(seed)
    variant = rng.integers(len(runs), size=(resamples, len(runs)))  # (B, V): the variants drawn
    n = sizes[variant][..., None]  # (B, V, 1)
    pick = np.floor(rng.random((resamples, len(runs), sizes.max())) * n).astype(int)  # run draws within each
    mask = np.arange(sizes.max()) < n
    values = padded[variant[..., None], pick]  # (B, V, m, 2)
    resampled = (values * mask[..., None]).sum(2) / n  # (B, V, 2): each drawn variant's resampled mean
    draws = _rho(resampled[..., 0], resampled[..., 1])
    draws = draws[~np.isnan(draws)]
    tail = (1 - level) / 2
    low, high = np.quantile(draws, [tail, 1 - tail]) if len(draws) else (float("nan"), float("nan"))
    ref = spearmanr(means[:, 0], means[:, 1])
    return {"rho": float(ref.statistic), "p": float(ref.pvalue), "ci": [float(low), float(high)],
            "variants": len(runs), "runs": int(sizes.sum())}
