"""paper_table.seed_bootstrap: the two-level (seeds, then answers within each drawn seed) bootstrap CI of the
paper's table, checked against the distributions it should reproduce."""

from __future__ import annotations

import pytest

from emajax.eval.paper_table import seed_bootstrap


def test_value_is_the_mean_of_the_per_seed_rates():
    s = seed_bootstrap([[1, 0, 0, 0], [1, 1], []], n_boot=200)
    assert s["value"] == pytest.approx((0.25 + 1.0) / 2)
    assert (s["n"], s["n_seeds"]) == (6, 2)
    assert seed_bootstrap([[], []])["value"] is None


def test_one_seed_is_the_plain_answer_bootstrap():
    # 20 answers, half flagged: the resampled rate is Binomial(20, 1/2) / 20, whose 2.5% / 97.5% points are 0.3 / 0.7
    s = seed_bootstrap([[0, 1] * 10], n_boot=20000)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(0.30), pytest.approx(0.70))


def test_seeds_are_resampled():
    # no spread within a seed: all the interval's width comes from drawing seeds (mean of 2 draws of {0, 1})
    s = seed_bootstrap([[0] * 10, [1] * 10], n_boot=20000)
    assert (s["ci_low"], s["ci_high"]) == (0.0, 1.0)


def test_a_seed_drawn_twice_gets_two_independent_answer_resamples():
    # equal seeds (rate 0.5, 10 answers each): the rate of a draw is then the mean of 2 independent
    # Binomial(10, 1/2) / 10 = Binomial(20, 1/2) / 20 -> [0.3, 0.7]. Reusing one answer resample for a seed
    # drawn twice (half the draws) widens that to about [0.2, 0.8].
    s = seed_bootstrap([[0, 1] * 5, [1, 0] * 5], n_boot=20000)
    assert 0.25 <= s["ci_low"] <= 0.30 and 0.70 <= s["ci_high"] <= 0.75
