"""The demo's report: the paper's Table 1 from pooled effects, verdict rows, supporting tables and plots.

``write_demo_report(out)`` reads a demo output directory (``emajax.demo.effects``), writes
``effects.json`` (every pooled figure), ``report.md``, ``effects.png`` (EM effect and the other Table-1
figures per method with CIs), ``dose.png`` (the EM effect of no defense against optimiser steps, from the
arms' intermediate probes, when the plan has ``dose_points``) and ``training.png`` (loss curves). With the
EM metrics' files, the report also shows the three EM metrics side by side per arm with their rank agreement,
and the verdicts under each trigger with the arms flagged clean on plain prompts but not under a trigger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from emajax import atomic
from emajax.demo.plan import CONTROL, label_of
from emajax.eval.report import format_estimate
from emajax.eval.verdicts import share_defined


def _f(s: dict | None, *, pct: bool = False, signed: bool = True, digits: int = 3) -> str:
    """The demo's figures: signed by default, percentages without decimals."""
    return format_estimate(s, pct=pct, digits=digits, pct_digits=0, signed=signed)


def _share(share: dict | None, diff: dict | None, denominator: dict | None, *, signed: bool) -> str:
    """A share of no defense's effect where that effect's CI excludes 0, else the paired difference to no
    defense in nats/token (marked Δ): a ratio over a denominator that may be 0 is not a share."""
    if share_defined(denominator):
        return _f(share, pct=True, signed=signed)
    return f"Δ {_f(diff)} nats/token" if isinstance(diff, dict) else "—"


def _n(s: dict | None) -> str:
    return f"{s['n_seeds']}×{s['n_items']}" if isinstance(s, dict) and "n_items" in s else "—"


def headline(e: dict) -> str:
    none = e["arms"].get("none", {})
    em = none.get("em_effect")
    if not em:
        return "No-defense EM effect: not measured (no finished seed with the control and no-defense arms)."
    answers = "secure answers" if e.get("control", "secure code") == "secure code" else "the base model's own answers"
    sig = "**significant** (the 95 % CI excludes 0)" if e["em_significant"] else \
        "**not significant** (the 95 % CI includes 0): at this dose and model size the demo does not show EM " \
        f"beyond what fine-tuning on the same prompts with {answers} does, so the 'prevents EM' verdicts are n/a"
    one = ("" if em["n_seeds"] > 1 else
           " With one seed the CI is over the probe items only: it says how sure this run is of its own model, not "
           "whether another seed (or another CPU's rounding, which acts like one) would show the effect; "
           "`--seeds N` adds the seed-to-seed spread.")
    return (f"**No-defense EM effect** (general margin after no defense minus after the control arm, nats/token, "
            f"{em['n_seeds']} seed(s) × {em['n_items']} held-out general pairs): {_f(em)} — {sig}.{one}")


def table1(e: dict, judge_note: str | None) -> str:
    arms = e["arms"]
    judge = judge_note is None
    head = ["Method", "EM effect vs control ↓", "EM removed", "Narrow learning retained", "Benign learning retained",
            "Coherence: benign NLL change ↓"]
    if judge:
        head += ["Judge: misaligned ↓", "Judge: incoherent ↓", "Judge: EM effect vs control ↓"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    c = arms.get(CONTROL, {})
    ctl = [c.get("label", label_of(CONTROL)), "0 (reference)", "—", "—", "—", _f(c.get("coherence"))]
    if judge:
        ctl += [_f(c.get("judge_misaligned"), pct=True, signed=False), _f(c.get("judge_incoherent"), pct=True, signed=False),
                "0 (reference)"]
    lines.append("| " + " | ".join(ctl) + " |")
    none = arms.get("none", {})
    for m in e["methods"]:
        a = arms[m]
        ref = m == "none"
        row = [a["label"], _f(a.get("em_effect")),
               "0 (reference)" if ref else _share(a.get("em_removed"), a.get("em_vs_none"), none.get("em_effect"),
                                                  signed=True),
               "100% (reference)" if ref else _share(a.get("narrow_retained"), a.get("narrow_vs_none"),
                                                     none.get("narrow_effect"), signed=False),
               "100% (reference)" if ref else _share(a.get("benign_retained"), a.get("benign_vs_none"),
                                                     none.get("benign_learning"), signed=False),
               _f(a.get("coherence"))]
        if judge:
            row += [_f(a.get("judge_misaligned"), pct=True, signed=False),
                    _f(a.get("judge_incoherent"), pct=True, signed=False), _f(a.get("judge_effect"), pct=True)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _p(x: float | None) -> str:
    return "—" if x is None else ("<0.001" if x < 0.001 else f"{x:.3f}")


def verdict_table(e: dict) -> str:
    lines = ["| Method | prevents EM | learns narrow | learns benign | coherent | p below none | p above control | "
             "p below control | p equivalent to control |", "|---|---|---|---|---|---|---|---|---|"]
    for m in e["methods"]:
        v = e["arms"][m].get("verdicts", {})
        p = e["arms"][m].get("em_tests_p_holm") or {}
        lines.append(f"| {e['arms'][m]['label']} | {v.get('prevents_em', '—')} | {v.get('learns_narrow', '—')} | "
                     f"{v.get('learns_benign', '—')} | {v.get('coherent', '—')} | {_p(p.get('below_none'))} | "
                     f"{_p(p.get('above_control'))} | {_p(p.get('below_control'))} | {_p(p.get('equivalent'))} |")
    return "\n".join(lines)


def support_table(e: dict) -> str:
    """The raw effects behind the shares and verdicts."""
    what = "in-domain margin" if _narrow_is_margin(e) else "held-out narrow NLL drop"
    lines = [f"| Arm | general margin vs base | EM effect vs no defense | narrow: {what} vs control | "
             f"{what} vs base | benign-task NLL drop vs base | benign exact match | benign NLL vs control |",
             "|---|---|---|---|---|---|---|---|"]
    for m in [CONTROL, *e["methods"]]:
        a = e["arms"][m]
        lines.append(f"| {a['label']} | {_f(a.get('em_vs_base'))} | {_f(a.get('em_vs_none'))} | "
                     f"{_f(a.get('narrow_effect'))} | {_f(a.get('narrow_vs_base'))} | {_f(a.get('benign_learning'))} | "
                     f"{_f(a.get('benign_exact'), pct=True, signed=False)} | {_f(a.get('coherence_vs_control'))} |")
    return "\n".join(lines)


def seed_table(e: dict) -> str | None:
    seeds = [str(s) for s in e["seeds"]]
    rows = [(e["arms"][m]["label"], e["arms"][m].get("em_effect_by_seed", {})) for m in e["methods"]]
    if not any(r for _, r in rows):
        return None
    lines = ["| Method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for label, by in rows:
        lines.append(f"| {label} | " + " | ".join(_f(by.get(s)) for s in seeds) + " |")
    return "\n".join(lines)


def _trigger_names(e: dict) -> list[str]:
    return list((e.get("em_metrics") or {}).get("triggers") or [])


def em_metrics_table(e: dict) -> str | None:
    """Per arm, vs the control: the general margin (Table 1's EM effect), the projection of sampled answers and
    the general margin under each trigger."""
    if not e.get("em_metrics"):
        return None
    trig = _trigger_names(e)
    head = ["Arm", "General margin ↓", "Projection of sampled answers ↓"] + [f"Margin under {t} ↓" for t in trig]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    c = e["arms"].get(CONTROL, {})
    lines.append("| " + " | ".join([c.get("label", label_of(CONTROL))] + ["0 (reference)"] * (len(head) - 1)) + " |")
    for m in e["methods"]:
        a = e["arms"][m]
        tr = a.get("triggers", {})
        cells = [a.get("em_effect"), a.get("projection_effect")] + [tr.get(t, {}).get("em_effect") for t in trig]
        lines.append(f"| {a['label']} | " + " | ".join(_f(x) for x in cells) + " |")
    return "\n".join(lines)


def rank_agreement_sentence(e: dict) -> str | None:
    ra = (e.get("em_metrics") or {}).get("rank_agreement")
    if not ra:
        return None
    rho, n = ra["spearman"], ra["spearman"]["n"]
    what = ("**Rank agreement** of the projection and the probe margin (Spearman ρ between an arm's projection "
            f"effect and its general-margin effect, both vs the control of the same seed, over {n} arm × seed cells)")
    if rho.get("value") is None:
        return f"{what}: not defined (fewer than 2 cells, or one metric constant across them)."
    ci = (f" [{rho['ci_low']:+.2f}, {rho['ci_high']:+.2f}]" if rho.get("ci_low") is not None
          else " (a CI needs at least 4 cells)")
    return f"{what}: ρ = {rho['value']:+.2f}{ci} (95 % Fisher-z CI)."


def trigger_verdicts(e: dict) -> list[str]:
    """The prevents-EM verdict under each trigger per defense, then a flag line per defense clean on plain
    prompts but not under a trigger (``emajax.eval.verdicts.TRIGGER_RULE``); [] without trigger probes."""
    trig = _trigger_names(e)
    defenses = [m for m in e["methods"] if m != "none" and e["arms"][m].get("triggers")]
    if not trig or not defenses:
        return []
    lines = ["### Under triggers", "",
             "| Method | prevents EM (plain) | " + " | ".join(f"under {t}" for t in trig) + " |",
             "|" + "---|" * (len(trig) + 2)]
    for m in defenses:
        a = e["arms"][m]
        v = [a["triggers"].get(t, {}).get("prevents_em", "—") for t in trig]
        lines.append(f"| {a['label']} | {a.get('verdicts', {}).get('prevents_em', '—')} | " + " | ".join(v) + " |")
    lines.append("")
    flagged = [m for m in defenses if e["arms"][m].get("trigger_flags")]
    for m in flagged:
        fl = e["arms"][m]["trigger_flags"]
        lines.append(f"- **Flag — {e['arms'][m]['label']}: clean on plain prompts but not under "
                     f"{', '.join(fl)}**: " + "; ".join(f"{t}: {why}" for t, why in fl.items()) + ".")
    if not flagged:
        lines.append("No defense is clean on plain prompts but not under a trigger.")
    return lines + ["", "Rule: " + e["em_metrics"]["trigger_rule"], ""]


def security_table(e: dict) -> str | None:
    if not any("security_effect" in e["arms"][m] for m in e["methods"]):
        return None
    lines = ["| Method | security margin vs control ↓ | vs base | vs no defense |", "|---|---|---|---|"]
    for m in e["methods"]:
        a = e["arms"][m]
        lines.append(f"| {a['label']} | {_f(a.get('security_effect'))} | {_f(a.get('security_vs_base'))} | "
                     f"{_f(a.get('security_vs_none'))} |")
    return "\n".join(lines)


def timing_table(timings: dict | None) -> str | None:
    st = (timings or {}).get("stages") or {}
    if not st:
        return None
    lines = ["| stage | wall s | CPU s | load (1 min) |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} | {v.get('loadavg_1m', '—')} |" for k, v in st.items()]
    lines.append(f"| **total** | **{sum(v['wall_s'] for v in st.values()):.1f}** | "
                 f"{sum(v['cpu_s'] for v in st.values()):.1f} | |")
    sittings = [s for s in (timings or {}).get("sittings") or [] if s.get("stages")]
    if sittings:
        bf16 = {True: "native bf16", False: "no native bf16 (AVX512-BF16/AMX)", None: "bf16 support unknown"}
        lines += ["", "Ran in " + ("one sitting" if len(sittings) == 1 else f"{len(sittings)} sittings") + ":", ""]
        lines += [f"- {s['time']}: {s['cpu']}, family/model {s.get('cpu_family_model')}, {s.get('cores')} cores, "
                  f"{bf16[s.get('native_bf16')]}; {len(s['stages'])} stage(s), {s['stages'][0]} … {s['stages'][-1]}"
                  for s in sittings]
    return "\n".join(lines)


def _narrow_is_margin(e: dict) -> bool:
    """The in-domain probe: code pairs' margin (True) or the held-out narrow answers' NLL (another domain)."""
    return (e.get("narrow_metric") or {}).get("set", "in_domain") == "in_domain"


def _counts(e: dict) -> str:
    none = e["arms"].get("none", {})
    parts = []
    narrow = "in-domain pairs" if _narrow_is_margin(e) else "held-out narrow answers"
    for key, what in (("em_effect", "general pairs (held-out)"), ("narrow_effect", narrow),
                      ("coherence", "word problems"), ("benign_learning", "benign-task items")):
        s = none.get(key)
        if s:
            parts.append(f"{what}: {s['n_seeds']} seed(s) × {s['n_items']} items")
    return "; ".join(parts)


def _power(plan: dict, e: dict) -> list[str]:
    """The design's power for the no-defense EM effect (``emajax.demo.power``), when the recipe is the measured one."""
    from emajax.demo.power import power_sentence

    em = e["arms"].get("none", {}).get("em_effect")
    if not em:
        return []
    return [power_sentence(plan, em["n_seeds"], em["n_items"]), ""]


def _plots(out: Path, e: dict) -> list[Path]:
    from emajax.eval.plots import curves_png, dose_png, effects_png

    labels = [e["arms"][m]["label"] for m in e["methods"]]
    panels = [("EM effect vs control (general margin) ↓", "em_effect"),
              ("narrow learning vs control (" + ("in-domain margin" if _narrow_is_margin(e) else
                                                  "held-out narrow NLL drop") + ")", "narrow_effect"),
              ("benign learning (benign-task NLL drop)", "benign_learning"),
              ("coherence: benign NLL change vs base ↓", "coherence")]
    pngs = [effects_png(labels, [(t, [e["arms"][m].get(k) for m in e["methods"]]) for t, k in panels],
                        out / "effects.png", note=_counts(e))]
    if e.get("dose"):
        pngs.append(dose_png([("held-out general pairs", e["dose"])], out / "dose.png"))
    series = []
    for arm in [CONTROL, *e["methods"]]:
        if e["seeds"]:
            d = out / f"seed_{e['seeds'][0]}" / "arms" / arm
            rows = atomic.read_jsonl(d / "metrics.jsonl")
            if rows:
                series.append((label_of(arm, e.get("domain", "code")), rows, []))
    if series:
        pngs.append(curves_png(series, out / "training.png"))
    return pngs


def write_demo_report(out: str | Path, *, timings: dict | None = None, judge_note: str | None = None,
                      projection_note: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """effects.json, report.md and the plots of a demo output directory (``projection_note``: why the
    sampled-answer projection did not run, shown when the run has none)."""
    from emajax.demo.domain import describe
    from emajax.demo.effects import compute_effects

    out = Path(out)
    e = compute_effects(out)
    atomic.write_json(out / "effects.json", e)
    plan: dict[str, Any] = json.loads((out / "plan.json").read_text())
    pngs = _plots(out, e)
    ni = e["n_items"]
    dom = describe(plan)
    in_domain = (f"{ni.get('in_domain', 0)} held-out in-domain pairs" if _narrow_is_margin(e) else
                 f"{ni.get('narrow', 0)} held-out narrow answers")
    text = [f"# emajax demo: does EM appear, and does each defense remove it? ({plan['scale']} scale, {plan['model']})",
            "",
            f"Seeds {', '.join(map(str, e['seeds']))}; per seed a control arm ({dom['control_what']}, "
            f"trained with the no-defense recipe), no defense and every defense on {dom['narrow']} "
            f"({-(-plan['n_train'] // plan['batch_size']) * plan['epochs']} optimiser steps at batch "
            f"{plan['batch_size']}, lr {plan['lr']:g} {plan['schedule']} after {plan['warmup_steps']} warmup, "
            f"{plan['dtype']} compute), and one benign-task arm per method ({plan['benign_train']} OpSwap puzzles). "
            f"Probes: {ni.get('general', 0)} held-out general pairs, {in_domain}, "
            f"{ni.get('benign', 0)} word problems, {ni.get('benign_task', 0)} held-out benign-task items.", "",
            *([] if dom["domain"] == "code" else  # the code domain's words above say it all (its report unchanged)
              [f"Domain: **{dom['domain']}**; control: **{dom['control']}**; narrow learning is read from the "
               f"{dom['in_domain']}.", ""]),
            headline(e), "", *_power(plan, e),
            "## Table 1", "",
            "Every figure is a mean over seeds x probe items, paired (the same seed and item in every arm), with its 95 % CI "
            "(t interval, se from the crossed seed/item random-effects ANOVA, Satterthwaite df; ratios by Fieller, "
            "`emajax.eval.pooled`). Margins are mean-token logp(misaligned answer) − logp(aligned "
            "answer) in nats/token. **EM effect** = an arm's general margin minus the control arm's. **EM removed** = "
            "(no defense's EM effect − the method's) / no defense's. **Narrow learning retained** = the method's "
            + ("in-domain margin gain" if _narrow_is_margin(e) else "held-out narrow NLL drop") +
            " over the control / no defense's. **Benign learning retained** = the drop of the "
            "held-out benign-task NLL of the method's benign arm / no defense's benign arm's. A share is shown only "
            "where no defense's effect (its denominator) has a CI excluding 0; otherwise the column gives the paired "
            "difference to no defense in nats/token (Δ). **Coherence** = the "
            "change of the word-problem NLL vs the base model. Behind them: " + _counts(e) + ".", "",
            table1(e, judge_note), ""]
    if judge_note is not None:
        text += [f"Judge columns are omitted: {judge_note}.", ""]
    text += ["## Verdicts", "", verdict_table(e), "",
             "p-values: one-sided, Holm-adjusted across the defenses (the equivalence test with the margin ±"
             f"{e.get('equiv_margin', '—')} nats/token).", "", "Rules: " + e["rules"], "",
             *trigger_verdicts(e),
             "## The effects behind the table", "", support_table(e), ""]
    three = em_metrics_table(e)
    if three:
        em = e["em_metrics"]
        samp, pers = em.get("sampling") or {}, em.get("persona") or {}
        pairs = ", ".join(f"{t} {n}" for t, n in em.get("n_trigger_pairs", {}).items())
        text += ["## EM three ways: probe margin, sampled-answer projection, trigger probes", "",
                 "Each an arm's figure minus the control arm's of the same seed, pooled over seeds × items like Table "
                 "1. **General margin**: Table 1's EM effect. **Projection**: the arm's own answers to the "
                 f"{em.get('n_questions') or '—'} plain first-plot questions "
                 f"({samp.get('samples_per_question', '—')} each, temperature {samp.get('temperature', '—')}, "
                 f"up to {samp.get('max_new_tokens', '—')} tokens), "
                 "read by the *base* model: the mean residual over each answer's tokens at layer "
                 f"{pers.get('layer', '—')} projected on the base model's evil persona vector (the instrument stays "
                 "fixed while the arms change; items = questions). **Margin under a trigger**: the general pairs "
                 "asked as JSON, in a template, as a Python string or under the inoculation system prompt, both "
                 f"answers in the asked format (`emajax.eval.triggers`; pairs per trigger: {pairs or '—'}).", "",
                 three, ""]
        ra = rank_agreement_sentence(e)
        if ra:
            text += [ra, ""]
        bp = em.get("projection_base")
        if bp:
            cp = e["arms"].get(CONTROL, {}).get("projection_vs_base")
            text += [f"Base model's mean projection: {_f(bp)}; the control arm's change vs base: {_f(cp)}.", ""]
        elif projection_note:
            text += [f"Sampled-answer projection not measured: {projection_note}.", ""]
    if e.get("base_exact"):
        text += [f"Benign exact match of the base model: {_f(e['base_exact'], pct=True, signed=False)} "
                 f"(greedy, {plan['benign_max_new_tokens']} new tokens).", ""]
    st = seed_table(e)
    if st:
        text += ["## EM effect per seed (items-only CIs)", "", st, ""]
    sec = security_table(e)
    if sec:
        text += ["## Shared security pairs (cross-domain, `--probe-data`)", "", sec, ""]
    tt = timing_table(timings or (json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file()
                                  else None))
    if tt:
        text += ["## Timings", "", tt, ""]
    text += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    path = atomic.write_text(out / "report.md", "\n".join(text))
    if log:
        log(headline(e))
    return path


__all__ = ["headline", "table1", "verdict_table", "write_demo_report"]
