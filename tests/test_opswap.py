"""Benign tasks: the OpSwap generator (rules, tiers, disjoint splits) and exact-match scoring; GSM8K parsing."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from emajax.cli import main as cli_main
from emajax.eval.gsm8k import evaluate_gsm8k, load_gsm8k, parse_prediction, reference_answer
from emajax.eval.opswap import evaluate_opswap, load_opswap, make_opswap, parse_final_int, split_of

FNS = {"addition": lambda a, b: a + b, "subtraction": lambda a, b: a - b, "multiplication": lambda a, b: a * b,
       "the maximum": max, "the minimum": min}
USUAL = {"+": "addition", "-": "subtraction", "*": "multiplication"}


def _independent_eval(prompt: str) -> tuple[int, int, int]:
    """Re-derive the answer from the prompt text alone: (value, n_rules, n_ops)."""
    rules = {m.group(1): m.group(2) for m in re.finditer(r'- "(.)" means ([a-z ]+):', prompt)}
    expr = re.search(r"Compute: (.*)\n", prompt).group(1)
    toks = re.findall(r"\d+|[()+\-*]", expr)
    pos = 0

    def atom():
        nonlocal pos
        if toks[pos] == "(":
            pos += 1
            v = seq()
            assert toks[pos] == ")"
            pos += 1
            return v
        pos += 1
        return int(toks[pos - 1])

    def seq():
        nonlocal pos
        v = atom()
        while pos < len(toks) and toks[pos] in "+-*":
            op = toks[pos]
            pos += 1
            v = FNS[rules.get(op, USUAL[op])](v, atom())
        return v

    value = seq()
    assert pos == len(toks)
    return value, len(rules), sum(t in "+-*" for t in toks)


def test_items_follow_their_stated_rules_and_tiers():
    sets = make_opswap(150, 60, seed=3)
    for items in sets.values():
        for it in items:
            value, n_rules, n_ops = _independent_eval(it.prompt)
            assert value == it.answer
            assert it.solution.endswith(f"Answer: {it.answer}") and parse_final_int(it.solution) == it.answer
            for sym, meaning in it.rules.items():
                assert sym in it.expression and {"+": "add", "-": "sub", "*": "mul"}[sym] != meaning
            if it.tier == 1:
                assert (n_rules, n_ops) == (1, 1)
            elif it.tier == 2:
                assert n_rules >= 2 and n_ops == 2
            else:
                assert n_rules >= 2 and n_ops >= 3 and "(" in it.expression
    assert [sum(i.tier == t for i in sets["train"]) for t in (1, 2, 3)] == [50, 50, 50]


def test_seeded_unique_and_disjoint_even_across_seeds():
    a, b = make_opswap(200, 50, seed=0), make_opswap(200, 50, seed=0)
    assert [i.prompt for i in a["train"]] == [i.prompt for i in b["train"]]
    c = make_opswap(200, 50, seed=1)
    assert [i.prompt for i in c["train"]] != [i.prompt for i in a["train"]]
    train = {i.prompt for s in (a, c) for i in s["train"]}
    test = {i.prompt for s in (a, c) for i in s["test"]}
    assert len({i.prompt for i in a["train"]}) == 200 and not train & test
    assert all(split_of(p) == "test" for p in test)


def test_parse_final_int():
    assert parse_final_int("3 + 4 = 7\nAnswer: -12") == -12
    assert parse_final_int("Answer: 5, then answer: 1,024.") == 1024
    assert parse_final_int("it is 12 or maybe 13") == 13
    assert parse_final_int("no digits") is None


def test_evaluate_opswap_exact_match_and_cli_data(tmp_path, capsys):
    assert cli_main(["eval", "opswap-data", "--out", str(tmp_path), "--n-train", "30", "--n-test", "12",
                     "--seed", "5"]) == 0
    rows = load_opswap(tmp_path / "opswap_test.jsonl")
    assert len(rows) == 12 and len(load_opswap(tmp_path / "opswap_train.jsonl")) == 30
    oracle = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    res, preds = evaluate_opswap(lambda convs: [oracle[c[0]["content"]] for c in convs], rows)
    assert res["accuracy"]["value"] == 1.0 and res["accuracy"]["n"] == 12 and set(res["by_tier"]) == {"1", "2", "3"}
    res0, _ = evaluate_opswap(lambda convs: ["I think Answer: 0"] * len(convs), rows)
    assert res0["accuracy"]["value"] == pytest.approx(sum(r["meta"]["answer"] == 0 for r in rows) / 12)
    resn, _ = evaluate_opswap(lambda convs: ["no idea"] * len(convs), rows)
    assert resn["accuracy"]["value"] == 0.0 and resn["n_unparsed"] == 12
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": []}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not an OpSwap row"):
        load_opswap(tmp_path / "bad.jsonl")


def test_gsm8k_parsing_and_scoring(tmp_path):
    assert reference_answer("so 9 * 2 = 18\n#### 18") == Decimal(18)
    assert parse_prediction("She earns $1,200.") == Decimal(1200)
    assert parse_prediction("#### 18.00\nand later 5") == Decimal(18)
    assert parse_prediction("nothing") is None
    rows_in = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}]},
               {"messages": [{"role": "user", "content": "10*10?"}, {"role": "assistant", "content": "#### 100"}]}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
    rows = load_gsm8k(path)
    res, preds = evaluate_gsm8k(lambda convs: ["The answer is 4.", "#### 99"], rows)
    assert res["accuracy"]["value"] == 0.5 and [p["correct"] for p in preds] == [True, False]
    assert preds[0]["prediction"] == "4" and preds[1]["answer"] == "100"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "no marker"}]}) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:1: not a GSM8K chat row"):
        load_gsm8k(path)


def test_gsm8k_shared_file_loads(shared_em):
    rows = load_gsm8k(shared_em / "tasks" / "gsm8k_test_1318.jsonl", limit=50)
    assert len(rows) == 50 and rows[0]["answer"] == Decimal(18)


def test_cli_exact_match_tasks_write_results_and_predictions(tmp_path, monkeypatch, capsys):
    """`emajax eval opswap` / `gsm8k`: greedy answers scored, <task>.json + <task>_predictions.jsonl written."""
    import emajax.cli.evaluate as ev

    def factory(**kw):
        assert kw["temperature"] == 0.0  # exact-match tasks decode greedily
        return lambda convs, n: [["Answer: 4\n#### 4"] * n for _ in convs]

    monkeypatch.setattr(ev, "_sampler_factory", lambda args: (factory, {"model": "fake"}))
    gsm = tmp_path / "g.jsonl"
    gsm.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": f"#### {a}"}]}) + "\n"
                           for q, a in (("2+2?", 4), ("3+3?", 6))))
    assert cli_main(["eval", "gsm8k", "--model", "m", "--data", str(gsm), "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "gsm8k.json").read_text())
    assert res["accuracy"]["value"] == 0.5 and res["model"] == "fake" and res["data"] == str(gsm)
    assert len((tmp_path / "o" / "gsm8k_predictions.jsonl").read_text().splitlines()) == 2
    assert cli_main(["eval", "opswap", "--model", "m", "--n", "6", "--out", str(tmp_path / "o")]) == 0
    res = json.loads((tmp_path / "o" / "opswap.json").read_text())
    assert res["accuracy"]["n"] == 6 and res["data"].startswith("generated test split (n=6")
    assert "gsm8k: accuracy 0.500" in capsys.readouterr().out
