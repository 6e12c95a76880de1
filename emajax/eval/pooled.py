"""Pooled effects over seeds and probe items: means with crossed random-effects CIs, and ratios of them.

A demo figure such as "EM effect of no defense" is a matrix ``x_si``: one value per training seed ``s``
and probe item ``i`` (e.g. the item's margin after the no-defense run of seed ``s`` minus its margin
after the control run of the same seed). Seeds and items are both random draws (another set of seeds, other
questions written on the same themes), so the estimate — the grand mean — has the variance of a two-way
crossed random-effects design, ``x_si = mu + a_s + b_i + e_si``::

    Var(mean) = var_a / S + var_b / I + var_e / (S I)

It is estimated from the two-way ANOVA mean squares (``E[MS_seeds] = var_e + I var_a``,
``E[MS_items] = var_e + S var_b``, ``E[MS_resid] = var_e``), a component estimated below 0 counted as 0,
and the 95 % CI is ``mean ± t(df) se`` with Satterthwaite's degrees of freedom for that sum of mean
squares (the quasi-F standard error of subjects x items designs, Clark 1973). With 3 seeds and a seed
component that dominates, df is near 2 and t near 4.3: a bootstrap that resamples 3 seeds cannot show that
width (it sees 10 distinct seed draws and shrinks their spread by (S - 1) / S). One seed gives the items-only
interval (df = I - 1); one item the seeds-only one.

A ratio of two means over the same seeds and items (the share of no defense's EM effect a method removes)
gets Fieller's interval: the ``r`` with ``(mean(num) - r mean(den))^2 <= t^2 Var(mean(num - r den))``,
the variance taken with the same components as at the estimate. When the denominator's own CI reaches 0
the set is unbounded and the bounds are None (``unbounded`` True). numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 0.05
METHOD = ("mean over seeds x items; 95 % CI = mean ± t(df)·se, se² from the crossed random-effects ANOVA "
          "(seed, item and residual mean squares; negative components as 0), df by Satterthwaite; ratios by "
          "Fieller")


def _matrix(x_si) -> np.ndarray:
    x = np.asarray(x_si, np.float64)
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"expected an [n_seeds, n_items] matrix with >= 1 seed and item, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("pooled values must be finite")
    return x


def _mean_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear mean squares (seeds, items, residual) of x with y and their degrees of freedom; a factor with
    one level has none (0 df, value 0)."""
    s, i = x.shape

    def parts(z):
        g = z.mean()
        r, c = z.mean(1, keepdims=True) - g, z.mean(0, keepdims=True) - g
        return r, c, z - g - r - c

    (rx, cx, ex), (ry, cy, ey) = parts(x), parts(y)
    df = np.array([s - 1, i - 1, (s - 1) * (i - 1)], np.float64)
    ss = np.array([i * float((rx * ry).sum()), s * float((cx * cy).sum()), float((ex * ey).sum())])
    return np.divide(ss, df, out=np.zeros(3), where=df > 0), df


def _weights(ms: np.ndarray, df: np.ndarray) -> np.ndarray:
    """Coefficients c of the mean squares in ``S I Var(mean) = c · ms`` after setting negative components to 0."""
    ms_s, ms_i, ms_e = ms
    has_s, has_i = df[0] > 0, df[1] > 0
    if has_s and has_i:
        use_s, use_i = ms_s > ms_e, ms_i > ms_e
        return np.array([float(use_s), float(use_i), 1.0 - use_s - use_i])
    # one factor with a single level: the other's mean square alone (its residual is confounded with it)
    return np.array([float(has_s), float(has_i), 0.0])


def _var_df(ms: np.ndarray, df: np.ndarray, w: np.ndarray, n: int) -> tuple[float, float]:
    terms = w * ms
    total = float(terms.sum())
    denom = float(sum(t * t / d for t, d in zip(terms, df) if d > 0 and t != 0))
    return max(total, 0.0) / n, (total * total / denom if denom > 0 else float("inf"))


def _df_out(df: float) -> float | None:
    """Degrees of freedom as reported (None when infinite: no variance left to estimate)."""
    return round(df, 2) if np.isfinite(df) else None


def _t(df: float) -> float:
    return float(stats.t.ppf(1 - ALPHA / 2, df)) if np.isfinite(df) else float(stats.norm.ppf(1 - ALPHA / 2))


def _se_seeds(ms: np.ndarray, df: np.ndarray, n: int) -> float | None:
    """The part of the standard error a rerun with other seeds on the same items redraws:
    sqrt((var_a / S + var_e / (S I))) = sqrt(max(MS_seeds, MS_resid) / (S I)); None with one seed."""
    return float(np.sqrt(max(ms[0], ms[2]) / n)) if df[0] > 0 else None


def _out(value, lo, hi, x: np.ndarray, se, df, se_seeds=None, **extra) -> dict:
    return {"value": value, "ci_low": lo, "ci_high": hi, "n_seeds": int(x.shape[0]), "n_items": int(x.shape[1]),
            "se": se, "df": df, "se_seeds": se_seeds, **extra}


def pooled_mean(x_si) -> dict:
    """The grand mean of an [n_seeds, n_items] matrix with its 95 % crossed random-effects CI:
    {'value', 'ci_low', 'ci_high', 'n_seeds', 'n_items', 'se', 'df', 'se_seeds'} (no CI from a single value;
    ``se_seeds``: the seeds' share of the standard error, what a rerun on the same items redraws)."""
    x = _matrix(x_si)
    value = float(x.mean())
    if x.size == 1:
        return _out(value, None, None, x, None, None)
    ms, df = _mean_squares(x, x)
    var, nu = _var_df(ms, df, _weights(ms, df), x.size)
    se = float(np.sqrt(var))
    half = _t(nu) * se
    return _out(value, value - half, value + half, x, se, _df_out(nu), _se_seeds(ms, df, x.size))


def pooled_ratio(num_si, den_si) -> dict:
    """mean(num) / mean(den) over the same seeds and items with Fieller's 95 % CI (see the module doc);
    value None when mean(den) is 0, bounds None with ``unbounded`` True when the CI is not an interval."""
    num, den = _matrix(num_si), _matrix(den_si)
    if num.shape != den.shape:
        raise ValueError(f"ratio of a {num.shape} and a {den.shape} matrix: they must be the same seeds x items")
    n_bar, d_bar = float(num.mean()), float(den.mean())
    if d_bar == 0:
        return _out(None, None, None, num, None, None, unbounded=True)
    r = n_bar / d_bar
    if num.size == 1:
        return _out(r, None, None, num, None, None, unbounded=True)
    z = num - r * den
    ms_z, df = _mean_squares(z, z)
    w = _weights(ms_z, df)
    var_z, nu = _var_df(ms_z, df, w, num.size)
    q = {k: float(w @ _mean_squares(a, b)[0]) / num.size
         for k, (a, b) in {"nn": (num, num), "nd": (num, den), "dd": (den, den)}.items()}
    t2 = _t(nu) ** 2
    a, b, c = d_bar ** 2 - t2 * q["dd"], n_bar * d_bar - t2 * q["nd"], n_bar ** 2 - t2 * q["nn"]
    nu_out = _df_out(nu)
    se = float(np.sqrt(var_z)) / abs(d_bar)
    se_s = _se_seeds(ms_z, df, num.size)
    se_s = None if se_s is None else se_s / abs(d_bar)
    if a <= 0:
        return _out(r, None, None, num, se, nu_out, se_s, unbounded=True)
    root = float(np.sqrt(max(b * b - a * c, 0.0)))
    lo, hi = (b - root) / a, (b + root) / a
    return _out(r, min(lo, r), max(hi, r), num, se, nu_out, se_s, unbounded=False)


def excludes_zero(s: dict | None) -> bool:
    """True when a summary's CI lies entirely above or entirely below 0."""
    return bool(s and s.get("ci_low") is not None and (s["ci_low"] > 0 or s["ci_high"] < 0))


__all__ = ["ALPHA", "METHOD", "excludes_zero", "pooled_mean", "pooled_ratio"]
