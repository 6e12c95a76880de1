"""Pooled effects over seeds and probe items: means with crossed random-effects CIs, and ratios of them.

A demo figure such as "EM effect of no defense" is a matrix ``x_si``: one value per training seed ``s``
and probe item ``i`` (e.g. the item's margin after the no-defense run of seed ``s`` minus its margin
after the control run of the same seed). Seeds and items are both random draws (another set of seeds, other
questions written on the same themes), so the estimate — the grand mean — has the variance of a two-way
crossed random-effects design, ``x_si = mu + a_s + b_i + e_si``::

    Var(mean) = var_a / S + var_b / I + var_e / (S I)

It is estimated from the two-way ANOVA mean squares (``E[MS_seeds] = var_e + I var_a``,
``E[MS_items] = var_e + S var_b``, ``E[MS_resid] = var_e``) as two parts, and the 95 % CI is
``mean ± t(df) se`` with Satterthwaite's degrees of freedom for that sum of mean squares (the quasi-F
standard error of subjects x items designs, Clark 1973):

* the **seed part** ``var_a / S + var_e / (S I) = E[MS_seeds] / (S I)`` is always kept, estimated by
  ``max(MS_seeds, MS_resid)`` (a seed component never below 0) and always carrying the seeds' own S - 1
  degrees of freedom, also when MS_resid stands in for it. Setting an estimated-zero seed component to 0
  and giving the rest MS_resid's (S - 1)(I - 1) df (the rule before) let a 3-seed run whose MS_seeds fell
  below MS_resid by chance claim df ~95 instead of ~6: its coverage, given that event, falls to ~0.85-0.92
  where the measured demo components sit (I var_a / var_e ~ 0.5);
* the **item part** ``var_b / I = (MS_items - MS_resid) / (S I)``, counted as 0 when negative.

In simulation (``tests/test_report.py``; 3 and 10 seeds, 96 items, the measured item and residual
components, var_a from 0 to ~15 var_e / I) this covers >= 93 % everywhere and >= 95 % at and below the
measured seed component, at the price of a slightly wider interval when seeds do not matter. With 3 seeds
and a seed component that dominates, df is near 2 and t near 4.3: a bootstrap that resamples 3 seeds
cannot show that width (it sees 10 distinct seed draws and shrinks their spread by (S - 1) / S). One seed
gives the items-only interval (df = I - 1: it says nothing about another seed); one item the seeds-only one.

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
          "(seed part max(MS_seeds, MS_resid) with S - 1 df always kept, item part MS_items - MS_resid floored "
          "at 0), df by Satterthwaite; ratios by Fieller")


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


def _terms(ms: np.ndarray, df: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """The terms of ``S I Var(mean)``: (coefficients on the mean squares, degrees of freedom) each (module doc).
    The seed part is always a term with the seeds' df, MS_resid standing in when MS_seeds is below it."""
    ms_s, ms_i, ms_e = ms
    has_s, has_i = df[0] > 0, df[1] > 0
    e = np.eye(3)
    if has_s and has_i:
        terms = [(e[0] if ms_s >= ms_e else e[2], float(df[0]))]
        if ms_i > ms_e:
            terms += [(e[1], float(df[1])), (-e[2], float(df[2]))]
        return terms
    # one factor with a single level: the other's mean square alone (its residual is confounded with it)
    return [(e[0], float(df[0]))] if has_s else [(e[1], float(df[1]))] if has_i else []


def _var_df(ms: np.ndarray, terms: list[tuple[np.ndarray, float]], n: int) -> tuple[float, float]:
    vals = [float(c @ ms) for c, _ in terms]
    total = sum(vals)
    denom = sum(v * v / d for v, (_, d) in zip(vals, terms) if d > 0 and v != 0)
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
    var, nu = _var_df(ms, _terms(ms, df), x.size)
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
    terms = _terms(ms_z, df)
    w = sum((c for c, _ in terms), np.zeros(3))  # the same linear combination of the bilinear mean squares
    var_z, nu = _var_df(ms_z, terms, num.size)
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


def variance_components(x_si) -> dict:
    """The crossed model's components of an [n_seeds, n_items] matrix, unbiased (a negative estimate is kept:
    a power simulation floors it itself): {'mean', 'var_seed', 'var_item', 'var_resid', 'n_seeds', 'n_items'};
    a factor with one level gets None."""
    x = _matrix(x_si)
    s, i = x.shape
    if s < 2 or i < 2:
        raise ValueError(f"variance components need >= 2 seeds and >= 2 items, got shape {x.shape}")
    (ms_s, ms_i, ms_e), _ = _mean_squares(x, x)
    return {"mean": float(x.mean()), "var_seed": float((ms_s - ms_e) / i), "var_item": float((ms_i - ms_e) / s),
            "var_resid": float(ms_e), "n_seeds": s, "n_items": i}


def p_below(s: dict | None, bound: float = 0.0) -> float | None:
    """One-sided p-value of "the true value is below ``bound``" (H0: value >= bound) from a summary's se and df
    (t, or normal when df is None); None without a standard error. A zero se gives 0 or 1."""
    if not isinstance(s, dict) or s.get("value") is None or s.get("se") is None:
        return None
    d, se = float(s["value"]) - bound, float(s["se"])
    if se == 0:
        return 0.0 if d < 0 else 1.0
    df = s.get("df")
    return float(stats.t.cdf(d / se, df) if df is not None else stats.norm.cdf(d / se))


def p_above(s: dict | None, bound: float = 0.0) -> float | None:
    """One-sided p-value of "the true value is above ``bound``" (H0: value <= bound)."""
    p = p_below(s, bound)
    if p is None:
        return None
    if float(s["se"]) == 0:
        return 0.0 if float(s["value"]) > bound else 1.0
    return 1.0 - p


__all__ = ["ALPHA", "METHOD", "excludes_zero", "p_above", "p_below", "pooled_mean", "pooled_ratio",
           "variance_components"]
