"""paper_table.seed_interval: the paper table's rate over seeds with its t interval over the seeds' rates
(over the answers with one seed), checked against scipy's t interval and by coverage of a known rate."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from emajax.eval.paper_table import seed_interval


def test_value_is_the_mean_of_the_per_seed_rates():
    s = seed_interval([[1, 0, 0, 0], [1, 1], []])
    assert s["value"] == pytest.approx((0.25 + 1.0) / 2)
    assert (s["n"], s["n_seeds"], s["df"]) == (6, 2, 1.0)
    assert seed_interval([[], []])["value"] is None


def test_one_seed_is_the_t_interval_over_its_answers():
    answers = [0, 1] * 10
    s = seed_interval([answers])
    lo, hi = stats.t.interval(0.95, 19, loc=0.5, scale=np.std(answers, ddof=1) / np.sqrt(20))
    assert (s["ci_low"], s["ci_high"], s["df"]) == (pytest.approx(lo), pytest.approx(hi), 19)


def test_several_seeds_use_the_spread_of_their_rates():
    # rates 0.2, 0.4, 0.3 from 10 answers each: t with 2 df over the three rates, whatever the answers' spread
    s = seed_interval([[1] * 2 + [0] * 8, [1] * 4 + [0] * 6, [1] * 3 + [0] * 7])
    lo, hi = stats.t.interval(0.95, 2, loc=0.3, scale=0.1 / np.sqrt(3))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    # two seeds that disagree completely: t(1) = 12.7, the interval is all of [0, 1]
    assert seed_interval([[0] * 10, [1] * 10])["ci_low"] == 0.0
    assert seed_interval([[0] * 10, [1] * 10])["ci_high"] == 1.0


def test_covers_a_known_rate_with_three_seeds():
    """Seeds whose true rates scatter around 0.3 (run-to-run variance), 50 judged answers each: the
    interval covers 0.3 in about 95 % of replications."""
    rng = np.random.default_rng(0)
    covered, reps = 0, 400
    for _ in range(reps):
        p_seed = np.clip(0.3 + 0.08 * rng.standard_normal(3), 0.01, 0.99)
        s = seed_interval([(rng.random(50) < p).astype(float) for p in p_seed])
        covered += s["ci_low"] <= 0.3 <= s["ci_high"]
    assert 0.9 <= covered / reps <= 0.99
