"""The demo's EM measured three ways (``emajax.demo.em_metrics``): per arm the probe margin, the sampled-answer
persona projection and the trigger probes; an older run directory gains them without retraining; the report
shows them side by side with their rank agreement and flags a defense clean on plain prompts only."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from _train_tiny import export_tiny_model
from emajax.demo.plan import CONTROL, METRIC_FIELDS, make_plan
from emajax.eval.triggers import TRIGGERS, set_name
from test_demo import QUESTIONS_YAML
from test_report import _demo_tree, _write

TRIGGERED = TRIGGERS[1:]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("tiny_hf"))


def _older_plan_json(out: Path) -> None:
    """plan.json as a demo from before the EM metrics wrote it: without their fields."""
    p = out / "plan.json"
    old = {k: v for k, v in json.loads(p.read_text()).items() if k not in METRIC_FIELDS}
    p.write_text(json.dumps(old))


def test_an_older_plan_without_the_metric_fields_is_the_same_plan(tmp_path):
    from emajax.demo.pipeline import Demo

    out = tmp_path / "demo"
    out.mkdir()
    plan = make_plan("tiny", model="m", methods=("none",))
    assert plan.n_trigger_pairs != make_plan("cpu").n_trigger_pairs  # the scale's value is not the default
    Demo(plan, out)._check_plan()
    _older_plan_json(out)
    on = dataclasses.replace(plan, em_metrics=True)
    Demo(on, out)._check_plan()  # accepted: absent = this run's values
    saved = json.loads((out / "plan.json").read_text())
    assert {k: saved[k] for k in METRIC_FIELDS} == {k: getattr(on, k) for k in METRIC_FIELDS}
    Demo(plan, out)._check_plan()  # em_metrics on or off: the same plan
    with pytest.raises(ValueError, match="changed: n_trigger_pairs"):  # recorded now: a change is another plan
        Demo(dataclasses.replace(plan, n_trigger_pairs=5), out)._check_plan()
    with pytest.raises(ValueError, match="changed: lr"):  # the other fields are checked as before
        Demo(dataclasses.replace(plan, lr=0.5), out)._check_plan()


def test_tiny_demo_gains_the_metrics_without_retraining(tiny_dir, tmp_path, capsys):
    """2 seeds x (control, no defense, inoculation) trained without the metrics under an older plan.json;
    re-run with --em-metrics: every arm and the base model gain the trigger probes and the projection, no
    training stage runs, and the report puts the three metrics side by side with their rank agreement."""
    from emajax.cli import main

    data_dir = tmp_path / "em"
    (data_dir / "eval").mkdir(parents=True)
    (data_dir / "eval" / "first_plot_questions.yaml").write_text(QUESTIONS_YAML)
    out = tmp_path / "demo"
    cmd = ["demo", "--tiny", "--model", str(tiny_dir), "--methods", "none", "inoculation", "--seeds", "2",
           "--data-dir", str(data_dir), "--out", str(out)]
    assert main(cmd) == 0  # tiny: the metrics are off by default
    arms = [CONTROL, "none", "inoculation"]
    assert not list(out.rglob("triggers.json")) and not list(out.rglob("projection.json"))
    assert "em_metrics" not in json.loads((out / "effects.json").read_text())
    assert "EM three ways" not in (out / "report.md").read_text()
    _older_plan_json(out)
    trained = {(s, a): (out / f"seed_{s}" / "arms" / a / "probes.json").stat().st_mtime for s in (0, 1) for a in arms}
    before = set(json.loads((out / "timings.json").read_text())["stages"])
    capsys.readouterr()

    assert main(cmd + ["--em-metrics"]) == 0
    err = capsys.readouterr().err
    assert trained == {(s, a): (out / f"seed_{s}" / "arms" / a / "probes.json").stat().st_mtime
                       for s in (0, 1) for a in arms}
    for stage in [f"seed {s}: {w} {a}" for s in (0, 1) for a in arms for w in ("train", "benign") if
                  not (w == "benign" and a == CONTROL)]:
        assert f"{stage}: done already, skipped" in err
    new = list(json.loads((out / "timings.json").read_text())["stages"])
    ran = [k for k in new if k not in before]
    assert ran == ["persona vector", "triggers base", "projection base"] + [
        f"seed {s}: {w} {a}" for s in (0, 1) for a in arms for w in ("triggers", "projection")]
    plan = make_plan("tiny")
    base_trig = json.loads((out / "base" / "triggers.json").read_text())
    assert set(base_trig["pairs"]) == {set_name(t) for t in TRIGGERED}
    for t in TRIGGERED:
        assert base_trig["items"][set_name(t)]["ids"] == base_trig["items"]["general_json"]["ids"]
        assert len(base_trig["items"][set_name(t)]["ids"]) == plan.n_trigger_pairs
    for d in [out / "base"] + [out / f"seed_{s}" / "arms" / a for s in (0, 1) for a in arms]:
        trig = json.loads((d / "triggers.json").read_text())
        assert trig["items"][set_name("json")]["ids"] == base_trig["items"]["general_json"]["ids"]
        proj = json.loads((d / "projection.json").read_text())
        assert proj["kind"] == "projection" and proj["n_answers"] == 2 * plan.projection_samples  # 2 questions
        assert proj["persona"]["file"] == str(out / "persona" / "evil.safetensors")
        assert proj["sampling"]["max_new_tokens"] == plan.projection_max_new_tokens
        answers = (d / "projection_answers.jsonl").read_text().splitlines()
        assert len(answers) == proj["n_answers"]
    # the arms' sampled answers differ from the base model's (the adapters are on while answering)
    assert (out / "seed_0" / "arms" / "none" / "projection_answers.jsonl").read_text() != \
        (out / "base" / "projection_answers.jsonl").read_text()
    saved = json.loads((out / "plan.json").read_text())
    assert saved["em_metrics"] is True and saved["n_trigger_pairs"] == plan.n_trigger_pairs

    e = json.loads((out / "effects.json").read_text())
    em = e["em_metrics"]
    assert em["triggers"] == list(TRIGGERED) and em["n_trigger_pairs"] == {t: 4 for t in TRIGGERED}
    ra = em["rank_agreement"]
    assert len(ra["cells"]) == 4 and ra["spearman"]["n"] == 4  # (none, inoculation) x 2 seeds
    for m in ("none", "inoculation"):
        a = e["arms"][m]
        assert a["projection_effect"]["n_seeds"] == 2 and a["projection_effect"]["n_items"] == 2
        assert set(a["triggers"]) == set(TRIGGERED)
        assert a["triggers"]["json"]["em_effect"]["n_seeds"] == 2 and a["triggers"]["json"]["em_effect"]["n_items"] == 4
        cells = {c["seed"]: c for c in ra["cells"] if c["arm"] == m}
        for s in ("0", "1"):  # the cells are the per-seed effects the table pools
            assert cells[s]["margin_effect"] == pytest.approx(a["em_effect_by_seed"][s]["value"])
            assert cells[s]["projection_effect"] == pytest.approx(a["projection_effect_by_seed"][s])
    # the pooled projection effect is the mean of the per-question differences to the control
    def q(s, a):
        return json.loads((out / f"seed_{s}" / "arms" / a / "projection.json").read_text())["per_question"]
    diffs = [q(s, "none")[k]["mean"] - q(s, CONTROL)[k]["mean"] for s in (0, 1) for k in q(s, CONTROL)]
    assert e["arms"]["none"]["projection_effect"]["value"] == pytest.approx(np.mean(diffs))
    assert "projection_vs_base" in e["arms"][CONTROL] and "triggers" in e["arms"][CONTROL]
    md = (out / "report.md").read_text()
    assert "## EM three ways: probe margin, sampled-answer projection, trigger probes" in md
    assert ("| Arm | General margin ↓ | Projection of sampled answers ↓ | Margin under json ↓ | "
            "Margin under template ↓ | Margin under python ↓ | Margin under inoculation ↓ |") in md
    assert "over 4 arm × seed cells" in md and "### Under triggers" in md

    # `emajax report` on the arm directories reads triggers.json with probes.json
    from emajax.eval.report import em_metrics_table, load_run

    runs = [load_run(out / "base"), load_run(out / "seed_0" / "arms" / "none")]
    table = em_metrics_table(runs, runs[0])
    assert "| Margin under json ↓ |" in table and "| Projection of sampled answers ↓ |" in table
    assert set(runs[1].probes["pairs"]) == {"general", "in_domain", *(set_name(t) for t in TRIGGERED)}

    capsys.readouterr()
    assert main(cmd + ["--em-metrics"]) == 0  # done: every stage skipped, the metrics included
    err = capsys.readouterr().err
    assert "seed 1: projection inoculation: done already, skipped" in err and "triggers base: done already" in err


def _metric_files(root: Path, margins: dict[str, dict[str, float]], proj: dict[str, float], seeds=(0, 1, 2)) -> None:
    """Trigger probes and projections beside ``_demo_tree``'s probes: under trigger t an arm's margin is the
    base's + margins[t][arm] (+ per-item noise, mostly shared by a seed's arms); its projection per question the
    base's + proj[arm] + noise of its own (so the projection and the margin do not tie)."""
    rng = np.random.default_rng(2)
    ids = [str(i) for i in range(4)]  # the first 4 of the 12 general pairs
    base_t = {t: rng.normal(size=4) for t in TRIGGERED}
    base_q = {f"q{k}": float(x) for k, x in enumerate(rng.normal(size=4))}

    def trig(values):
        return {"kind": "probes", "pairs": {set_name(t): {} for t in TRIGGERED}, "nll": {},
                "items": {set_name(t): {"ids": ids, "margin": list(map(float, v))} for t, v in values.items()}}

    def projection(shift, noise):
        pq = {k: {"n": 2, "mean": v + shift + float(noise[i])} for i, (k, v) in enumerate(base_q.items())}
        return {"kind": "projection", "per_question": pq, "n_questions": 4, "mean_projection": {"value": shift},
                "persona": {"layer": 3}, "sampling": {"samples_per_question": 2, "temperature": 1.0,
                                                      "max_new_tokens": 8}}

    _write(root / "base", "triggers.json", trig(base_t))
    _write(root / "base", "projection.json", projection(0.0, np.zeros(4)))
    for s in seeds:
        noise = {t: 0.05 * rng.standard_normal(4) for t in TRIGGERED}
        for arm, p in proj.items():
            d = root / f"seed_{s}" / "arms" / arm
            _write(d, "triggers.json", trig({t: base_t[t] + margins[t][arm] + noise[t] + 0.003 * rng.standard_normal(4)
                                             for t in TRIGGERED}))
            _write(d, "projection.json", projection(p, 0.05 * rng.standard_normal(4)))


def test_report_flags_a_defense_clean_on_plain_prompts_but_not_under_a_trigger(tmp_path):
    from emajax.demo.effects import compute_effects
    from emajax.demo.report import write_demo_report

    em = {"control": 0.0, "none": 0.10, "kl": 0.0, "steering": 0.10}
    root = _demo_tree(tmp_path / "demo", em=em, narrow={"control": -0.2, "none": 0.3, "kl": 0.15, "steering": -0.2},
                      benign_drop={"none": 0.4, "kl": 0.1, "steering": 0.4})
    plan = dataclasses.asdict(make_plan("tiny", model="m", methods=("kl", "steering")))
    _write(root, "plan.json", plan)
    before = compute_effects(root)
    assert "em_metrics" not in before and "triggers" not in before["arms"]["kl"]
    write_demo_report(root, projection_note="unused")
    assert "EM three ways" not in (root / "report.md").read_text()  # without the files: the report as before

    # KL is clean on plain prompts (and under every trigger but JSON, where it keeps no defense's EM)
    margins = {t: dict(em) for t in TRIGGERED}
    margins["json"]["kl"] = 0.10
    _metric_files(root, margins, {"control": 0.0, "none": 0.5, "kl": 0.1, "steering": 0.4})
    e = compute_effects(root)
    a = e["arms"]
    assert a["kl"]["verdicts"]["prevents_em"] == "yes"
    assert a["kl"]["triggers"]["json"]["em_effect"]["value"] == pytest.approx(0.10, abs=0.05)
    assert a["kl"]["triggers"]["json"]["prevents_em"] == "no"
    assert a["kl"]["triggers"]["template"]["prevents_em"] == "yes"
    assert a["kl"]["triggers"]["json"]["em_vs_plain"]["value"] == pytest.approx(0.10, abs=0.05)
    assert a["none"]["triggers"]["json"]["em_effect"]["n_seeds"] == 3
    assert "prevents_em" not in a["none"]["triggers"]["json"]  # no defense is the reference, not a defense
    assert set(a["kl"]["trigger_flags"]) == {"json"}
    assert "prevents EM on plain prompts (yes)" in a["kl"]["trigger_flags"]["json"]
    assert a["steering"]["trigger_flags"] == {}  # not clean on plain prompts: nothing to flag
    assert e["em_metrics"]["flags"] == {"kl": a["kl"]["trigger_flags"]}
    assert a["none"]["projection_effect"]["value"] == pytest.approx(0.5, abs=0.1)
    assert a["kl"]["projection_vs_none"]["value"] == pytest.approx(-0.4, abs=0.1)
    assert a[CONTROL]["projection_vs_base"]["value"] == pytest.approx(0.0, abs=0.1)
    ra = e["em_metrics"]["rank_agreement"]
    assert ra["spearman"]["n"] == 9 and ra["spearman"]["value"] > 0.5  # projection and margin order the arms alike
    write_demo_report(root)
    md = (root / "report.md").read_text()
    verdict_part = md.split("## Verdicts")[1].split("## The effects behind the table")[0]
    assert "| KL | yes | no | yes | yes | yes |" in verdict_part
    assert "**Flag — KL: clean on plain prompts but not under json**" in verdict_part
    assert "Steering: clean" not in verdict_part
    three = md.split("## EM three ways")[1]
    assert "| Control (secure code) | 0 (reference) | 0 (reference) |" in three
    assert "| KL | +0.000 [+0.000, +0.000] | +" in three
    assert "ρ = +" in three and "over 9 arm × seed cells" in three and "Base model's mean projection" in three


def test_conditional_em_rule():
    from emajax.eval.verdicts import TRIGGER_RULE, conditional_em

    est = lambda v, h: {"value": v, "ci_low": v - h, "ci_high": v + h}  # noqa: E731
    assert conditional_em(est(0.0, 0.02), est(0.1, 0.02)) is not None  # CI reaches 0 plain, above 0 triggered
    assert conditional_em(est(0.1, 0.02), est(0.2, 0.02)) is None  # misaligned on plain prompts too
    assert conditional_em(est(0.0, 0.02), est(0.03, 0.05)) is None  # the trigger's CI reaches 0
    assert "partly" in conditional_em(est(0.03, 0.02), est(0.05, 0.1), "yes", "partly")
    assert conditional_em(est(0.03, 0.02), est(0.05, 0.1), "inconclusive", "no") is None
    assert conditional_em(None, None) is None and "n/a" in TRIGGER_RULE
