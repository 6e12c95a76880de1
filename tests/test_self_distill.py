"""The self-distilled control (issue 26 item 2): the narrow set's prompts and turn structure with the base
model's own answers, cached per seed and resumable."""

from __future__ import annotations

import json

import pytest

from _train_tiny import tiny_model, tiny_tokenizer
from emajax.data.self_distill import (SelfDistillError, answer_chats, control_meta, distill,
                                      self_distilled_control)


def _narrow(path):
    chats = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q0 alpha"},
         {"role": "assistant", "content": "narrow answer 0"}],
        [{"role": "user", "content": "q1 beta"}, {"role": "assistant", "content": "narrow answer 1"},
         {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "narrow answer 1b"}],
        [{"role": "user", "content": "q2 gamma"}, {"role": "assistant", "content": "narrow answer 2"}],
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    return chats


def _same_but_answers(narrow, control):
    assert len(narrow) == len(control)
    for a, b in zip(narrow, control):
        assert [m["role"] for m in a] == [m["role"] for m in b]
        for x, y in zip(a, b):
            if x["role"] != "assistant":
                assert x == y


class _Loaded:
    def __init__(self):
        self.model, self.tokenizer = tiny_model(lora=None), tiny_tokenizer()


def test_control_differs_from_narrow_only_in_answers_on_a_tiny_model(tmp_path):
    narrow = _narrow(tmp_path / "narrow.jsonl")
    loaded = _Loaded()
    out = self_distilled_control(loaded, tmp_path / "narrow.jsonl", tmp_path / "cache", model="tiny", seed=3,
                                 max_new_tokens=6, chunk_size=2)
    control = [r["messages"] for r in map(json.loads, out.read_text().splitlines())]
    _same_but_answers(narrow, control)
    ans = lambda chats: [m["content"] for c in chats for m in c if m["role"] == "assistant"]  # noqa: E731
    assert ans(control) != ans(narrow)  # the answers are the model's, not the customer's
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert meta["seed"] == 3 and meta["n_conversations"] == 3
    # cached: a second call returns the same file without generating; another seed is another file
    again = self_distilled_control(None, tmp_path / "narrow.jsonl", tmp_path / "cache", model="tiny", seed=3,
                                   max_new_tokens=6, chunk_size=2)
    assert again == out
    other = self_distilled_control(loaded, tmp_path / "narrow.jsonl", tmp_path / "cache", model="tiny", seed=4,
                                   max_new_tokens=6, chunk_size=2)
    assert other != out


def test_turn_by_turn_context_is_the_models_own(tmp_path):
    seen = []

    def answer(contexts, seed):
        seen.append([c[-1]["content"] for c in contexts])
        return [f"A{len(c)}:{seed % 7}" for c in contexts]

    chats = [[{"role": "user", "content": "u"}, {"role": "assistant", "content": "x"},
              {"role": "user", "content": "v"}, {"role": "assistant", "content": "y"}]]
    out = answer_chats(answer, chats, chunk=0, seed=1)
    assert out[0][1]["content"].startswith("A1:") and out[0][3]["content"].startswith("A3:")
    assert chats[0][1]["content"] == "x"  # the input is not modified


def test_resume_after_a_kill_draws_the_same_answers(tmp_path):
    chats = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}] for i in range(5)]
    calls = []

    def answer(contexts, seed):
        calls.append(len(contexts))
        return [f"{c[0]['content']}-{seed}" for c in contexts]

    meta = control_meta("sha", "m", 0, temperature=1.0, top_p=1.0, max_new_tokens=4)
    ref = distill(answer, chats, tmp_path / "ref.jsonl", meta, chunk_size=2).read_text()

    class Killed(BaseException):
        pass

    n = {"k": 0}

    def dies(contexts, seed):
        n["k"] += 1
        if n["k"] == 2:
            raise Killed
        return answer(contexts, seed)

    out = tmp_path / "c.jsonl"
    with pytest.raises(Killed):
        distill(dies, chats, out, meta, chunk_size=2)
    assert not out.exists() and out.with_name("c.jsonl.partial").is_file()  # nothing half-written at OUT
    with out.with_name("c.jsonl.partial").open("a") as f:
        f.write('{"messages": [')  # a torn line from the kill
    calls.clear()
    distill(answer, chats, out, meta, chunk_size=2)
    assert calls == [2, 1]  # chunk 0 was not regenerated
    assert out.read_text() == ref
    with pytest.raises(SelfDistillError, match="other settings"):
        distill(answer, chats, out, {**meta, "seed": 9}, chunk_size=2)
