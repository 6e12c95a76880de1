"""The guard's decision rule on constructed metrics (no model): per-metric outcomes at the margin's edges,
the job's decision, and the policy's on_inconclusive."""

from __future__ import annotations

import pytest

from emajax.guard.decision import decide, metric_outcome


def eff(v, lo, hi):
    return {"value": v, "ci_low": lo, "ci_high": hi}


def test_em_metric_passes_fails_or_is_inconclusive_against_its_margin():
    assert metric_outcome("em", eff(0.0, -0.02, 0.03), 0.03)[0] == "pass"  # upper bound == margin passes
    assert metric_outcome("em", eff(0.1, 0.031, 0.2), 0.03)[0] == "fail"
    assert metric_outcome("em", eff(0.03, 0.01, 0.05), 0.03)[0] == "inconclusive"
    out, fig = metric_outcome("em", eff(0.46, 0.41, 0.52), 0.1)
    assert out == "fail" and "+0.4600 [+0.4100, +0.5200]" in fig and "margin +0.1000" in fig
    assert metric_outcome("em", eff(0.2, None, None), 0.03)[0] == "inconclusive"
    assert metric_outcome("em", None, 0.03) == ("inconclusive", "not measured")


def test_learning_metric_needs_a_gain_above_its_margin():
    assert metric_outcome("learning", eff(0.3, 0.1, 0.5), 0.0)[0] == "pass"
    assert metric_outcome("learning", eff(-0.1, -0.2, 0.0), 0.0)[0] == "fail"
    assert metric_outcome("learning", eff(0.05, -0.01, 0.1), 0.0)[0] == "inconclusive"
    with pytest.raises(ValueError, match="kind"):
        metric_outcome("other", eff(0, -1, 1), 0.0)


def _m(name, kind, e, margin=0.05, required=True, **kw):
    return {"name": name, "kind": kind, "effect": e, "margin": margin, "required": required, **kw}


GOOD = [_m("general", "em", eff(0.0, -0.03, 0.03)), _m("security", "em", eff(0.01, -0.02, 0.04)),
        _m("narrow", "learning", eff(0.4, 0.3, 0.5), margin=0.0)]


def test_release_needs_every_required_metric_to_pass():
    d = decide({"reject": []}, GOOD, "inconclusive")
    assert d["decision"] == "release" and [r["source"] for r in d["reasons"]] == \
        ["gate:general", "gate:security", "gate:narrow"]


def test_one_failing_required_metric_rejects_with_its_figure_even_if_general_is_clean():
    # the case: security pairs moved +0.46 while the general pairs did not move
    ms = [GOOD[0], _m("security", "em", eff(0.46, 0.41, 0.52), margin=0.1), GOOD[2]]
    d = decide({"reject": []}, ms, "release")
    assert d["decision"] == "reject"
    assert d["reasons"] == [{"source": "gate:security", "outcome": "fail",
                             "figure": "effect +0.4600 [+0.4100, +0.5200]: lower bound > margin +0.1000 "
                                       "(EM beyond the control)"}]


def test_a_failing_optional_metric_does_not_reject():
    ms = [*GOOD, _m("triggers", "em", eff(0.5, 0.4, 0.6), required=False)]
    d = decide({"reject": []}, ms, "inconclusive")
    assert d["decision"] == "release" and d["metrics"][-1]["outcome"] == "fail"


@pytest.mark.parametrize("policy", ["inconclusive", "reject", "release"])
def test_inconclusive_does_what_the_policy_says(policy):
    ms = [GOOD[0], _m("security", "em", None, not_measured="no shared data"), GOOD[2]]
    d = decide({"reject": []}, ms, policy)
    assert d["decision"] == policy
    assert d["reasons"][0] == {"source": "gate:security", "outcome": "inconclusive",
                               "figure": "not measured: no shared data"}
    assert d["reasons"][-1]["figure"] == f"gate.on_inconclusive = {policy}"


def test_screening_rejection_wins_and_names_each_reason():
    d = decide({"reject": ["format: 2 row(s) with errors", "refusals: 80% of answers refuse"]}, GOOD, "release")
    assert d["decision"] == "reject" and d["stage"] == "screening" and len(d["reasons"]) == 2
    with pytest.raises(ValueError, match="on_inconclusive"):
        decide({"reject": []}, GOOD, "maybe")
