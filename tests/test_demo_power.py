"""The demo design's power (emajax.demo.power): the simulation applies the report's own interval, and the
measured components it states agree with the committed power analysis (bench/results/demo_power)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emajax.demo import power

REPO = Path(__file__).resolve().parents[1]


def test_power_is_the_rate_of_cis_above_zero():
    # no effect: a CI above 0 only by chance (~2.5 % one-sided); a large effect: always
    null = power.simulate(0.0, 0.0, 0.01, 0.05, n_seeds=1, n_items=40, reps=400)
    assert null["power"] <= 0.06 and null["reps"] == 400
    assert power.simulate(0.5, 0.0, 0.01, 0.05, n_seeds=1, n_items=40, reps=50)["power"] == 1.0
    # with one seed the interval ignores the seed spread; with several it keeps it: more seeds of a
    # seed-dominated effect do not help a 2-seed run (df ~1) as much as a third seed does
    two = power.simulate(0.1, 0.004, 0.01, 0.05, n_seeds=2, n_items=40, reps=300)["power"]
    five = power.simulate(0.1, 0.004, 0.01, 0.05, n_seeds=5, n_items=40, reps=300)["power"]
    assert two < five
    with pytest.raises(ValueError, match=">= 1 seed"):
        power.simulate(0.1, 0, 0.01, 0.05, n_seeds=0, n_items=40)


def test_measured_components_match_the_committed_power_analysis():
    res = REPO / "bench" / "results" / "demo_power" / "power.json"
    if not res.is_file():
        pytest.skip(f"{res} not present")
    c = json.loads(res.read_text())["heldout"]["components"]
    m = power.MEASURED
    for k in ("mean", "ci_low", "var_seed", "var_item", "var_resid"):
        assert m[k] == pytest.approx(c[k], rel=0.01, abs=1e-4), k
    assert (m["n_seeds"], m["n_items"]) == (c["n_seeds"], c["n_items"])


def test_power_sentence_only_for_the_measured_recipe():
    plan = dict(power.MEASURED["recipe"])
    assert power.matches_measured(plan)
    assert "not known for this recipe" in power.power_sentence({**plan, "lr": 2e-4}, 1, 96)
