"""Bootstrap confidence intervals for eval metrics (rates and means over answers).

Percentile bootstrap, seeded so a report is reproducible. With ``groups`` the resampling is by cluster
(e.g. question id): answers to one question are correlated, and resampling questions gives the honest,
wider interval when there are few questions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], *, groups: Sequence | None = None, n_boot: int = 2000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """(low, high) percentile CI of the mean of ``values``; (nan, nan) when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        idx_bn = rng.integers(0, v.size, size=(n_boot, v.size))
        means_b = v[idx_bn].mean(axis=1)
    else:
        g = np.asarray(groups)
        if g.shape[0] != v.size:
            raise ValueError(f"groups has {g.shape[0]} entries for {v.size} values")
        _, inv = np.unique(g, return_inverse=True)
        k = int(inv.max()) + 1
        sums_k = np.bincount(inv, weights=v, minlength=k)
        counts_k = np.bincount(inv, minlength=k).astype(np.float64)
        pick_bk = rng.integers(0, k, size=(n_boot, k))
        means_b = sums_k[pick_bk].sum(axis=1) / counts_k[pick_bk].sum(axis=1)
    lo, hi = np.quantile(means_b, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def summarize(values: Sequence[float], *, groups: Sequence | None = None, n_boot: int = 2000,
              alpha: float = 0.05, seed: int = 0) -> dict:
    """{'value', 'ci_low', 'ci_high', 'n'}: the mean with its bootstrap CI (value None when n == 0).

    For a rate pass 0/1 values. The dict is what results JSON files store for every metric.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    lo, hi = bootstrap_ci(v, groups=groups, n_boot=n_boot, alpha=alpha, seed=seed)
    return {"value": float(v.mean()), "ci_low": lo, "ci_high": hi, "n": int(v.size)}
