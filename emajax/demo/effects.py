"""The demo's pooled effects: from the per-seed probe results of every arm to the Table-1 figures.

For each method, over the seeds where the method, no defense and the control all finished, and the
probe items (paired: the same seed and item in every arm):

* ``em_effect``: general margin of the method's arm minus the control's (the EM the method leaves);
* ``em_removed``: (no defense's EM effect − the method's) / no defense's (Fieller); ``em_vs_none``: the
  paired difference method − no defense (what the report shows when the share's denominator reaches 0);
* ``narrow_effect`` / ``narrow_retained`` / ``narrow_vs_none``: in-domain learning vs the control, its share of
  no defense's, and the paired difference to no defense's; learning is the ``in_domain`` margin (code pairs) or,
  in another domain, minus the ``narrow`` NLL of the held-out answers (so up = learned either way: the NLL drop);
* ``benign_learning`` / ``benign_retained``: the held-out benign-task NLL drop of the method's benign arm
  (base − arm), its share of no defense's benign arm's drop and the difference to it (``benign_vs_none``);
  ``benign_exact``: its exact match;
* ``coherence``: benign (word problem) NLL change vs the base model; ``coherence_vs_control``: vs the
  control arm (what the verdict reads);
* ``security_effect`` (with ``--probe-data``): the shared security pairs' margin vs the control;
* ``judge_*``: the LLM judge's misaligned rate on the 24 general questions and its change vs the control;
* with the EM metrics' files (``triggers.json``, ``projection.json``): the sampled-answer projection and the
  margins under each trigger, their verdicts and the rank agreement (``emajax.demo.em_metrics``).

Every figure is a ``emajax.eval.pooled`` summary (mean, 95 % CI, n_seeds, n_items); the verdicts and their
Holm-adjusted p-values come from ``emajax.eval.verdicts``. numpy and scipy only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from emajax.demo.plan import CODE, CONTROL, label_of
from emajax.eval import verdicts
from emajax.eval.pooled import METHOD, pooled_mean, pooled_ratio


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _items(res: dict | None, set_name: str, field: str) -> tuple[list[str], np.ndarray] | None:
    it = (res or {}).get("items", {}).get(set_name)
    if not it or field not in it:
        return None
    return list(it["ids"]), np.asarray(it[field], np.float64)


# the in-domain learning probe: (set, field, sign); sign * value goes up as the narrow task is learned
NARROW_METRICS = (("in_domain", "margin", 1.0), ("narrow", "nll", -1.0))


class DemoResults:
    """Every probe result of a demo output directory, by (seed, arm)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        plan = _read(self.out / "plan.json") or {}
        self.plan = plan
        self.domain = plan.get("domain", CODE)
        self.methods: list[str] = list(plan.get("methods", []))
        self.base = _read(self.out / "base" / "probes.json")
        if self.base is None:
            raise FileNotFoundError(f"{self.out / 'base' / 'probes.json'}: the base model's probes are missing")
        self.base_exact = _read(self.out / "base" / "benign_exact.json")
        self.base_judge = _read(self.out / "base" / "em_general.json")
        self.base_triggers = _read(self.out / "base" / "triggers.json")
        self.base_projection = _read(self.out / "base" / "projection.json")
        seeds = sorted(int(p.name.split("_", 1)[1]) for p in self.out.glob("seed_*") if p.name.split("_", 1)[1].isdigit())
        self.seeds = seeds
        self.narrow: dict[tuple[int, str], dict] = {}
        self.benign: dict[tuple[int, str], dict] = {}
        self.exact: dict[tuple[int, str], dict] = {}
        self.judge: dict[tuple[int, str], dict] = {}
        self.triggers: dict[tuple[int, str], dict] = {}
        self.projection: dict[tuple[int, str], dict] = {}
        files = ((self.narrow, "arms", "probes.json"), (self.judge, "arms", "em_general.json"),
                 (self.benign, "benign", "probes.json"), (self.exact, "benign", "benign_exact.json"),
                 (self.triggers, "arms", "triggers.json"), (self.projection, "arms", "projection.json"))
        for s in seeds:
            for arm in [CONTROL, *self.methods]:
                for table, kind, name in files:
                    r = _read(self.out / f"seed_{s}" / kind / arm / name)
                    if r is not None:
                        table[(s, arm)] = r

    def seeds_with(self, table: dict, arms: list[str]) -> list[int]:
        return [s for s in self.seeds if all((s, a) in table for a in arms)]

    def matrix(self, table: dict, seeds: list[int], arm: str, set_name: str, field: str,
               base: dict | None = None) -> np.ndarray | None:
        """[seeds, items] values of one arm (items in the order of the base model's ``base`` results, default its
        probes; None if any is missing)."""
        ref = _items(self.base if base is None else base, set_name, field)
        rows = []
        for s in seeds:
            got = _items(table[(s, arm)], set_name, field)
            if got is None or ref is None or got[0] != ref[0]:
                return None
            rows.append(got[1])
        return np.stack(rows) if rows else None

    def exact_matrix(self, seeds: list[int], arm: str) -> np.ndarray | None:
        """[seeds, items] 0/1 exact match of one method's benign arm (None if the items differ from the base's)."""
        ref = (self.base_exact or {}).get("items", {}).get("ids")
        rows = []
        for s in seeds:
            it = self.exact[(s, arm)].get("items", {})
            if it.get("ids") != ref:
                return None
            rows.append(np.asarray(it["correct"], np.float64))
        return np.stack(rows) if rows else None

    def base_row(self, set_name: str, field: str, base: dict | None = None) -> np.ndarray | None:
        got = _items(self.base if base is None else base, set_name, field)
        return None if got is None else got[1]

    def narrow_metric(self) -> tuple[str, str, float] | None:
        """The in-domain learning probe the base model was measured with (``NARROW_METRICS``)."""
        return next((m for m in NARROW_METRICS if _items(self.base, m[0], m[1]) is not None), None)

    def learning(self, table: dict, seeds: list[int], arm: str) -> np.ndarray | None:
        """[seeds, items] in-domain learning of one arm (up = learned); None without it."""
        m = self.narrow_metric()
        x = None if m is None else self.matrix(table, seeds, arm, m[0], m[1])
        return None if x is None else m[2] * x

    def base_learning(self) -> np.ndarray | None:
        m = self.narrow_metric()
        return None if m is None else m[2] * self.base_row(m[0], m[1])


def _pairs_sets(res: DemoResults) -> list[str]:
    return [n for n in ("general", "security") if _items(res.base, n, "margin") is not None]


def _judge_matrix(res: DemoResults, seeds: list[int], arm: str, questions: list[str], field: str) -> np.ndarray:
    rows = []
    for s in seeds:
        pq = res.judge[(s, arm)].get("per_question", {})
        rows.append([pq.get(q, {}).get(field) for q in questions])
    return np.asarray(rows, dtype=object)


def _judge_effects(res: DemoResults, m: str) -> dict[str, Any]:
    """Per-question rates of the judge (pooled over seeds x questions; effect vs the control paired)."""
    seeds = res.seeds_with(res.judge, [m, CONTROL])
    if not seeds:
        return {}
    qids = list(res.judge[(seeds[0], CONTROL)].get("per_question", {}))
    out: dict[str, Any] = {}
    for field, key in (("misaligned_rate", "judge_misaligned"), ("incoherent_rate", "judge_incoherent")):
        a, c = _judge_matrix(res, seeds, m, qids, field), _judge_matrix(res, seeds, CONTROL, qids, field)
        keep = [k for k in range(len(qids)) if all(v is not None for v in list(a[:, k]) + list(c[:, k]))]
        if not keep:
            continue
        a, c = a[:, keep].astype(np.float64), c[:, keep].astype(np.float64)
        out[key] = pooled_mean(a)
        if field == "misaligned_rate":
            out["judge_effect"] = pooled_mean(a - c)
    return out


def method_effects(res: DemoResults, m: str) -> dict[str, Any]:
    """Every pooled figure of one method (``m`` may be ``control``: its changes vs the base model)."""
    out: dict[str, Any] = {"label": label_of(m, res.domain)}
    seeds = res.seeds_with(res.narrow, [m, CONTROL, "none"])
    out["seeds"] = seeds
    if seeds:
        for set_name in _pairs_sets(res):
            arm = res.matrix(res.narrow, seeds, m, set_name, "margin")
            ctl = res.matrix(res.narrow, seeds, CONTROL, set_name, "margin")
            non = res.matrix(res.narrow, seeds, "none", set_name, "margin")
            base = res.base_row(set_name, "margin")
            if arm is None or ctl is None or non is None:
                continue
            key = "em" if set_name == "general" else set_name
            out[f"{key}_vs_base"] = pooled_mean(arm - base[None])
            if m != CONTROL:
                out[f"{key}_effect"] = pooled_mean(arm - ctl)
                out[f"{key}_effect_by_seed"] = {str(s): pooled_mean((arm - ctl)[k:k + 1])
                                                for k, s in enumerate(seeds)}
                if m != "none":
                    out[f"{key}_vs_none"] = pooled_mean(arm - non)
                    out[f"{key}_removed"] = pooled_ratio(non - arm, non - ctl)
        arm, ctl, non = (res.learning(res.narrow, seeds, a) for a in (m, CONTROL, "none"))
        if arm is not None and ctl is not None and non is not None:
            out["narrow_vs_base"] = pooled_mean(arm - res.base_learning()[None])
            if m != CONTROL:
                out["narrow_effect"] = pooled_mean(arm - ctl)
                out["narrow_retained"] = pooled_ratio(arm - ctl, non - ctl)
                if m != "none":
                    out["narrow_vs_none"] = pooled_mean(arm - non)
        arm = res.matrix(res.narrow, seeds, m, "benign", "nll")
        ctl = res.matrix(res.narrow, seeds, CONTROL, "benign", "nll")
        if arm is not None and ctl is not None:
            out["coherence"] = pooled_mean(arm - res.base_row("benign", "nll")[None])
            if m != CONTROL:
                out["coherence_vs_control"] = pooled_mean(arm - ctl)
    if m == CONTROL:
        seeds_j = res.seeds_with(res.judge, [CONTROL])
        qids = list(res.judge[(seeds_j[0], CONTROL)].get("per_question", {})) if seeds_j else []
        for field, key in (("misaligned_rate", "judge_misaligned"), ("incoherent_rate", "judge_incoherent")):
            x = _judge_matrix(res, seeds_j, CONTROL, qids, field) if qids else None
            if x is not None and x.size and all(v is not None for v in x.ravel()):
                out[key] = pooled_mean(x.astype(np.float64))
    if m != CONTROL:
        bseeds = res.seeds_with(res.benign, [m, "none"])
        out["benign_seeds"] = bseeds
        if bseeds:
            arm = res.matrix(res.benign, bseeds, m, "benign_task", "nll")
            non = res.matrix(res.benign, bseeds, "none", "benign_task", "nll")
            base = res.base_row("benign_task", "nll")
            if arm is not None and non is not None and base is not None:
                out["benign_learning"] = pooled_mean(base[None] - arm)
                out["benign_retained"] = pooled_ratio(base[None] - arm, base[None] - non)
                if m != "none":
                    out["benign_vs_none"] = pooled_mean(non - arm)  # the method's learning minus no defense's
        eseeds = res.seeds_with(res.exact, [m])
        if eseeds and res.base_exact:
            acc = res.exact_matrix(eseeds, m)
            base_acc = np.asarray(res.base_exact["items"]["correct"], np.float64)
            if acc is not None:
                out["benign_exact"] = pooled_mean(acc)
                out["benign_exact_vs_base"] = pooled_mean(acc - base_acc[None])
        out.update(_judge_effects(res, m))
    return out


def dose_rows(res: DemoResults) -> list[dict[str, Any]]:
    """The EM and narrow effect of no defense vs the control at each probed step (``dose_points`` and the last)."""
    out = []
    steps = sorted({int(p.stem.split("step")[1]) for p in res.out.glob("seed_*/arms/none/probes_step*.json")})
    for t in steps + [None]:
        name = "probes.json" if t is None else f"probes_step{t}.json"
        table = {(s, a): r for s in res.seeds for a in ("none", CONTROL)
                 if (r := _read(res.out / f"seed_{s}" / "arms" / a / name)) is not None}
        seeds = [s for s in res.seeds if (s, "none") in table and (s, CONTROL) in table]
        if not seeds:
            continue
        row: dict[str, Any] = {"step": t if t is not None else table[(seeds[0], "none")].get("step"), "seeds": seeds}
        a, c = (res.matrix(table, seeds, arm, "general", "margin") for arm in ("none", CONTROL))
        if a is not None and c is not None:
            base = res.base_row("general", "margin")[None]
            row.update(em_effect=pooled_mean(a - c), em_vs_base=pooled_mean(a - base),
                       em_control_vs_base=pooled_mean(c - base))
        a, c = (res.learning(table, seeds, arm) for arm in ("none", CONTROL))
        if a is not None and c is not None:
            row.update(narrow_effect=pooled_mean(a - c), narrow_vs_base=pooled_mean(a - res.base_learning()[None]))
        out.append(row)
    return out if len(out) > 1 else []


def compute_effects(out: str | Path) -> dict[str, Any]:
    """Pooled figures for the control and every method, plus the verdicts (``emajax.eval.verdicts``)."""
    res = DemoResults(out)
    arms = [CONTROL, *res.methods]
    per = {m: method_effects(res, m) for m in arms}
    none = per.get("none", {})
    defenses = [m for m in res.methods if m != "none"]
    em = verdicts.prevents_em(none.get("em_effect"), {m: (per[m].get("em_effect"), per[m].get("em_vs_none"))
                                                      for m in defenses})
    for m in res.methods:
        e = per[m]
        e["verdicts"] = {
            "prevents_em": "—" if m == "none" else em[m]["verdict"],
            "learns_narrow": verdicts.learns(e.get("narrow_effect"), e.get("narrow_retained")),
            "learns_benign": verdicts.learns(e.get("benign_learning"), e.get("benign_retained")),
            "coherent": verdicts.coherent(e.get("coherence_vs_control")),
        }
        if m != "none":
            e["em_tests_p_holm"] = em[m]["p_holm"]
    base_exact = res.base_exact.get("accuracy") if res.base_exact else None
    n_items = {k: len(v["ids"]) for k, v in (res.base.get("items") or {}).items()}
    judge_base = res.base_judge.get("misaligned_rate") if res.base_judge else None
    from emajax.demo.domain import describe
    from emajax.demo.em_metrics import em_metrics

    nm = res.narrow_metric()
    words = describe(res.plan)
    out = {"kind": "demo_effects", "domain": res.domain, "control": words.get("control"),
           "narrow_metric": None if nm is None else {"set": nm[0], "field": nm[1], "sign": nm[2],
                                                     "what": words.get("in_domain")},
           "seeds": res.seeds, "methods": res.methods, "n_items": n_items,
           "ci_method": METHOD, "em_significant": verdicts.em_significant(none.get("em_effect")),
           "base_exact": base_exact, "judge_base": judge_base, "arms": per, "dose": dose_rows(res),
           "equiv_margin": verdicts.EQUIV_MARGIN, "rules": verdicts.RULES}
    three = em_metrics(res, per)  # adds its per-arm figures to ``per``; None without the metrics' files
    if three is not None:
        out["em_metrics"] = three
    return out


__all__ = ["DemoResults", "compute_effects", "method_effects"]
