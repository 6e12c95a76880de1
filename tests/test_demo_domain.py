"""``emajax demo --domain medical|FILE.jsonl`` (issue 26 item 5): another narrow set, the self-distilled control,
the in-domain probe from its held-out part; the plan records the domain and the report names it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from _train_tiny import export_tiny_model, write_chats
from emajax.demo.domain import MEDICAL_EVAL, MEDICAL_TRAIN, resolve_domain, split
from emajax.demo.plan import CONTROL, make_plan
from emajax.demo.suite import demo_suite, narrow_sets, write_train_sets


def _plan_of(argv, monkeypatch, tmp_path):
    """The plan ``emajax demo ARGV`` would run (Demo.run replaced), or the exit code and stderr."""
    from emajax.cli import main
    from emajax.demo import pipeline

    seen = {}
    monkeypatch.setattr(pipeline.Demo, "run", lambda self: seen.update(plan=self.plan) or tmp_path / "report.md")
    rc = main(["demo", "--out", str(tmp_path / "out"), *argv])
    return seen.get("plan"), rc


def _fake_em(root, n_train=6, n_eval=9):
    """A data dir shaped like ../shared/data/em's medical files."""
    (root / "sft").mkdir(parents=True)
    write_chats(root / MEDICAL_TRAIN, n_train, seed=1, prefix="train")
    write_chats(root / MEDICAL_EVAL, n_eval, seed=2, prefix="eval")
    return root


def _messages(path):
    return [json.loads(l)["messages"] for l in path.read_text().splitlines()]


def test_file_domain_plan_split_and_bad_lines(tmp_path, monkeypatch, capsys):
    chats = write_chats(tmp_path / "chats.jsonl", 10)
    plan, rc = _plan_of(["--tiny", "--domain", str(chats), "--domain-heldout", "3"], monkeypatch, tmp_path)
    assert rc == 0 and plan.domain == str(chats.resolve()) and plan.domain_files == (str(chats.resolve()),)
    assert plan.n_train == 7 and plan.domain_heldout == 3 and len(plan.domain_sha256[0]) == 64
    assert plan.control_max_new_tokens == 8 and narrow_sets(plan) == ("general", "narrow", "benign")
    train, held = split(plan)
    assert sorted(l for l, _ in train + held) == list(range(1, 11))  # a partition of the file's lines
    again, _ = _plan_of(["--tiny", "--domain", str(chats), "--domain-heldout", "3"], monkeypatch, tmp_path)
    assert split(again) == (train, held)  # fixed by the data seed
    other = split(resolve_domain(make_plan("tiny", data_seed=1), str(chats), heldout=3))[1]
    assert [l for l, _ in other] != [l for l, _ in held]
    narrow = demo_suite(plan).subset(["narrow"]).nll[0]
    assert narrow.ids == tuple(str(l) for l, _ in held) and len(narrow.chats) == 3
    default, _ = _plan_of(["--tiny", "--domain", str(chats), "--n-train", "5"], monkeypatch, tmp_path)
    assert default.n_train == 5 and len(split(default)[1]) == 2  # 20 % held out
    capsys.readouterr()

    bad = tmp_path / "bad.jsonl"
    rows = chats.read_text().splitlines()
    rows[3] = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]})
    bad.write_text("\n".join(rows) + "\n")
    assert _plan_of(["--tiny", "--domain", str(bad)], monkeypatch, tmp_path)[1] == 2
    err = capsys.readouterr().err
    assert f"{bad}:4" in err and "content" in err
    rows[3] = json.dumps({"messages": [{"role": "user", "content": "a question, no answer"}]})
    bad.write_text("\n".join(rows) + "\n")
    assert _plan_of(["--tiny", "--domain", str(bad)], monkeypatch, tmp_path)[1] == 2
    assert f"{bad}:4: field 'messages' must end with an assistant message" in capsys.readouterr().err
    for argv, msg in ((["--domain", str(tmp_path / "none.jsonl")], "file not found"),
                      (["--domain", "legal"], "code, medical or a chat .jsonl file"),
                      (["--domain", str(chats), "--n-train", "9"], "gives 8 training conversations"),
                      (["--domain", str(chats), "--domain-heldout", "10"], "cannot give 10 held-out"),
                      (["--domain-heldout", "3"], "splits a --domain FILE.jsonl"),
                      (["--domain", str(chats), "--dose-steps", "1"], "code domain only")):
        assert _plan_of(["--tiny", *argv], monkeypatch, tmp_path)[1] == 2, argv
        assert msg in capsys.readouterr().err, argv


def test_medical_domain_on_a_fake_data_dir(tmp_path, monkeypatch, capsys):
    em = _fake_em(tmp_path / "em")
    plan, rc = _plan_of(["--tiny", "--domain", "medical", "--data-dir", str(em)], monkeypatch, tmp_path)
    assert rc == 0 and plan.domain == "medical" and plan.n_train == 6
    assert plan.domain_files == (str(em / MEDICAL_TRAIN), str(em / MEDICAL_EVAL))
    # --probe-data names the same root when --data-dir is not given
    same, _ = _plan_of(["--tiny", "--domain", "medical", "--probe-data", str(em)], monkeypatch, tmp_path)
    assert same.domain_files == plan.domain_files and same.probe_data == str(em)
    paths = write_train_sets(plan, tmp_path / "data")
    assert set(paths) == {"narrow", "benign_task"}  # the control comes per seed, self-distilled
    assert _messages(paths["narrow"]) == _messages(em / MEDICAL_TRAIN)
    suite = demo_suite(plan)
    assert [s.name for s in suite.pairs] == ["general"] and [s.name for s in suite.nll] == \
        ["benign", "benign_task", "narrow"]
    narrow = suite.subset(["narrow"]).nll[0]
    eval_chats = _messages(em / MEDICAL_EVAL)
    assert len(narrow.ids) == plan.n_probe_code == 4  # drawn from the eval file by the data seed
    assert [list(c) for c in narrow.chats] == [eval_chats[int(i) - 1] for i in narrow.ids]
    cpu, _ = _plan_of(["--domain", "medical", "--data-dir", str(em)], monkeypatch, tmp_path)
    assert (cpu.max_len, cpu.probe_max_len, cpu.control_max_new_tokens) == (384, 512, 256)  # paragraph answers
    from emajax.demo.power import matches_measured

    code = dataclasses.asdict(make_plan("cpu"))
    assert matches_measured(code) and not matches_measured({**code, "domain": "medical"})  # its power is unknown
    capsys.readouterr()

    (em / MEDICAL_EVAL).unlink()
    assert _plan_of(["--tiny", "--domain", "medical", "--data-dir", str(em)], monkeypatch, tmp_path)[1] == 2
    err = capsys.readouterr().err
    assert str(em / MEDICAL_EVAL) in err and "--data-dir" in err
    for argv in (["--domain-heldout", "3"], ["--n-train", "7"]):
        assert _plan_of(["--tiny", "--domain", "medical", "--data-dir", str(tmp_path / "em"), *argv],
                        monkeypatch, tmp_path)[1] == 2


def test_medical_domain_on_the_shared_data(shared_em):
    plan = resolve_domain(make_plan("cpu"), "medical", data_dir=shared_em)
    assert plan.n_train == 100 and plan.steps == 13
    train, held = split(plan)
    assert len(train) == 100 and len(held) == plan.n_probe_code
    assert all(m[-1]["role"] == "assistant" for _, m in train + held)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_tiny_model(tmp_path_factory.mktemp("tiny_hf"))


def test_tiny_file_domain_demo_end_to_end(tiny_dir, tmp_path, capsys):
    """1 seed, no defense and inoculation (the same compiled step as the control): the control is the base model's
    own answers to the narrow prompts, the in-domain probe the held-out answers' NLL, the report names both."""
    from emajax.demo.pipeline import Demo

    chats = write_chats(tmp_path / "chats.jsonl", 10)
    plan = resolve_domain(make_plan("tiny", model=str(tiny_dir), methods=("none", "inoculation")), str(chats),
                          heldout=2)
    out = tmp_path / "demo"
    report = Demo(plan, out, seeds=(0,)).run()
    narrow = _messages(out / "data" / "narrow_train.jsonl")
    assert len(narrow) == plan.n_train == 8
    record = json.loads((out / "seed_0" / "control_data.json").read_text())
    assert record["kind"] == "self-distilled" and record["path"].startswith(str(out / "data" / "control"))
    control = _messages(tmp_path / record["path"])
    assert len(control) == len(narrow)
    for n, c in zip(narrow, control):  # the same conversations but for the assistant answers
        assert [m["role"] for m in n] == [m["role"] for m in c]
        assert [m for m in n if m["role"] != "assistant"] == [m for m in c if m["role"] != "assistant"]
    assert [n[-1]["content"] for n in narrow] != [c[-1]["content"] for c in control]
    stats = json.loads((out / "seed_0" / "arms" / CONTROL / "data_stats.json").read_text())
    assert stats["examples"] == 8 and stats["total_steps"] == 2  # the control trains on all of them
    for arm in (CONTROL, "none", "inoculation"):
        probes = json.loads((out / "seed_0" / "arms" / arm / "probes.json").read_text())
        assert set(probes["pairs"]) == {"general"} and set(probes["nll"]) == {"benign", "narrow"}
    saved = json.loads((out / "plan.json").read_text())
    assert saved["domain"] == str(chats.resolve()) and saved["domain_heldout"] == 2
    e = json.loads((out / "effects.json").read_text())
    assert e["domain"] == str(chats.resolve()) and e["control"] == "self-distilled"
    assert e["narrow_metric"]["set"] == "narrow" and e["narrow_metric"]["sign"] == -1.0
    none = e["arms"]["none"]
    assert none["narrow_effect"]["n_items"] == 2 and none["em_effect"]["n_items"] == 6
    assert e["arms"][CONTROL]["label"] == "Control (self-distilled)"
    # narrow learning = the held-out NLL drop below the control's, from the arms' own per-item NLLs
    nll = {a: json.loads((out / "seed_0" / "arms" / a / "probes.json").read_text())["items"]["narrow"]["nll"]
           for a in (CONTROL, "none")}
    assert none["narrow_effect"]["value"] == pytest.approx(sum(c - n for c, n in zip(nll[CONTROL], nll["none"])) / 2)
    md = report.read_text()
    assert "| Control (self-distilled) | 0 (reference) |" in md and "| Inoculation |" in md
    assert "Domain: **" + str(chats.resolve()) + "**; control: **self-distilled**" in md
    assert "2 held-out narrow answers" in md and "held-out narrow NLL drop" in md and "insecure" not in md
    stages = list(json.loads((out / "timings.json").read_text())["stages"])
    assert stages[:3] == ["data", "base probes", "seed 0: control data"]
    capsys.readouterr()

    # resumed: nothing redone; another held-out split is another plan
    Demo(plan, out, seeds=(0,)).run()
    assert "seed 0: control data: done already, skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="different plan.*domain_heldout"):
        Demo(resolve_domain(make_plan("tiny", model=str(tiny_dir), methods=("none", "inoculation")), str(chats),
                            heldout=3), out).run()
