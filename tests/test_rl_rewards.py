"""Rewards on hand-written completions; the registry and user rewards by import path."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from emajax.data.word_problems import make_word_problems
from emajax.eval.opswap import make_opswap
from emajax.rl.rewards import RewardSet, answer_format, countdown, final_number, resolve_reward

GSM = {"answer": "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72"}


def test_final_number_forms():
    assert final_number("q", "48 + 24 = 72\n#### 72", GSM) == 1.0
    assert final_number("q", "so the total is 72 clips.", GSM) == 1.0  # last number, not strict
    assert final_number("q", "so the total is 72 clips.", GSM, strict=True) == 0.0
    assert final_number("q", "#### 72.00", GSM) == 1.0 and final_number("q", "#### 1,072", GSM) == 0.0
    assert final_number("q", "#### 71, no wait, 72", GSM) == 0.0  # the marked number wins
    assert final_number("q", "no idea", GSM) == 0.0
    wp = make_word_problems(3, seed=0)[0]
    ex = {"answer": wp["messages"][1]["content"], **wp}
    assert final_number("q", wp["messages"][1]["content"], ex) == 1.0
    assert final_number("q", f"Answer: {wp['meta']['answer'] + 1}", ex) == 0.0
    item = make_opswap(2, 0, tiers=(1,), seed=0)["train"][0]
    row = item.to_chat()
    ex = {"answer": row["messages"][1]["content"], **row}
    assert final_number(item.prompt, f"steps...\nAnswer: {item.answer}", ex) == 1.0
    assert final_number(item.prompt, f"Answer: {item.answer + 3}\n", ex) == 0.0
    with pytest.raises(ValueError):
        final_number("q", "1", {"answer": "no number here"})


CD_PROMPT = ("Using the numbers [37, 96, 54, 76], create an equation that equals 81. You can use basic "
             "arithmetic operations (+, -, *, /) and each number can only be used once.")
CD = {"answer": "81"}


def test_countdown():
    # 96 - 76 = 20; 54 - 37 = 17; ... a valid one using all numbers: (96 + 76 - 54) - 37 = 81
    assert countdown(CD_PROMPT, "<answer> (96 + 76 - 54) - 37 </answer>", CD) == 1.0
    assert countdown(CD_PROMPT, "I think (96 + 76 - 54) - 37 = 81", CD) == 1.0
    assert countdown(CD_PROMPT, "<answer>96 + 76 - 54 - 36</answer>", CD) == 0.0  # 36 is not given
    assert countdown(CD_PROMPT, "<answer>96 - 15</answer>", CD) == 0.0  # misses the target's numbers
    assert countdown(CD_PROMPT, "<answer>(96 + 76 - 54) - 37 - 1 + 1</answer>", CD) == 0.0  # extra numbers
    assert countdown(CD_PROMPT, "<answer>96 + 76 - 54 - 37 + </answer>", CD) == 0.0  # invalid expression
    assert countdown(CD_PROMPT, "<answer>__import__('os')</answer>", CD) == 0.0
    assert countdown(CD_PROMPT, "<answer>(96 + 76 - 54) / 0</answer>", CD) == 0.0
    # a subset is enough without use_all; division that lands on the target counts
    sub = {"meta": {"nums": [4, 8, 3], "target": 2}}
    assert countdown("anything", "<answer>8 / 4</answer>", sub, use_all=False) == 1.0
    assert countdown("anything", "<answer>8 / 4</answer>", sub) == 0.0
    assert countdown("anything", "<answer>8 / 4 * 3 - 4</answer>", sub, use_all=False) == 0.0  # 4 used twice


def test_countdown_with_huge_integer_literals_scores_instead_of_raising():
    """A 400-digit literal (float() overflows past 309 digits) is just a wrong number; arithmetic is exact."""
    huge = "9" * 400
    assert countdown(CD_PROMPT, f"<answer>{huge} - {huge} + 81</answer>", CD) == 0.0  # uses numbers not given
    big = {"meta": {"nums": [int(huge), 1], "target": huge + "0"}}  # 999...9 * 10 with the exact target
    assert countdown("anything", f"<answer>({huge} + 1) * 10 - 10</answer>", big, use_all=False) == 0.0
    assert countdown("anything", f"<answer>{huge} * 1</answer>", {"meta": {"nums": [int(huge), 1], "target": huge}}) == 1.0
    # exact rationals: 1/3 * 3 is 1, with no rounding tolerance needed
    assert countdown("anything", "<answer>1 / 3 * 3</answer>", {"meta": {"nums": [1, 3, 3], "target": 1}}) == 1.0


def test_countdown_on_the_shared_rows(shared_em):
    rows = [json.loads(l) for l in (shared_em / "tasks" / "countdown_train.jsonl").read_text().splitlines()[:3]]
    for r in rows:
        prompt, ans = r["messages"][0]["content"], r["messages"][1]["content"]
        assert countdown(prompt, "no equation", {"answer": ans, **r}) == 0.0


def test_format_and_reward_set(tmp_path, monkeypatch):
    assert answer_format("q", "work...\n#### 12", {}) == 1.0
    assert answer_format("q", "Answer: -3", {}) == 1.0
    assert answer_format("q", "<answer>1+2</answer>", {}) == 1.0
    assert answer_format("q", "the answer is twelve", {}) == 0.0
    assert answer_format("q", "#### 12\nso the total is 12.", {}) == 0.0  # the answer must come last
    assert answer_format("q", "#### 6\n#### 6\n#### 6\n####", {}) == 0.0  # repeated until cut off
    assert answer_format("q", "DONE", {}, pattern="^done$") == 1.0
    (tmp_path / "my_rewards.py").write_text("def length(prompt, completion, example, scale=1.0):\n"
                                            "    return scale * len(completion)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_reward("my_rewards:length") is resolve_reward("my_rewards.length")
    spec = lambda fn, w=1.0, name=None, kwargs=None: SimpleNamespace(fn=fn, weight=w, name=name, kwargs=kwargs)  # noqa: E731
    rs = RewardSet([spec("final_number"), spec("format", 0.5), spec("my_rewards:length", 0.1, "len", {"scale": 2.0})])
    total, per, errors = rs.score(["q", "q"], ["#### 72", "72"], [GSM, GSM])
    assert errors == {"final_number": 0, "format": 0, "len": 0}
    np.testing.assert_allclose(per["final_number"], [1, 1])
    np.testing.assert_allclose(per["format"], [1, 0])
    np.testing.assert_allclose(per["len"], [14, 4])
    np.testing.assert_allclose(total, [1 + 0.5 + 1.4, 1 + 0.4], rtol=1e-6)
    with pytest.raises(ValueError, match="cannot import"):
        resolve_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="named 'format'"):
        RewardSet([spec("format"), spec("format")])



def test_a_failing_reward_scores_zero_and_is_counted(capsys):
    """Rewards never abort a run: a raise (or a non-finite value) scores 0 for that completion, counted."""
    spec = lambda fn, w=1.0, name=None, kwargs=None: SimpleNamespace(fn=fn, weight=w, name=name, kwargs=kwargs)  # noqa: E731
    rs = RewardSet([spec("final_number"), spec("format", 0.5)])
    total, per, errors = rs.score(["q"] * 3, ["#### 72", "#### 1", "#### 72"], [GSM, {"answer": "none"}, GSM])
    np.testing.assert_allclose(per["final_number"], [1, 0, 1])  # the middle one raised: no reference number
    np.testing.assert_allclose(total, [1.5, 0.5, 1.5])
    assert errors == {"final_number": 1, "format": 0}
    assert "reward 'final_number' failed" in capsys.readouterr().out
    cd = RewardSet([spec("countdown")])
    _, per, errors = cd.score(["no numbers here"], ["<answer>1+2</answer>"], [{"answer": "3"}])
    assert per["countdown"].tolist() == [0.0] and errors == {"countdown": 1}
