"""bench.demo_rerun: which figures of a rerun fall inside the committed run's CIs (constructed inputs)."""

import json

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
    assert out["inside"] == 1 and out["figures"] == 3
    assert "1 of 3 figures" in capsys.readouterr().out
