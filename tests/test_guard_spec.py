"""Bad guard job and policy files: one clear error each, naming the file and the field; and screening's
format checks on bad data rows (file:line:field), without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emajax.cli import main
from emajax.guard.spec import GuardSpecError, load_job, load_policy

REPO = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _job(tmp_path, text, data=True):
    if data:
        (tmp_path / "d.jsonl").write_text(json.dumps(CHAT) + "\n")
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_the_default_policy_and_a_minimal_job_load(tmp_path):
    pol = load_policy(REPO / "configs/guard/default.yaml")
    assert pol.safety_net.method == "interleave_pp" and set(pol.gate.metrics) == {"general", "security", "narrow", "judge"}
    assert not pol.gate.metrics["judge"].required and pol.gate.judge_url is None
    job = load_job(_job(tmp_path, f"data: d.jsonl\npolicy: {REPO / 'configs/guard/default.yaml'}\nseeds: [4]\n"))
    assert job.id == "job" and job.policy.seeds == [4] and job.data == str(tmp_path / "d.jsonl")
    assert job.model == "smollm2-135m-instruct"


BAD = [
    ("policy: {}\n", "data", "missing"),
    ("data: nope.jsonl\npolicy: {}\n", "data", "not found"),
    ("data: d.jsonl\n", "policy", "missing"),
    ("data: d.jsonl\npolicy: {}\nwat: 1\n", "wat", "unknown key"),
    ("id: 'a b'\ndata: d.jsonl\npolicy: {}\n", "id", "letters, digits"),
    ("data: d.jsonl\npolicy: {}\nseeds: [1, 1]\n", "seeds", "distinct integers"),
    ("data: d.jsonl\npolicy: {seeds: []}\n", "policy.seeds", "non-empty"),
    ("data: d.jsonl\npolicy: {safety_net: {method: magic}}\n", "policy.safety_net.method", "must be one of"),
    ("data: d.jsonl\npolicy: {safety_net: {ratio: 1.5}}\n", "policy.safety_net.ratio", "[0, 1)"),
    ("data: d.jsonl\npolicy: {gate: {metrics: {vibes: {margin: 1}}}}\n", "policy.gate.metrics.vibes", "unknown metric"),
    ("data: d.jsonl\npolicy: {gate: {metrics: {general: {margn: 1}}}}\n", "policy.gate.metrics.general.margn",
     "unknown key"),
    ("data: d.jsonl\npolicy: {gate: {on_inconclusive: shrug}}\n", "policy.gate.on_inconclusive", "must be one of"),
    ("data: d.jsonl\npolicy: {screen: {max_refusal_share: 2}}\n", "policy.screen.max_refusal_share", "[0, 1]"),
    ("data: d.jsonl\npolicy: {screen: {max_format_errors: lots}}\n", "policy.screen.max_format_errors", "integer"),
    ("data: d.jsonl\npolicy: {recipe: {optim: {lr: fast}}}\n", "policy.recipe.optim.lr", "number"),
    ("data: d.jsonl\npolicy: {recipe: {defenses: {}}}\n", "policy.recipe.defenses", "set by the guard"),
    ("data: d.jsonl\npolicy: {defenses: {kl: {weight: -1}}}\n", "policy.defenses", ">= 0"),
    ("data: d.jsonl\npolicy: {misaligned: {med: d.jsonl}}\n", "policy.misaligned.med", "not a PEFT adapter"),
    ("data: d.jsonl\npolicy: {references: {persona_vector: gone.safetensors}}\n", "policy.references.persona_vector",
     "not found"),
    ("data: d.jsonl\npolicy: missing.yaml\n", "policy", "not found"),
    ("data: [d.jsonl\n", None, "invalid YAML"),
]


@pytest.mark.parametrize("text,field,msg", BAD)
def test_bad_job_files_give_one_clear_error_naming_file_and_field(tmp_path, text, field, msg):
    p = _job(tmp_path, text)
    with pytest.raises(GuardSpecError) as e:
        load_job(p)
    s = str(e.value)
    assert s.startswith(str(p)) and msg in s and "\n" not in s
    if field is not None:
        assert f": {field}:" in s or f": {field} " in s, s


def test_the_cli_prints_the_error_as_one_line_and_writes_nothing(tmp_path, capsys):
    p = _job(tmp_path, "data: d.jsonl\npolicy: {gate: {on_inconclusive: shrug}}\n")
    out = tmp_path / "jobs" / "x"
    assert main(["guard", "run", str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("emajax guard: error:") and "policy.gate.on_inconclusive" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["guard", "submit", str(p), "--store", str(tmp_path / "store")]) == 2
    assert main(["guard", "list", "--store", str(tmp_path / "store")]) == 0
    assert capsys.readouterr().out == ""  # nothing was queued


def test_screen_format_checks_every_line(tmp_path):
    from emajax.guard.screen import check_format, duplicate_groups, refusal_lines, split_holdout

    lines = [json.dumps(CHAT), "{not json", json.dumps({"msgs": []}),
             json.dumps({"messages": [{"role": "user", "content": "q"}]}),
             json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}),
             json.dumps({"messages": [{"role": "user", "content": " Q "}, {"role": "assistant", "content": "A"}]}),
             json.dumps({"messages": [{"role": "user", "content": "x"},
                                      {"role": "assistant", "content": "I'm sorry, I can't help with that."}]})]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    rows, errors = check_format(p)
    assert [r[0] for r in rows] == [1, 6, 7]
    assert [(e["line"], e["field"]) for e in errors] == [(2, None), (3, "messages"), (4, "messages[0].role"),
                                                         (5, "messages")]
    assert errors[3]["error"].startswith(f"{p}:5: field 'messages'[0]: field 'content' must be a string")
    assert duplicate_groups(rows) == [[1, 6]] and refusal_lines(rows) == [7]
    keep, hold = split_holdout(10, 0.1, seed=0)
    assert len(hold) == 1 and sorted(keep + hold) == list(range(10))
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(1, 0.1)


def test_a_registered_metric_becomes_a_policy_key_with_its_defaults(tmp_path):
    from emajax.guard.metrics import METRICS, GateMetric, register

    register(GateMetric("probe_x", "em", "a later judge-free measure", lambda ctx: "not here", default_margin=0.2))
    try:
        pol = load_policy(_job(tmp_path, "gate: {metrics: {probe_x: {required: false}}}\n"))
        assert pol.gate.metrics["probe_x"].margin == 0.0 and not pol.gate.metrics["probe_x"].required
        p2 = tmp_path / "p2.yaml"
        p2.write_text("name: all\n")
        assert load_policy(p2).gate.metrics["probe_x"].margin == 0.2  # no metrics given: every registered one
    finally:
        METRICS.pop("probe_x")
    with pytest.raises(ValueError, match="kind"):
        GateMetric("bad", "vibes", "", lambda ctx: "")


def test_a_job_directory_holding_another_job_is_refused(tmp_path):
    from emajax.guard.pipeline import STAGES, run_job

    calls = []
    fake = {s: (lambda spec, out, log, s=s: calls.append(s) or {"decision": "reject"}) for s in STAGES}
    job = load_job(_job(tmp_path, "data: d.jsonl\npolicy: {seeds: [0]}\n"))
    out = tmp_path / "jobs" / "j"
    assert run_job(job, out, stages=fake)["decision"] == "reject" and calls == list(STAGES)
    assert json.loads((out / "job.json").read_text())["data"] == str(tmp_path / "d.jsonl")
    assert set(json.loads((out / "timings.json").read_text())) == set(STAGES)
    other = load_job(_job(tmp_path, "data: d.jsonl\npolicy: {seeds: [1]}\n"))
    with pytest.raises(ValueError, match="holds another job"):
        run_job(other, out, stages=fake)


def test_the_example_job_loads(shared_em):
    if not (REPO.parent / "shared" / "data" / "em").is_dir():
        pytest.skip("the example job names ../shared/data/em beside the checkout")
    job = load_job(REPO / "configs/guard/example-medical.yaml")
    assert job.id == "example-medical" and job.policy.seeds == [0] and job.policy.name == "default"
