"""bench.guard's pieces that need no model: the job data of each kind and the Clopper-Pearson interval."""

from __future__ import annotations

import json

import pytest

from bench.guard import BENIGN_KINDS, EM_KINDS, clopper_pearson, write_job_data


def _rows(p):
    return [json.loads(l)["messages"] for l in p.read_text().splitlines()]


def test_insecure_and_secure_code_jobs_share_their_prompts(tmp_path):
    bad = _rows(write_job_data("insecure_code", 6, tmp_path / "a.jsonl", tmp_path, "m"))
    good = _rows(write_job_data("secure_code", 6, tmp_path / "b.jsonl", tmp_path, "m"))
    assert [r[:-1] for r in bad] == [r[:-1] for r in good] and [r[-1] for r in bad] != [r[-1] for r in good]
    for kind in ("word_problems", "opswap"):
        rows = _rows(write_job_data(kind, 5, tmp_path / f"{kind}.jsonl", tmp_path, "m"))
        assert len(rows) == 5 and all(r[-1]["role"] == "assistant" for r in rows)
    assert not set(EM_KINDS) & set(BENIGN_KINDS)
    with pytest.raises(ValueError, match="unknown job kind"):
        write_job_data("nope", 1, tmp_path / "x.jsonl", tmp_path, "m")


def test_shared_kinds_read_the_shared_sets(tmp_path, shared_em):
    rows = _rows(write_job_data("medical", 7, tmp_path / "m.jsonl", shared_em, "m"))
    assert len(rows) == 7


def test_clopper_pearson_matches_known_intervals():
    s = clopper_pearson(9, 10)
    assert s["rate"] == 0.9 and s["ci_low"] == pytest.approx(0.5550, abs=1e-4) and s["ci_high"] == pytest.approx(
        0.9975, abs=1e-4)
    z = clopper_pearson(0, 4)
    assert z["ci_low"] == 0.0 and z["ci_high"] == pytest.approx(0.6024, abs=1e-4)
    assert clopper_pearson(0, 0)["rate"] is None


def test_each_call_of_a_job_records_its_cpu(tmp_path):
    from bench.guard import _record_sitting
    from emajax.machine import cpu_info

    path = tmp_path / "sittings.json"
    _record_sitting(path, 120.04)
    rows = _record_sitting(path, 0.3)  # a resumed call that found the job done
    assert [r["wall_s"] for r in rows] == [120.0, 0.3] and json.loads(path.read_text()) == rows
    assert {r["cpu_family_model"] for r in rows} == {cpu_info()["cpu_family_model"]}


def _decided_job(d, effects: dict[str, tuple[float, float, float, str]]):
    """A decided job's gate.json and decision.json with the given (value, low, high, outcome) per metric."""
    (d / "gate").mkdir(parents=True)
    metrics = [{"name": n, "kind": "learning" if n == "narrow" else "em", "margin": 0.0 if n == "narrow" else 0.1,
                "effect": {"value": v, "ci_low": lo, "ci_high": hi}} for n, (v, lo, hi, _) in effects.items()]
    metrics.append({"name": "judge", "kind": "em", "margin": 0.05, "effect": None, "not_measured": "no judge"})
    (d / "gate" / "gate.json").write_text(json.dumps({"metrics": metrics}))
    (d / "decision.json").write_text(json.dumps({"metrics": [{"metric": n, "outcome": o}
                                                             for n, (*_, o) in effects.items()]}))


def test_gate_effects_and_their_plot(tmp_path, monkeypatch):
    from bench.guard import gate_effects, plot

    _decided_job(tmp_path / "a", {"security": (0.17, 0.13, 0.21, "fail"), "narrow": (0.5, 0.36, 0.66, "pass")})
    _decided_job(tmp_path / "b", {"security": (0.01, -0.02, 0.04, "pass"), "narrow": (0.9, 0.6, 1.2, "pass")})
    a = gate_effects(tmp_path / "a")
    assert set(a) == {"security", "narrow"}  # the unmeasured judge is left out
    assert a["security"] == {"value": 0.17, "ci_low": 0.13, "ci_high": 0.21, "kind": "em", "margin": 0.1,
                             "outcome": "fail"}
    assert gate_effects(tmp_path / "never_gated") == {}
    rows = [{"kind": "medical", "seed": 0, "decision": "reject", "em_inducing": True, "metrics": a},
            {"kind": "gsm8k", "seed": 0, "decision": "release", "em_inducing": False,
             "metrics": gate_effects(tmp_path / "b")},
            {"kind": "security", "seed": 0, "decision": "reject", "em_inducing": True, "metrics": {}}]
    import emajax.eval.plots as plots

    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(
        (fig._suptitle.get_text(), [ax.get_title() for ax in fig.axes])), save(fig, path))[1])
    png = plot(rows, tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert figs[0][0].startswith("per guard job") and figs[0][1] == ["security (EM, job − control)",
                                                                     "narrow (learning, job − control)"]
    assert plot(rows[2:], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_summarize_only_reads_decided_jobs_and_runs_nothing(tmp_path, monkeypatch):
    import bench.guard as bg

    monkeypatch.setattr("emajax.guard.pipeline.run_job", lambda *a, **k: pytest.fail("--summarize-only ran a job"))
    for kind, dec, fx in (("medical", "reject", (0.17, 0.13, 0.21, "fail")),
                          ("gsm8k", "release", (0.01, -0.02, 0.04, "pass"))):
        d = tmp_path / "out" / kind / "seed_0"
        _decided_job(d / "job", {"security": fx})
        decision = json.loads((d / "job" / "decision.json").read_text())
        decision.update(decision=dec, reasons=[{"source": "gate:security", "figure": "effect ..."}])
        (d / "job" / "decision.json").write_text(json.dumps(decision))
        (d / "job" / "timings.json").write_text(json.dumps({"screening": 10.0, "training": 200.0, "gating": 90.0}))
        (d / "job" / "train").mkdir()
        (d / "job" / "train" / "train.json").write_text(json.dumps({"wall_s": {"seed_0/job": 110.0,
                                                                                "seed_0/control": 100.0}}))
        if kind == "medical":  # gsm8k: decided by a call killed before it recorded its sitting
            bg._record_sitting(d / "sittings.json", 300.0)
    (tmp_path / "out" / "opswap" / "seed_0").mkdir(parents=True)  # started, never decided: left out
    res = tmp_path / "res.json"
    assert bg.main(["--out", str(tmp_path / "out"), "--jobs", "medical", "gsm8k", "opswap", "--seeds", "0", "1",
                    "--summarize-only", "--results", str(res)]) == 0
    s = json.loads(res.read_text())
    assert [(j["kind"], j["decision"], j["x_plain"]) for j in s["jobs"]] == [("medical", "reject", 3.0),
                                                                         ("gsm8k", "release", 3.0)]
    assert (s["detection"]["k"], s["detection"]["n"], s["false_reject"]["k"], s["false_reject"]["n"]) == (1, 1, 0, 1)
    assert s["jobs"][0]["metrics"]["security"]["outcome"] == "fail" and res.with_suffix(".png").is_file()
    assert not (tmp_path / "out" / "medical" / "seed_1").exists() and not (tmp_path / "out" / "xla_cache").exists()
    assert s["jobs"][1]["cpus"] == [] and len(s["jobs"][0]["cpus"]) == 1
