"""bench.demo_rerun: which figures of a rerun fall inside the committed run's CIs (constructed inputs)."""

import json

import pytest

from bench.demo_rerun import compare_effects, main


def _est(v, lo, hi):
    return {"value": v, "ci_low": lo, "ci_high": hi, "n_seeds": 3, "n_items": 96}


def test_rerun_inside_and_outside_the_committed_cis(tmp_path, capsys):
    committed = {"seeds": [0, 1, 2], "arms": {
        "none": {"label": "No defense", "em_effect": _est(0.09, 0.05, 0.14), "coherence": _est(0.55, 0.48, 0.63)},
        "kl": {"em_effect": _est(0.08, 0.04, 0.13), "em_removed": _est(None, None, None)}}}
    rerun = {"seeds": [3, 4, 5], "arms": {
        "none": {"label": "No defense", "em_effect": _est(0.055, 0.0, 0.1), "coherence": _est(0.37, 0.3, 0.44)},
        "kl": {"em_effect": _est(0.14, 0.1, 0.2), "em_removed": _est(0.1, 0.0, 0.2)}}}
    rows = compare_effects(committed, rerun)
    got = {(r["arm"], r["figure"]): r["inside"] for r in rows}
    # labels and figures without an estimate on either side are not compared; the CI bounds are inclusive
    assert got == {("none", "em_effect"): True, ("none", "coherence"): False, ("kl", "em_effect"): False}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(committed)), b.write_text(json.dumps(rerun))
    assert main([str(a), str(b), "--out", str(tmp_path / "c.json")]) == 0
    out = json.loads((tmp_path / "c.json").read_text())
    assert out["inside"] == 1 and out["figures"] == 3 and out["expected_inside"] is None  # no se_seeds here
    assert "1 of 3 figures" in capsys.readouterr().out


def test_expected_inside_from_the_committed_seed_spread():
    """p_inside: the chance a rerun on the same items lands in the committed CI when it differs by
    N(0, 2 se_seeds^2); expected_inside sums it (only when every figure has se_seeds)."""
    import math

    from bench.demo_rerun import p_inside

    sd = 0.01
    half = 1.959964 * math.sqrt(2) * sd
    assert p_inside({"value": 0.1, "ci_low": 0.1 - half, "ci_high": 0.1 + half, "se_seeds": sd}) == \
        pytest.approx(0.95, abs=1e-4)
    # a rerun with many more seeds than committed only carries the committed run's own seed noise
    assert p_inside({"value": 0.1, "ci_low": 0.1 - half, "ci_high": 0.1 + half, "se_seeds": sd, "n_seeds": 3},
                    300000) == pytest.approx(math.erf(1.959964), abs=1e-4)  # P(|N(0, sd^2)| < half)
    # an asymmetric (Fieller) interval: only the side that is there counts
    assert p_inside({"value": 0.0, "ci_low": 0.0, "ci_high": 10.0, "se_seeds": sd}) == pytest.approx(0.5)
    assert p_inside({"value": 0.0, "ci_low": -1.0, "ci_high": 1.0, "se_seeds": 0.0}) == 1.0
    assert p_inside({"value": 0.0, "ci_low": -1.0, "ci_high": 1.0}) is None
    est = {"value": 0.1, "ci_low": 0.1 - half, "ci_high": 0.1 + half, "se_seeds": sd}
    rows = compare_effects({"arms": {"none": {"em_effect": est}}}, {"arms": {"none": {"em_effect": dict(est)}}})
    assert rows[0]["inside"] and rows[0]["p_inside"] == pytest.approx(0.95, abs=1e-4)
