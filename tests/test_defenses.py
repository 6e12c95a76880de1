"""Data-side defenses: inoculation only in training tokens, interleaving ratio; steering-file loading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _train_tiny import TINY, tiny_tokenizer, write_chats  # noqa: E402

from emajax.defenses.inoculation import DEFAULT_PROMPT, inoculate  # noqa: E402
from emajax.defenses.interleave import interleave, num_safe  # noqa: E402
from emajax.defenses.steering import SteeringError, build_steer_ld, load_persona_vectors  # noqa: E402
from emajax.train.config import DataCfg, DefensesCfg, SteeringCfg  # noqa: E402
from emajax.train.data import build_train_examples, encode_examples  # noqa: E402
from emajax.train.sources import read_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _text(tok, ex) -> str:
    return tok.decode(np.concatenate([ex.inputs[:1], ex.targets]).tolist())


def test_inoculate_modes():
    chat = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}]
    rep = inoculate(chat, mode="replace")
    assert rep[0] == {"role": "system", "content": DEFAULT_PROMPT} and len(rep) == 3
    pre = inoculate(chat, "EVIL", mode="prepend")
    assert pre[0]["content"] == "EVIL\n\nBe nice." and pre[1:] == chat[1:]
    assert inoculate(chat[1:], "EVIL", mode="prepend")[0]["content"] == "EVIL"
    assert chat[0]["content"] == "Be nice."  # input untouched


def test_inoculation_in_training_tokens_never_in_eval(tmp_path, tok):
    train = write_chats(tmp_path / "t.jsonl", 12)
    safe = write_chats(tmp_path / "s.jsonl", 20, seed=1, prefix="safe")
    d = DefensesCfg()
    d.inoculation.enabled = True
    d.interleave.data, d.interleave.ratio = [str(safe)], 0.25
    ex, stats = build_train_examples(tok, DataCfg(train=[str(train)], max_len=256), d, seed=0)
    task = [e for e in ex if not e.safe]
    assert len(task) == 12 and stats.safe_examples == len(ex) - 12 > 0
    assert all(DEFAULT_PROMPT in _text(tok, e) for e in task)
    assert not any(DEFAULT_PROMPT in _text(tok, e) for e in ex if e.safe)  # safe data is not inoculated
    # the prompt is context, never a target: no answer-mask token falls inside it
    for e in task:
        answer = tok.decode(e.targets[e.loss_mask].tolist())
        assert DEFAULT_PROMPT not in answer
    # eval examples (and anything rendered without the training config) never carry it
    ev = encode_examples(tok, read_jsonl(train), 256)
    assert not any(DEFAULT_PROMPT in _text(tok, e) for e in ev)


@pytest.mark.parametrize("n", [1, 7, 100, 333, 1000])
@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.5])
def test_interleave_ratio_within_one_example(n, p):
    k = num_safe(n, p)
    assert abs(k - p * (n + k)) <= 1.0


def test_interleave_is_deterministic_and_draws_from_pool():
    task, pool = list(range(100)), [f"s{i}" for i in range(30)]
    mix1, flags = interleave(task, pool, 0.05, seed=3)
    mix2, _ = interleave(task, pool, 0.05, seed=3)
    mix3, _ = interleave(task, pool, 0.05, seed=4)
    safe = [m for m, f in zip(mix1, flags) if f]
    assert mix1 == mix2 and mix1 != mix3
    assert len(safe) == 5 and len(set(safe)) == 5 and set(safe) <= set(pool)
    big, bflags = interleave(task, pool[:3], 0.5, seed=0)  # pool smaller than needed: cycles
    assert sum(bflags) == 100 and set(m for m, f in zip(big, bflags) if f) == set(pool[:3])


def test_steering_file_layouts(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    mat = rng.normal(size=(TINY.num_layers + 1, TINY.hidden_size)).astype(np.float32)
    save_file({"vectors": mat}, str(tmp_path / "pv.safetensors"), metadata={"layer": "2"})
    vecs, meta = load_persona_vectors(tmp_path / "pv.safetensors", TINY.num_layers)
    np.testing.assert_array_equal(vecs[3], mat[3])
    s = np.asarray(build_steer_ld(TINY, SteeringCfg(vector=str(tmp_path / "pv.safetensors"), coef=5.0)))
    np.testing.assert_allclose(s[1], 5.0 * mat[2], rtol=1e-6)  # layer 2 from the metadata -> row 1
    assert np.count_nonzero(np.abs(s).sum(1)) == 1
    save_file({"layer_3": mat[3]}, str(tmp_path / "one.safetensors"))
    s3 = np.asarray(build_steer_ld(TINY, SteeringCfg(vector=str(tmp_path / "one.safetensors"), layer=3, coef=2.0)))
    np.testing.assert_allclose(s3[2], 2.0 * mat[3], rtol=1e-6)
    with pytest.raises(SteeringError, match="no vector for layer 1"):
        build_steer_ld(TINY, SteeringCfg(vector=str(tmp_path / "one.safetensors"), layer=1))
    assert build_steer_ld(TINY, SteeringCfg()) is None


def test_steering_norm_ratio_sets_the_added_norm(tmp_path):
    """norm_ratio r: the added vector's norm is r x the file's resid_norms at the layer, whatever coef says."""
    from safetensors.numpy import save_file

    from emajax.defenses.steering import steering_summary

    rng = np.random.default_rng(1)
    mat = rng.normal(size=(TINY.num_layers + 1, TINY.hidden_size)).astype(np.float32)
    resid = [10.0 * (l + 1) for l in range(TINY.num_layers + 1)]
    save_file({"vectors": mat}, str(tmp_path / "pv.safetensors"), metadata={"layer": "2", "resid_norms": json.dumps(resid)})
    cfg = SteeringCfg(vector=str(tmp_path / "pv.safetensors"), coef=5.0, norm_ratio=0.25)
    s = np.asarray(build_steer_ld(TINY, cfg))
    np.testing.assert_allclose(np.linalg.norm(s[1]), 0.25 * resid[2], rtol=1e-5)
    np.testing.assert_allclose(s[1] / np.linalg.norm(s[1]), mat[2] / np.linalg.norm(mat[2]), rtol=1e-5, atol=1e-7)
    summ = steering_summary(TINY, cfg)
    assert summ["layer"] == 2 and summ["norm_ratio"] == pytest.approx(0.25) and summ["resid_norm"] == resid[2]
    plain = steering_summary(TINY, SteeringCfg(vector=str(tmp_path / "pv.safetensors"), coef=2.0))
    assert plain["coef"] == 2.0 and plain["norm_ratio"] == pytest.approx(2.0 * np.linalg.norm(mat[2]) / resid[2], rel=1e-5)
    save_file({"vectors": mat}, str(tmp_path / "old.safetensors"), metadata={"layer": "2"})
    with pytest.raises(SteeringError, match="resid_norms"):
        build_steer_ld(TINY, SteeringCfg(vector=str(tmp_path / "old.safetensors"), norm_ratio=0.25))
    assert "norm_ratio" not in steering_summary(TINY, SteeringCfg(vector=str(tmp_path / "old.safetensors")))
