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
