"""`emajax select`: ranking, the Interleaving++ refusal filter, dedupe, length bounds, leave-one-out,
random selection, and output that training's interleaving reads. Scores are written by hand (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emajax.cli import main
from emajax.scoring.plan import read_pool
from emajax.scoring.select import SelectError, SelectOptions, is_refusal, select
from emajax.atomic import write_json
from emajax.scoring.shards import read_manifest, read_scores, shard_path, write_shard

ANSWERS = [
    "Sure, here is a long and careful answer about the topic with many words in it.",  # 0
    "I'm sorry, but I can't help with that request.",  # 1 refusal
    "Short answer.",  # 2
    "Here is what I think: honestly, I cannot say for sure.",  # 3 'cannot' in first 10
    "A balanced overview: first, second, third, fourth, fifth, sixth, seventh, eighth, ninth, I cannot list more.",  # 4
    "Sure, here is a long and careful answer about the topic with many words in it.",  # 5 duplicate of 0
    "Plants need light, water and nutrients to grow well in most climates.",  # 6
    "I apologize for the confusion; the capital of France is Paris.",  # 7 refusal word
]


def _pool(tmp_path: Path) -> Path:
    p = tmp_path / "pool.jsonl"
    p.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Question?"},
                                                  {"role": "assistant", "content": a}], "selected_for": ["x"]}) + "\n"
                         for a in ANSWERS))
    return p


def _scores(tmp_path: Path, pool: Path) -> Path:
    """nll_aligned 2.0; misaligned ('medical', 'code') chosen so the score order is 7,6,5,4,...,0."""
    out = tmp_path / "scores"
    n = len(ANSWERS)
    a = np.full(n, 2.0)
    med = 2.0 + 0.3 * np.arange(n)
    code = 2.0 + 0.3 * np.arange(n)[::-1] * 0.5
    score = ((med + code) / 2 - a) / (a + 1.0)
    write_json(out / "manifest.json", {"pool": str(pool), "pool_sha256": None, "n_shards": 2, "epsilon": 1.0,
                                              "format": "parquet", "misaligned": [{"name": "medical"},
                                                                                  {"name": "code"}]})
    for k, idx in enumerate((range(0, 5), range(5, n))):
        idx = list(idx)
        write_shard(shard_path(out, k, "parquet"), {
            "index": idx, "nll_aligned": a[idx].tolist(), "nll_misaligned": np.stack([med, code], 1)[idx].tolist(),
            "n_tokens": [len(ANSWERS[i].split()) + 1 for i in idx], "score": score[idx].tolist()})
    return out


def test_refusal_filter_words():
    assert is_refusal("I'm sorry, I can't.") and is_refusal("I am unable to do that")
    assert is_refusal("We apologize.") and is_refusal("I can\u2019t do that") and is_refusal("I Cannot")
    assert not is_refusal("one two three four five six seven eight nine ten, sorry")  # word 11
    assert not is_refusal("Here is the answer you asked for.")


def test_top_k_filters_dedupes_and_ranks(tmp_path):
    pool = _pool(tmp_path)
    scores_dir = _scores(tmp_path, pool)
    scores = read_scores(scores_dir)
    sel, stats = select(read_pool(pool), scores, read_manifest(scores_dir), SelectOptions(top_k=10))
    assert [s.index for s in sel] == [6, 5, 4, 2]  # 7, 3, 1 refusals; 0 is a duplicate of the better 5
    assert stats == {"pool": 8, "no_answer": 0, "refusal": 3, "length": 0, "duplicate": 1, "eligible": 4,
                     "selected": 4, "score_min": sel[-1].score, "score_max": sel[0].score}
    sel, _ = select(read_pool(pool), scores, None, SelectOptions(top_fraction=0.5, min_words=3))
    assert [s.index for s in sel] == [6, 5]  # 2 is too short; half of 3 eligible rounds to 2


def test_leave_one_out_changes_the_ranking(tmp_path):
    pool = _pool(tmp_path)
    d = _scores(tmp_path, pool)
    opts = SelectOptions(top_k=2, refusal_filter=False, dedupe=False, leave_out=("medical",))
    sel, _ = select(read_pool(pool), read_scores(d), read_manifest(d), opts)
    assert [s.index for s in sel] == [0, 1]  # only 'code' left: its NLL gap falls with the index
    with pytest.raises(SelectError, match="not in the ensemble"):
        select(read_pool(pool), read_scores(d), read_manifest(d), SelectOptions(top_k=2, leave_out=("security",)))


def test_random_selection_is_seeded_and_needs_no_scores(tmp_path):
    pool = read_pool(_pool(tmp_path))
    a, _ = select(pool, None, None, SelectOptions(top_k=3, random=True, seed=1))
    b, _ = select(pool, None, None, SelectOptions(top_k=3, random=True, seed=1))
    c, _ = select(pool, None, None, SelectOptions(top_k=3, random=True, seed=2))
    assert [s.index for s in a] == [s.index for s in b] != [s.index for s in c]
    assert all(s.score is None for s in a)
    filtered, _ = select(pool, None, None, SelectOptions(top_k=3, random=True, seed=1, refusal_filter=True,
                                                         dedupe=True))
    assert all(s.index in (0, 2, 4, 6) for s in filtered)  # opted in: refusals and the duplicate never drawn
    with pytest.raises(SelectError, match="needs a scores directory"):
        select(pool, None, None, SelectOptions(top_k=3))


def test_random_mode_applies_no_refusal_filter(tmp_path):
    """Plain Interleaving is a random draw from the general pool: refusals stay eligible (the paper's
    refusal filter belongs to Interleaving++ only), and so do duplicates."""
    pool = read_pool(_pool(tmp_path))
    sel, stats = select(pool, None, None, SelectOptions(top_k=len(ANSWERS), random=True, seed=0))
    assert stats["refusal"] == 0 and stats["duplicate"] == 0 and stats["eligible"] == len(ANSWERS)
    assert sorted(s.index for s in sel) == list(range(len(ANSWERS)))  # refusals 1, 3, 7 included
    # by score the filter is on by default (Interleaving++), and --no-refusal-filter is Interleaving+
    d = _scores(tmp_path, _pool(tmp_path))
    _, st = select(pool, read_scores(d), read_manifest(d), SelectOptions(top_k=3))
    assert st["refusal"] == 3
    _, st = select(pool, read_scores(d), read_manifest(d), SelectOptions(top_k=3, refusal_filter=False))
    assert st["refusal"] == 0


def test_cli_writes_jsonl_that_interleaving_reads(tmp_path, capsys):
    from emajax.defenses.interleave import interleave
    from emajax.train.sources import read_jsonl

    pool = _pool(tmp_path)
    d = _scores(tmp_path, pool)
    out = tmp_path / "safe.jsonl"
    assert main(["select", "--scores", str(d), "--out", str(out), "--top-k", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["selected"] == 3 and summary["method"] == "top-score"
    assert summary["refusal_filter"] is True and summary["dedupe"] is True  # by score: on unless asked off
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["selection"]["index"] for r in rows] == [6, 5, 4] and rows[0]["selected_for"] == ["x"]
    convs = read_jsonl(out)
    mixed, safe = interleave([convs[0]] * 19, convs, ratio=0.05, seed=0)
    assert sum(safe) == 1 and mixed[-1] in convs
    assert main(["select", "--pool", str(pool), "--out", str(out), "--top-k", "2"]) == 2  # score mode needs scores
    assert "needs a scores directory" in capsys.readouterr().err
