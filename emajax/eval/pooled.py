"""Pooled effects over seeds and probe items: means with a crossed bootstrap CI, and ratios of them.

A demo figure such as "EM effect of no defense" is a matrix ``x_si``: one value per training seed ``s``
and probe item ``i`` (e.g. the item's margin after the no-defense run of seed ``s`` minus its margin
after the control run of the same seed). Its estimate is the grand mean; its CI comes from a crossed
(two-way) bootstrap that resamples seeds and items independently, so both sources of noise — which
seed was drawn, which questions were written — widen it. With one seed only items are resampled.

``Bootstrap(n_seeds, n_items)`` fixes the draws, so every figure built on the same seeds and items
(a method's effect, no defense's effect, their ratio) is resampled *jointly*: a ratio's CI is the
percentile interval of the ratio of resampled means. numpy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Resampling weights for an [n_seeds, n_items] matrix: ``w_bs`` and ``w_bi`` count how often each seed
    and item is drawn in bootstrap replicate ``b`` (each row sums to n_seeds / n_items)."""

    n_seeds: int
    n_items: int
    n_boot: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_seeds < 1 or self.n_items < 1:
            raise ValueError(f"pooled bootstrap needs >= 1 seed and >= 1 item, got {self.n_seeds} x {self.n_items}")
        rng = np.random.default_rng([self.seed, self.n_seeds, self.n_items])
        pick_s = rng.integers(0, self.n_seeds, size=(self.n_boot, self.n_seeds)) if self.n_seeds > 1 else \
            np.zeros((self.n_boot, 1), np.int64)
        pick_i = rng.integers(0, self.n_items, size=(self.n_boot, self.n_items))
        object.__setattr__(self, "w_bs", _counts(pick_s, self.n_seeds))
        object.__setattr__(self, "w_bi", _counts(pick_i, self.n_items))

    def means(self, x_si: np.ndarray) -> np.ndarray:
        """[n_boot] grand means of ``x_si`` under the resampled seeds and items."""
        x = self._check(x_si)
        return np.einsum("bs,si,bi->b", self.w_bs, x, self.w_bi) / (self.n_seeds * self.n_items)

    def _check(self, x_si: np.ndarray) -> np.ndarray:
        x = np.asarray(x_si, np.float64)
        if x.shape != (self.n_seeds, self.n_items):
            raise ValueError(f"expected a [{self.n_seeds} seeds, {self.n_items} items] matrix, got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("pooled values must be finite")
        return x

    def summary(self, x_si: np.ndarray) -> dict:
        """{'value', 'ci_low', 'ci_high', 'n_seeds', 'n_items'}: the grand mean and its percentile CI."""
        x = self._check(x_si)
        return _summary(float(x.mean()), self.means(x), self)

    def ratio(self, num_si: np.ndarray, den_si: np.ndarray) -> dict:
        """mean(num) / mean(den) with the percentile CI of the jointly resampled ratio (value None when the
        denominator's mean is 0; replicates with a zero denominator are dropped)."""
        num, den = self._check(num_si), self._check(den_si)
        d = float(den.mean())
        mb, db = self.means(num), self.means(den)
        ok = db != 0
        if d == 0 or not ok.any():
            return {"value": None, "ci_low": None, "ci_high": None, "n_seeds": self.n_seeds,
                    "n_items": self.n_items}
        return _summary(float(num.mean()) / d, mb[ok] / db[ok], self)


def _counts(pick_bk: np.ndarray, k: int) -> np.ndarray:
    b = pick_bk.shape[0]
    out = np.zeros((b, k), np.float64)
    np.add.at(out, (np.repeat(np.arange(b), pick_bk.shape[1]), pick_bk.ravel()), 1.0)
    return out


def _summary(value: float, reps_b: np.ndarray, boot: Bootstrap) -> dict:
    lo, hi = np.quantile(reps_b, [ALPHA / 2, 1 - ALPHA / 2])
    return {"value": value, "ci_low": float(lo), "ci_high": float(hi), "n_seeds": boot.n_seeds,
            "n_items": boot.n_items}


def pooled_mean(x_si: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """The grand mean of an [n_seeds, n_items] matrix with its crossed-bootstrap 95 % CI."""
    x = np.asarray(x_si, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected an [n_seeds, n_items] matrix, got shape {x.shape}")
    return Bootstrap(x.shape[0], x.shape[1], n_boot, seed).summary(x)


def excludes_zero(s: dict | None) -> bool:
    """True when a summary's CI lies entirely above or entirely below 0."""
    return bool(s and s.get("ci_low") is not None and (s["ci_low"] > 0 or s["ci_high"] < 0))


__all__ = ["ALPHA", "Bootstrap", "excludes_zero", "pooled_mean"]
