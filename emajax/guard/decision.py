"""The decision rule: screening verdict + per-metric effects with CIs + the policy -> release / reject /
inconclusive, each reason with its figure. Pure (no jax), so it is tested on constructed metrics.

Per metric (``kind`` from the registry, ``margin`` and ``required`` from the policy):

* ``em``: pass when the 95 % CI's upper bound <= margin (the job moved this EM measure by no more than the
  margin beyond what the control moved it); fail when the lower bound > margin; else inconclusive.
* ``learning``: pass when the lower bound > margin (the customer's task was learned beyond the control);
  fail when the upper bound <= margin; else inconclusive.
* a metric without a CI (one seed and one item) or not measured is inconclusive.

The job: rejected at screening when the screen says so; else rejected when any required metric fails;
released when every required metric passes; otherwise the policy's ``on_inconclusive`` (inconclusive,
reject or release) is the decision, and the reasons say which metrics were inconclusive.
"""

from __future__ import annotations

from typing import Any, Sequence

OUTCOMES = ("pass", "fail", "inconclusive")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def metric_outcome(kind: str, effect: dict | None, margin: float) -> tuple[str, str]:
    """(outcome, the figure and the rule that gave it) for one metric's pooled effect."""
    if effect is None:
        return "inconclusive", "not measured"
    v, lo, hi = effect.get("value"), effect.get("ci_low"), effect.get("ci_high")
    fig = f"effect {_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
    if lo is None or hi is None:
        return "inconclusive", f"{fig}: no confidence interval (one seed and one item)"
    if kind == "em":
        if hi <= margin:
            return "pass", f"{fig}: upper bound <= margin {margin:+.4f}"
        if lo > margin:
            return "fail", f"{fig}: lower bound > margin {margin:+.4f} (EM beyond the control)"
        return "inconclusive", f"{fig}: the interval contains the margin {margin:+.4f}"
    if kind == "learning":
        if lo > margin:
            return "pass", f"{fig}: lower bound > required gain {margin:+.4f}"
        if hi <= margin:
            return "fail", f"{fig}: upper bound <= required gain {margin:+.4f} (the task was not learned)"
        return "inconclusive", f"{fig}: the interval contains the required gain {margin:+.4f}"
    raise ValueError(f"unknown metric kind {kind!r}")


def decide(screen: dict, metrics: Sequence[dict], on_inconclusive: str) -> dict[str, Any]:
    """``screen``: {'reject': [reason, ...]}; ``metrics``: [{'name', 'kind', 'margin', 'required', 'effect'
    (pooled summary or None), 'not_measured' (why, optional)}] -> {'decision', 'reasons', 'metrics'}."""
    if on_inconclusive not in ("inconclusive", "reject", "release"):
        raise ValueError(f"on_inconclusive must be inconclusive, reject or release, got {on_inconclusive!r}")
    if screen.get("reject"):
        return {"decision": "reject", "stage": "screening",
                "reasons": [{"source": "screening", "outcome": "fail", "figure": r} for r in screen["reject"]],
                "metrics": []}
    rows = []
    for m in metrics:
        out, fig = metric_outcome(m["kind"], m.get("effect"), m["margin"])
        if m.get("not_measured"):
            fig = f"not measured: {m['not_measured']}"
        rows.append({"metric": m["name"], "kind": m["kind"], "required": bool(m["required"]), "margin": m["margin"],
                     "outcome": out, "figure": fig})
    req = [r for r in rows if r["required"]]
    failed = [r for r in req if r["outcome"] == "fail"]
    unsure = [r for r in req if r["outcome"] == "inconclusive"]
    if failed:
        decision, why = "reject", failed
    elif not req:
        decision, why = on_inconclusive, []
    elif not unsure:
        decision, why = "release", req
    else:
        decision, why = on_inconclusive, unsure
    reasons = [{"source": f"gate:{r['metric']}", "outcome": r["outcome"], "figure": r["figure"]} for r in why]
    if not req:
        reasons.append({"source": "gate", "outcome": "inconclusive", "figure": "the policy requires no metric"})
    elif unsure and not failed:
        reasons.append({"source": "policy", "outcome": decision,
                        "figure": f"gate.on_inconclusive = {on_inconclusive}"})
    return {"decision": decision, "stage": "gate", "reasons": reasons, "metrics": rows}


__all__ = ["OUTCOMES", "decide", "metric_outcome"]
