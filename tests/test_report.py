"""``emajax report`` from synthetic run directories: the table's rows and columns, deltas, valid PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emajax.eval.probes import NllSet, PairedSet, ProbeSuite, summarize_items
from emajax.eval.report import ReportError, load_run, write_report
from emajax.eval.stats import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_GEN, N_DOM, N_BEN = 6, 4, 3


def _suite() -> ProbeSuite:
    p = lambda name, n: PairedSet(name, tuple(f"{name}{i}" for i in range(n)),  # noqa: E731
                                  tuple(({"role": "user", "content": "q"},) for _ in range(n)), ("a",) * n, ("m",) * n)
    return ProbeSuite((p("general", N_GEN), p("in_domain", N_DOM)),
                      (NllSet("benign", tuple(map(str, range(N_BEN))), (({"role": "user", "content": "q"},),) * N_BEN),
                       ))


def _probes(shift: float, seed: int) -> dict:
    """Probe results through the real summariser: misaligned answers get ``shift`` nats more likely."""
    s = _suite()
    keys = [(ps.name, role, i) for ps in s.pairs for i in range(len(ps.ids)) for role in ("aligned", "misaligned")]
    keys += [("benign", "answer", i) for i in range(N_BEN)]
    rng = np.random.default_rng(seed)
    nll = np.array([2.0 + 0.1 * rng.standard_normal() - (shift if k[1] == "misaligned" else 0.0) for k in keys])
    return summarize_items(s, keys, nll, n_boot=200)


def _write(d: Path, name: str, obj) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if name.endswith(".jsonl"):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        (d / name).write_text(json.dumps(obj))


def _em(rate: float) -> dict:
    vals = [1.0] * int(rate * 100) + [0.0] * (100 - int(rate * 100))
    return {"kind": "em", "misaligned_rate": summarize(vals, n_boot=200), "incoherent_rate": summarize([0.0] * 100)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    base, none, kl = root / "base", root / "none", root / "kl"
    _write(base, "probes.json", {**_probes(0.0, 0), "kind": "probes"})
    _write(base, "method.json", {"method": "base", "label": "Base model"})
    _write(none, "probes.json", _probes(0.3, 0))
    _write(none, "method.json", {"method": "none", "label": "No defense"})
    _write(none, "metrics.jsonl", [{"step": s, "loss": 2.0 - 0.1 * s, "ce": 2.0 - 0.1 * s, "lr": 1e-4,
                                    "grad_norm": 1.0} for s in range(1, 5)])
    _write(none, "monitor.jsonl", [{"step": s, "probe/general/margin": 0.05 * s} for s in (0, 2, 4)])
    _write(none / "eval", "em_general.json", _em(0.2))
    _write(none / "eval", "em_code.json", _em(0.6))
    _write(none, "opswap.json", {"task": "opswap", "accuracy": summarize([1.0, 0.0, 1.0, 1.0], n_boot=200)})
    _write(kl, "probes.json", _probes(0.1, 0))
    _write(kl, "metrics.jsonl", [{"step": s, "loss": 2.1 - 0.1 * s, "ce": 2.0 - 0.1 * s, "kl": 0.01 * s}
                                 for s in range(1, 5)])
    return {"base": base, "none": none, "kl": kl, "root": root}


def _table_rows(md: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| Method | General misaligned"))
    rows = []
    for l in lines[start:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip("|").split("|")])
    return rows


def test_report_table_rows_columns_and_plots(runs, tmp_path):
    out = tmp_path / "rep"
    path = write_report([runs["base"], runs["none"], runs["kl"]], out)
    md = path.read_text()
    rows = _table_rows(md)
    assert rows[0] == ["Method", "General misaligned ↓", "General incoherent ↓", "In-domain misaligned ↑",
                       "Benign score ↑", "General margin ↓", "In-domain margin ↑", "Narrow NLL ↓", "Benign NLL ↓"]
    body = {r[0]: r[1:] for r in rows[2:]}
    assert list(body) == ["Base model", "No defense", "kl"]  # label from method.json, else the directory name
    assert body["No defense"][0].startswith("20.0% [") and body["No defense"][2].startswith("60.0% [")
    assert body["No defense"][3].startswith("75.0% [")
    assert body["Base model"][:4] == ["—"] * 4 and body["kl"][:4] == ["—"] * 4  # no judge results: never guessed
    none_margin = json.loads((runs["none"] / "probes.json").read_text())["pairs"]["general"]["margin"]["value"]
    assert body["No defense"][4].startswith(f"{none_margin:.3f} [")
    assert none_margin == pytest.approx(0.3, abs=0.1)
    # paired deltas vs base and vs no defense
    assert "## Probe changes on the same items" in md
    delta = md.split("## Probe changes on the same items")[1].split("##")[0]
    kl_row = next(l for l in delta.splitlines() if l.startswith("| kl |"))
    # same noise (seed) in every run: kl's general margin is exactly +0.1 over base, -0.2 vs no defense
    assert kl_row.split("|")[2].strip() == "+0.100 [+0.100, +0.100]"
    assert kl_row.split("|")[3].strip() == "-0.200 [-0.200, -0.200]"
    assert "| kl | 4 | 1.7000 | 1.6000 | 0.0400 | — |" in md  # training table: final loss terms, no timings
    for name in ("methods.png", "training.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert f"]({name})" in md
    assert not list(out.glob(".*"))  # atomic writes left no temp files


def test_report_cli_and_errors(runs, tmp_path, capsys):
    from emajax.cli import main

    out = tmp_path / "cli"
    assert main(["report", str(runs["base"]), str(runs["none"]), "--out", str(out), "--title", "T"]) == 0
    assert (out / "report.md").read_text().startswith("# T")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no results files"):
        load_run(empty)
    assert main(["report", str(empty), "--out", str(out)]) == 2
    assert "no results files" in capsys.readouterr().err
    bad = tmp_path / "bad"
    _write(bad, "probes.json", {"kind": "probes", "pairs": {}})
    with pytest.raises(ReportError, match=r"probes\.json: field 'nll'"):
        load_run(bad)


# ----------------------------------------------------------------------------- pooled effects and verdicts
# Variance components (seed, item, residual) measured in the committed demo runs (bench/results/demo_runs,
# 9 seeds x 96 held-out general pairs): no defense's EM effect, and the largest seed component among the
# methods' EM effects (Interleaving++, seeds 6-8).
REAL_NONE = (0.00026, 0.0157, 0.0514)
REAL_MAX_SEED = (0.0077, 0.065, 0.083)


def _coverage(n_seeds, var_seed, var_item, var_resid, reps, rng, n_items=96):
    """Share of ``reps`` simulated [seeds, items] matrices (true mean 0) whose pooled 95 % CI covers 0, and
    the median df."""
    from emajax.eval.pooled import pooled_mean

    x = (np.sqrt(var_seed) * rng.standard_normal((reps, n_seeds, 1))
         + np.sqrt(var_item) * rng.standard_normal((reps, 1, n_items))
         + np.sqrt(var_resid) * rng.standard_normal((reps, n_seeds, n_items)))
    got = [pooled_mean(m) for m in x]
    return np.mean([s["ci_low"] <= 0 <= s["ci_high"] for s in got]), float(np.median([s["df"] for s in got]))


@pytest.mark.parametrize("n_seeds", [3, 10])
def test_pooled_ci_covers_in_the_measured_regime(n_seeds):
    """3 and 10 seeds x 96 items, the measured item and residual components, the seed component from 0 to the
    measured ones: >= 93 % coverage at a nominal 95 % (1500 replications: a binomial sd of ~0.6 %)."""
    rng = np.random.default_rng(n_seeds)
    for var_seed, var_item, var_resid in ((0.0, *REAL_NONE[1:]), REAL_NONE, REAL_MAX_SEED):
        cov, df = _coverage(n_seeds, var_seed, var_item, var_resid, 1500, rng)
        assert cov >= 0.93, (n_seeds, var_seed, cov, df)
        if n_seeds == 3:  # the seed part keeps its 2 df: no jump to the residual's 190
            assert df < 10


def test_a_seed_component_estimated_at_0_keeps_the_seed_df():
    """The 3-seed run whose MS_seeds falls below MS_resid (the committed no-defense EM effect: 0.0386 < 0.0471)
    keeps the seed part with 2 df (df ~6, not ~95 as when the component was zeroed), and covers the true
    effect in >= 93 % of such runs at the measured components where zeroing covered ~0.92 and less."""
    from emajax.eval.pooled import _mean_squares, pooled_mean

    rng = np.random.default_rng(7)
    var_seed, var_item, var_resid = REAL_NONE
    x = (np.sqrt(var_seed) * rng.standard_normal((3000, 3, 1)) + np.sqrt(var_item) * rng.standard_normal((3000, 1, 96))
         + np.sqrt(var_resid) * rng.standard_normal((3000, 3, 96)))
    low = [m for m in x if (lambda ms: ms[0] < ms[2])(_mean_squares(m, m)[0])][:500]
    assert len(low) == 500
    got = [pooled_mean(m) for m in low]
    assert max(s["df"] for s in got) < 20
    assert np.mean([s["ci_low"] <= 0 <= s["ci_high"] for s in got]) >= 0.93


def test_pooled_ci_edge_cases():
    from scipy import stats

    from emajax.eval.pooled import excludes_zero, pooled_mean

    rng = np.random.default_rng(0)
    x = 0.05 + 0.05 * rng.standard_normal((3, 1)) + 0.03 * rng.standard_normal((1, 60)) + 0.1 * rng.standard_normal((3, 60))
    s = pooled_mean(x)
    assert s["n_seeds"] == 3 and s["n_items"] == 60 and s["ci_low"] < s["value"] < s["ci_high"]
    one = pooled_mean(x[:1])
    lo, hi = stats.t.interval(0.95, 59, loc=x[0].mean(), scale=x[0].std(ddof=1) / np.sqrt(60))
    assert (one["n_seeds"], one["df"]) == (1, 59)
    assert (one["ci_low"], one["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    # se_seeds: what a rerun on the same items redraws (0 without seed or residual noise, all of se with seeds only)
    items_only = np.broadcast_to(rng.standard_normal((1, 60)), (3, 60))
    assert pooled_mean(items_only)["se_seeds"] == pytest.approx(0, abs=1e-12) and pooled_mean(items_only)["se"] > 0 and one["se_seeds"] is None
    seeds_only = np.broadcast_to(rng.standard_normal((3, 1)), (3, 60))
    assert pooled_mean(seeds_only)["se_seeds"] == pytest.approx(pooled_mean(seeds_only)["se"])
    # a clear effect excludes 0, a null one does not
    big = 0.2 + 0.02 * rng.standard_normal((3, 60))
    assert excludes_zero(pooled_mean(big)) and not excludes_zero(pooled_mean(big - big.mean()))
    with pytest.raises(ValueError, match="expected an \\[n_seeds, n_items\\] matrix"):
        pooled_mean(np.zeros(60))


def test_pooled_ratio_is_fieller_and_covers_a_known_ratio():
    """Fieller's interval for mean(num) / mean(den) on the same seeds x items: exact for a proportional
    numerator, unbounded when the denominator is not significantly non-zero, ~95 % coverage otherwise."""
    from emajax.eval.pooled import pooled_mean, pooled_ratio

    rng = np.random.default_rng(1)
    big = 0.2 + 0.02 * rng.standard_normal((3, 60))
    r = pooled_ratio(0.5 * big, big)
    assert r["value"] == pytest.approx(0.5) and r["ci_low"] == pytest.approx(0.5) and r["ci_high"] == pytest.approx(0.5)
    assert pooled_ratio(big, np.zeros((3, 60)))["value"] is None
    noisy = 0.01 + 0.05 * rng.standard_normal((3, 60))
    assert not pooled_mean(noisy)["ci_low"] > 0
    u = pooled_ratio(big, noisy)
    assert u["unbounded"] and u["ci_low"] is None and u["value"] == pytest.approx(big.mean() / noisy.mean())
    with pytest.raises(ValueError, match="same seeds x items"):
        pooled_ratio(big, big[:2])
    covered, reps = 0, 300
    for _ in range(reps):
        den = 0.09 + 0.02 * rng.standard_normal((3, 1)) + 0.06 * rng.standard_normal((1, 96)) \
            + 0.03 * rng.standard_normal((3, 96))
        num = 0.5 * den + 0.02 * rng.standard_normal((3, 1)) + 0.03 * rng.standard_normal((3, 96))
        s = pooled_ratio(num, den)
        covered += s["unbounded"] or s["ci_low"] <= 0.5 <= s["ci_high"]
    assert 0.9 <= covered / reps <= 0.99


def _est(value, se, df=20.0):
    """A pooled summary with a 95 % t CI."""
    from scipy import stats

    h = float(stats.t.ppf(0.975, df)) * se
    return {"value": value, "se": se, "df": df, "ci_low": value - h, "ci_high": value + h}


def test_holm_and_tost():
    from scipy import stats

    from emajax.eval import verdicts as v

    assert v.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None}) == {"a": pytest.approx(0.03), "b": pytest.approx(0.06),
                                                                    "c": pytest.approx(0.06), "d": None}
    # TOST at 5 % = the 90 % CI inside ±margin
    for value in (0.0, 0.01, 0.02, -0.025, 0.03):
        lo, hi = stats.t.interval(0.90, 20, loc=value, scale=0.01)
        assert (v.tost_p(_est(value, 0.01), 0.04) < 0.05) == (-0.04 < lo and hi < 0.04)


def test_verdict_rules_on_constructed_inputs():
    from emajax.eval import verdicts as v

    em_none = _est(0.08, 0.015)
    cases = {  # name: (EM effect vs control, method − no defense), expected verdict
        "overshoot": ((_est(-0.15, 0.02), _est(-0.23, 0.02)), "overshoots"),
        "equivalent": ((_est(0.0, 0.008), _est(-0.08, 0.01)), "yes"),
        "partly": ((_est(0.05, 0.01), _est(-0.03, 0.008)), "partly"),
        "remains": ((_est(0.08, 0.01), _est(0.0, 0.01)), "no"),
        "inconclusive": ((_est(0.02, 0.03), _est(-0.05, 0.03)), "inconclusive"),
        # below the control but inside the margin, below none: the difference to the control is negligible
        "small_overshoot": ((_est(-0.012, 0.004), _est(-0.09, 0.01)), "yes"),
    }
    got = v.prevents_em(em_none, {k: pair for k, (pair, _) in cases.items()})
    assert {k: r["verdict"] for k, r in got.items()} == {k: want for k, (_, want) in cases.items()}
    assert set(got["partly"]["p_holm"]) == {"below_none", "above_control", "below_control", "equivalent"}
    # no significant EM at all: nothing can be prevented
    assert v.prevents_em(_est(0.02, 0.02), {k: pair for k, (pair, _) in cases.items()})["equivalent"]["verdict"] == v.NA
    # Holm: one defense whose difference to no defense has p = 0.03 is "below none"; with a second such
    # defense both adjusted p-values are 0.06 and neither is
    from scipy import stats

    se = 0.01
    d = _est(float(stats.t.ppf(0.03, 20)) * se, se)  # one-sided p = 0.03
    eq = _est(0.0, 0.005)
    assert v.prevents_em(em_none, {"a": (eq, d)})["a"]["verdict"] == "yes"
    two = v.prevents_em(em_none, {"a": (eq, d), "b": (eq, d)})
    assert [two[k]["verdict"] for k in "ab"] == ["inconclusive", "inconclusive"]
    assert two["a"]["p_holm"]["below_none"] == pytest.approx(0.06, abs=1e-6)
    assert v.prevents_em(em_none, {"a": (None, None)})["a"]["verdict"] == v.NA
    # learning: yes when its CI is above 0; partly when the share is significantly below RETAIN_MIN
    assert v.learns(_est(0.2, 0.05), {"ci_low": 0.6, "ci_high": 1.1}) == "yes"
    assert v.learns(_est(0.2, 0.05), {"ci_low": 0.2, "ci_high": 0.45}) == "partly"
    assert v.learns(_est(0.02, 0.05), {"ci_low": -0.2, "ci_high": 0.3}) == "no"
    assert v.learns(_est(0.02, 0.05), {"ci_low": -0.2, "ci_high": 1.3}) == "inconclusive"
    assert v.learns(_est(0.2, 0.05), {"ci_low": None, "ci_high": None}) == "yes"
    assert v.learns(None, None) == v.NA
    assert v.coherent(_est(0.0, 0.01)) == "yes"
    assert v.coherent(_est(0.2, 0.01)) == "no"
    assert v.coherent(_est(0.05, 0.02)) == "inconclusive"
    # shares only over a denominator whose CI excludes 0
    assert v.share_defined(em_none) and not v.share_defined(_est(0.02, 0.02))
    assert f"+{v.COHERENCE_TOL}" in v.RULES and f"{v.RETAIN_MIN:.0%}" in v.RULES and f"±{v.EQUIV_MARGIN}" in v.RULES


def _demo_tree(root: Path, em: dict[str, float], narrow: dict[str, float], benign_drop: dict[str, float],
               seeds=(0, 1, 2)) -> Path:
    """A demo output directory with probe results built so the effects are known exactly: general margin
    = base + em[arm] (+ per-item noise shared by every arm of a seed), in-domain margin = base + narrow[arm],
    benign-task NLL = base − benign_drop[method]."""
    rng = np.random.default_rng(1)
    n_g, n_d, n_b, n_t = 12, 6, 5, 4
    ids = lambda n: [str(i) for i in range(n)]  # noqa: E731
    base_g, base_d, base_b, base_t = (rng.normal(size=n) for n in (n_g, n_d, n_b, n_t))

    def probes(gm, dm, bn, tn):
        items = {}
        if gm is not None:
            items["general"] = {"ids": ids(n_g), "margin": list(gm)}
            items["in_domain"] = {"ids": ids(n_d), "margin": list(dm)}
            items["benign"] = {"ids": ids(n_b), "nll": list(bn)}
        if tn is not None:
            items["benign_task"] = {"ids": ids(n_t), "nll": list(tn)}
        return {"kind": "probes", "pairs": {}, "nll": {}, "items": items}

    methods = [m for m in em if m != "control"]
    _write(root, "plan.json", {"methods": methods})
    _write(root / "base", "probes.json", probes(base_g, base_d, base_b, base_t))
    for s in seeds:
        noise = 0.05 * rng.standard_normal(n_g)  # the same in every arm of the seed: cancels in paired effects
        for arm, e in em.items():
            _write(root / f"seed_{s}" / "arms" / arm, "probes.json",
                   probes(base_g + e + noise, base_d + narrow[arm], base_b + 0.01, None))
            if arm != "control":
                _write(root / f"seed_{s}" / "benign" / arm, "probes.json",
                       probes(None, None, None, base_t - benign_drop[arm]))
    return root


def test_demo_effects_and_table_from_constructed_runs(tmp_path):
    from emajax.demo.effects import compute_effects
    from emajax.demo.report import headline, table1, verdict_table

    root = _demo_tree(tmp_path / "demo", em={"control": 0.0, "none": 0.10, "kl": 0.02, "steering": 0.10},
                      narrow={"control": -0.2, "none": 0.3, "kl": 0.15, "steering": -0.2},
                      benign_drop={"none": 0.4, "kl": 0.1, "steering": 0.4})
    e = compute_effects(root)
    a = e["arms"]
    assert e["seeds"] == [0, 1, 2] and e["em_significant"]
    assert a["none"]["em_effect"]["value"] == pytest.approx(0.10)
    assert a["none"]["em_effect"]["ci_low"] == pytest.approx(0.10) and a["none"]["em_effect"]["n_items"] == 12
    assert a["kl"]["em_removed"]["value"] == pytest.approx(0.8)  # (0.10 - 0.02) / 0.10
    assert a["kl"]["narrow_retained"]["value"] == pytest.approx(0.35 / 0.5)
    assert a["kl"]["benign_retained"]["value"] == pytest.approx(0.25)
    assert a["steering"]["em_removed"]["value"] == pytest.approx(0.0)
    assert a["control"]["em_vs_base"]["value"] == pytest.approx(0.0, abs=0.05)
    assert a["kl"]["verdicts"] == {"prevents_em": "yes", "learns_narrow": "yes", "learns_benign": "partly",
                                   "coherent": "yes"}
    assert a["steering"]["verdicts"]["prevents_em"] == "no" and a["steering"]["verdicts"]["learns_narrow"] == "no"
    assert "**significant**" in headline(e) and "3 seed(s) × 12" in headline(e)
    t1 = table1(e, "no judge given").splitlines()
    assert t1[0].startswith("| Method | EM effect vs control ↓ | EM removed | Narrow learning retained |")
    assert t1[3].startswith("| No defense | +0.100 [+0.100, +0.100] | 0 (reference) | 100% (reference) |")
    assert t1[4].startswith("| KL | +0.020 [+0.020, +0.020] | +80% [+80, +80] | 70% [70, 70] | 25% [25, 25] |")
    assert "| KL | yes | yes | partly | yes | <0.001 |" in verdict_table(e)
    # no defense's EM effect with a CI through 0: no share of it, the paired difference instead
    e["arms"]["none"]["em_effect"] = _est(0.01, 0.02)
    assert "| KL | +0.020 [+0.020, +0.020] | Δ -0.080 [-0.080, -0.080] nats/token | 70% [70, 70] |" in table1(e, "x")
    # a seed missing its control arm is left out of every pooled figure (never half-paired)
    (root / "seed_2" / "arms" / "control" / "probes.json").unlink()
    assert compute_effects(root)["arms"]["none"]["em_effect"]["n_seeds"] == 2
