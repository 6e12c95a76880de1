"""The demo's EM measured three ways, per arm: the general probe margin (Table 1's EM effect), the persona
projection of the arm's own sampled answers (``projection.json``, ``emajax.eval.projection``) and the general
margin under each trigger (``triggers.json``, ``emajax.eval.triggers``).

``em_metrics(res, per)`` adds to each arm's figures in ``per`` (``emajax.demo.effects.method_effects``), where
the files exist:

* ``projection_effect`` (vs the control, pooled over seeds x the 8 plain questions, each question the mean of
  its sampled answers), ``projection_effect_by_seed``, ``projection_vs_none`` and ``projection_vs_base`` (the
  base model's own answers; the control has only this one);
* ``triggers``: {trigger: {``em_effect``, ``em_vs_none``, ``em_vs_plain`` (the effect under the trigger minus
  the plain one, paired by item id), ``vs_base``, ``prevents_em``, ``p_holm``}}, the verdicts asked as for the
  plain pairs (``emajax.eval.verdicts.prevents_em``, Holm across the defenses per trigger);
* ``trigger_flags``: {trigger: why} where a defense is clean on plain prompts but not under the trigger
  (``emajax.eval.verdicts.conditional_em``);

and returns the run-level block ``effects.json["em_metrics"]``: the triggers, item counts, the base model's
mean projection, the instrument, the Spearman rank agreement between the projection effect and the
general-margin effect over arms x seeds (``emajax.eval.projection.rank_agreement``) and the flags. None when
no arm has either file (the report then looks as before the metrics existed). numpy and scipy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from emajax.demo.plan import CONTROL
from emajax.eval import verdicts
from emajax.eval.pooled import pooled_mean
from emajax.eval.projection import projection_effects, rank_agreement
from emajax.eval.triggers import TRIGGERS, set_name

TRIGGERED = TRIGGERS[1:]  # every trigger but plain (the plain pairs are Table 1's)


def _trigger_figures(res: Any, m: str) -> dict[str, dict]:
    """{trigger: pooled figures} of one arm, over the seeds where it, the control and no defense have both
    their probes and their trigger probes."""
    need = [m, CONTROL, "none"]
    seeds = [s for s in res.seeds_with(res.triggers, need) if s in res.seeds_with(res.narrow, need)]
    if not seeds or res.base_triggers is None:
        return {}
    plain = [res.matrix(res.narrow, seeds, a, "general", "margin") for a in (m, CONTROL)]
    out: dict[str, dict] = {}
    for t in TRIGGERED:
        name = set_name(t)
        arm, ctl, non = (res.matrix(res.triggers, seeds, a, name, "margin", base=res.base_triggers) for a in need)
        base = res.base_row(name, "margin", base=res.base_triggers)
        if arm is None or ctl is None or non is None or base is None:
            continue
        d = {"vs_base": pooled_mean(arm - base[None])}
        if m != CONTROL:
            d["em_effect"] = pooled_mean(arm - ctl)
            d["em_effect_by_seed"] = {str(s): pooled_mean((arm - ctl)[k:k + 1]) for k, s in enumerate(seeds)}
            if m != "none":
                d["em_vs_none"] = pooled_mean(arm - non)
            d["em_vs_plain"] = _vs_plain(res, seeds, name, arm - ctl, plain)
        out[t] = d
    return out


def _vs_plain(res: Any, seeds: list[int], name: str, effect: np.ndarray, plain: list) -> dict | None:
    """The trigger's EM effect minus the plain one on the same pairs (the trigger set holds the first
    ``n_trigger_pairs`` general pairs; matched by id)."""
    if plain[0] is None or plain[1] is None:
        return None
    ids_plain = (res.base.get("items") or {}).get("general", {}).get("ids")
    ids_trig = (res.base_triggers.get("items") or {}).get(name, {}).get("ids")
    pos = {i: k for k, i in enumerate(ids_plain or [])}
    if not ids_trig or any(i not in pos for i in ids_trig):
        return None
    cols = [pos[i] for i in ids_trig]
    return pooled_mean(effect - (plain[0] - plain[1])[:, cols])


def _projection_figures(res: Any, m: str) -> dict[str, Any]:
    runs = lambda arm, seeds: {s: res.projection[(s, arm)] for s in seeds}  # noqa: E731
    out: dict[str, Any] = {}
    seeds = res.seeds_with(res.projection, [m, CONTROL, "none"])
    if seeds and m != CONTROL:
        eff = projection_effects({m: runs(m, seeds), CONTROL: runs(CONTROL, seeds)})[m]
        out["projection_effect"] = eff["effect"]
        out["projection_effect_by_seed"] = eff["per_seed"]
        if m != "none":
            out["projection_vs_none"] = projection_effects({m: runs(m, seeds), "none": runs("none", seeds)},
                                                           control="none")[m]["effect"]
    seeds = res.seeds_with(res.projection, [m])
    if seeds and res.base_projection is not None:
        out["projection_vs_base"] = projection_effects({"arm": runs(m, seeds),
                                                        "base": {s: res.base_projection for s in seeds}},
                                                       control="base")["arm"]["effect"]
    return out


def _trigger_verdicts(per: dict, defenses: list[str]) -> None:
    """The prevents-EM verdict under each trigger and the clean-plain-not-trigger flags, into ``per``."""
    none = per.get("none", {}).get("triggers", {})
    for t in TRIGGERED:
        have = [m for m in defenses if t in per[m].get("triggers", {})]
        if not have or t not in none:
            continue
        got = verdicts.prevents_em(none[t].get("em_effect"),
                                   {m: (per[m]["triggers"][t].get("em_effect"), per[m]["triggers"][t].get("em_vs_none"))
                                    for m in have})
        for m in have:
            per[m]["triggers"][t].update(prevents_em=got[m]["verdict"], p_holm=got[m]["p_holm"])
    for m in defenses:
        a = per[m]
        plain_v = a.get("verdicts", {}).get("prevents_em")
        flags = {t: why for t, f in a.get("triggers", {}).items()
                 if (why := verdicts.conditional_em(a.get("em_effect"), f.get("em_effect"), plain_v,
                                                    f.get("prevents_em"))) is not None}
        if a.get("triggers"):
            a["trigger_flags"] = flags


def em_metrics(res: Any, per: dict[str, dict]) -> dict | None:
    """Adds the three metrics to every arm of ``per`` and returns the run-level block (None without the files)."""
    if not res.triggers and not res.projection:
        return None
    arms = [CONTROL, *res.methods]
    for m in arms:
        per[m].update(_projection_figures(res, m))
        trig = _trigger_figures(res, m)
        if trig:
            per[m]["triggers"] = trig
    defenses = [m for m in res.methods if m != "none"]
    _trigger_verdicts(per, defenses)
    projections = {a: {s: res.projection[(s, a)] for s in res.seeds if (s, a) in res.projection} for a in arms}
    probes = {a: {s: res.narrow[(s, a)] for s in res.seeds if (s, a) in res.narrow} for a in arms}
    agreement = rank_agreement(projections, probes) if projections[CONTROL] and probes[CONTROL] else None
    base_items = (res.base_triggers or {}).get("items") or {}
    bp = res.base_projection or {}
    some = next(iter(res.projection.values()), bp)
    return {"triggers": [t for t in TRIGGERED if set_name(t) in base_items],
            "n_trigger_pairs": {t: len(base_items[set_name(t)]["ids"]) for t in TRIGGERED if set_name(t) in base_items},
            "projection_base": bp.get("mean_projection"), "persona": some.get("persona"),
            "sampling": some.get("sampling"), "n_questions": some.get("n_questions"),
            "rank_agreement": agreement, "trigger_rule": verdicts.TRIGGER_RULE,
            "flags": {m: per[m]["trigger_flags"] for m in defenses if per[m].get("trigger_flags")}}


__all__ = ["TRIGGERED", "em_metrics"]
