"""Rank statistics for validating and comparing EM instruments: AUROC with a pair-bootstrap CI, Spearman's
rank correlation with a Fisher-z CI. numpy and scipy only (no jax), so reports can use them.

* **AUROC** of a score separating positives (known misaligned answers) from negatives (known aligned
  ones): the Mann-Whitney probability that a random positive scores above a random negative, ties counting
  one half. The answers come in pairs (an aligned and a misaligned answer to the same question, whose
  scores are correlated), so the 95 % CI is a percentile bootstrap that resamples whole pairs; unpaired
  inputs resample each class on its own (stratified). ``paired_win_rate`` is the share of pairs whose
  positive scores above its negative.
* **Spearman** rho (Pearson correlation of the average ranks) with the 95 % CI ``tanh(atanh(rho) ± z se)``,
  ``se = sqrt((1 + rho²/2) / (n - 3))`` (Bonett & Wright 2000, the variance for Spearman's rho; needs n >= 4).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

ALPHA = 0.05


def _auc_from_ranks(ranks_bn: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """AUROC per row of average ranks whose first ``n_pos`` columns are the positives."""
    return (ranks_bn[..., :n_pos].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc(pos: Sequence[float], neg: Sequence[float], *, paired: bool = False, n_boot: int = 2000,
          seed: int = 0) -> dict:
    """{'value', 'ci_low', 'ci_high', 'n_pos', 'n_neg', 'paired'}: AUROC of scores ``pos`` (should be
    higher) against ``neg`` with a 95 % bootstrap CI (``paired``: pos[i] and neg[i] belong together and
    are resampled together)."""
    p, q = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if p.ndim != 1 or q.ndim != 1 or p.size == 0 or q.size == 0:
        raise ValueError(f"auroc needs two non-empty 1-d score lists, got shapes {p.shape} and {q.shape}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
        raise ValueError("auroc scores must be finite")
    if paired and p.size != q.size:
        raise ValueError(f"paired auroc needs as many positives as negatives, got {p.size} and {q.size}")
    m, n = p.size, q.size
    value = float(_auc_from_ranks(stats.rankdata(np.concatenate([p, q])), m, n))
    out = {"value": value, "ci_low": None, "ci_high": None, "n_pos": m, "n_neg": n, "paired": bool(paired)}
    if n_boot and m > 1 and n > 1:
        rng = np.random.default_rng(seed)
        if paired:
            idx = rng.integers(0, m, size=(n_boot, m))
            pi, qi = idx, idx
        else:
            pi, qi = rng.integers(0, m, size=(n_boot, m)), rng.integers(0, n, size=(n_boot, n))
        ranks = stats.rankdata(np.concatenate([p[pi], q[qi]], axis=1), axis=1)
        lo, hi = np.quantile(_auc_from_ranks(ranks, m, n), [ALPHA / 2, 1 - ALPHA / 2])
        out.update(ci_low=float(lo), ci_high=float(hi))
    return out


def paired_win_rate(pos: Sequence[float], neg: Sequence[float], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Share of pairs with pos[i] > neg[i] (ties count one half), with a bootstrap CI over pairs."""
    from emajax.eval.stats import summarize

    p, q = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"paired scores must be two 1-d lists of one length, got {p.shape} and {q.shape}")
    return summarize((p > q) + 0.5 * (p == q), n_boot=n_boot, seed=seed)


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """{'value', 'ci_low', 'ci_high', 'n', 'se_z'}: Spearman's rho of x and y with its 95 % Fisher-z CI
    (Bonett-Wright variance); CI None below 4 points or when a variable is constant (value None then)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d lists of one length, got {a.shape} and {b.shape}")
    n = int(a.size)
    out = {"value": None, "ci_low": None, "ci_high": None, "n": n, "se_z": None}
    if n < 2:
        return out
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return out
    rho = float(np.corrcoef(ra, rb)[0, 1])
    out["value"] = rho
    if n >= 4:
        se = float(np.sqrt((1 + rho * rho / 2) / (n - 3)))
        z = float(np.arctanh(np.clip(rho, -1 + 1e-12, 1 - 1e-12)))
        half = float(stats.norm.ppf(1 - ALPHA / 2)) * se
        out.update(ci_low=float(np.tanh(z - half)), ci_high=float(np.tanh(z + half)), se_z=se)
    return out


__all__ = ["ALPHA", "auroc", "paired_win_rate", "spearman"]
