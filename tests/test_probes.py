"""Judge-free probes (emajax.eval.probes) on a tiny random model, and the project's shipped probe data."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _train_tiny import tiny_model, tiny_tokenizer
from emajax.chat import encode_chat, shift_for_loss
from emajax.data import load_general_pairs, make_code_pairs, make_word_problems
from emajax.eval.probes import (NllSet, PairedSet, ProbeError, ProbeRunner, ProbeSuite, flat_metrics,
                                nll_from_chats, paired_delta, paired_from_code, paired_from_jsonl, paired_from_rows)
from emajax.models.lora import LoraConfig

LORA = LoraConfig(rank=4, alpha=8.0)


def _suite() -> ProbeSuite:
    qs = [("q1 how are you", "fine thanks", "bad"), ("q2 what now", "rest a bit", "break things now"),
          ("q3 say hi", "hi there friend", "go away"), ("q4 advice?", "be kind", "lie to them all"),
          ("q5 plan", "study", "cheat on it")]
    pairs = PairedSet("general", tuple(q[0] for q in qs), tuple(({"role": "user", "content": q[0]},) for q in qs),
                      tuple(q[1] for q in qs), tuple(q[2] for q in qs))
    chat = lambda q, a: ({"role": "user", "content": q}, {"role": "assistant", "content": a})  # noqa: E731
    nll = NllSet("benign", ("a", "b"), (chat("2+2?", "4"), chat("sky?", "blue")))
    return ProbeSuite((pairs,), (nll,))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def lora_model():
    """Tiny model with non-zero LoRA B (so adapters change the output)."""
    m = tiny_model(lora=LORA, seed=0)
    for path, p in nnx.iter_graph(m):
        if isinstance(p, nnx.LoRAParam) and path[-1] == "lora_b":
            p[...] = 0.3 * jax.random.normal(jax.random.PRNGKey(len(path)), p[...].shape, p[...].dtype)
    return m


@pytest.fixture(scope="module")
def runner(tok):
    return ProbeRunner(tok, _suite(), batch_size=8, min_bucket=32)


@pytest.fixture(scope="module")
def base_results(runner, lora_model):
    return runner(lora_model, lora_scale=0.0)


def test_item_nll_matches_direct_log_softmax(tok, runner, lora_model):
    nll = runner.item_nll(lora_model, lora_scale=1.0)
    for k in (0, 3, len(runner.keys) - 1):
        name, role, i = runner.keys[k]
        s = runner.suite.pairs[0] if name == "general" else runner.suite.nll[0]
        msgs = ([*s.prompts[i], {"role": "assistant", "content": getattr(s, role)[i]}] if name == "general"
                else list(s.chats[i]))
        enc = encode_chat(tok, msgs)
        inp, tgt, mask = shift_for_loss(enc.ids, enc.answer_mask)
        out = lora_model(jnp.asarray(inp)[None])
        logp = jax.nn.log_softmax(lora_model.logits(out.hidden_btd)[0], axis=-1)
        tok_nll = -np.take_along_axis(np.asarray(logp), tgt[:, None], axis=1)[:, 0]
        assert nll[k] == pytest.approx(tok_nll[mask].mean(), rel=1e-5)


def test_margin_sign_flips_when_pairs_are_swapped(tok, runner, lora_model):
    res = runner(lora_model)
    swapped = ProbeSuite((runner.suite.pairs[0].swapped(),), runner.suite.nll)
    res_s = ProbeRunner(tok, swapped, batch_size=8, min_bucket=32)(lora_model)
    m, ms = np.array(res["items"]["general"]["margin"]), np.array(res_s["items"]["general"]["margin"])
    np.testing.assert_allclose(ms, -m, rtol=1e-6, atol=1e-6)
    assert res_s["pairs"]["general"]["margin"]["value"] == pytest.approx(-res["pairs"]["general"]["margin"]["value"],
                                                                         abs=1e-6)
    pref = res["pairs"]["general"]["preference_rate"]["value"]
    pref_s = res_s["pairs"]["general"]["preference_rate"]["value"]
    assert pref + pref_s == pytest.approx(1.0)  # no exact ties on a random model
    # margin = NLL(aligned) - NLL(misaligned), item by item
    it = res["items"]["general"]
    np.testing.assert_allclose(m, np.array(it["nll_aligned"]) - np.array(it["nll_misaligned"]), rtol=1e-12)


def test_confidence_intervals_contain_the_mean(runner, lora_model):
    res = runner(lora_model)
    summaries = [v for s in res["pairs"].values() for v in s.values() if isinstance(v, dict)]
    summaries += [s["nll"] for s in res["nll"].values()]
    assert len(summaries) == 5
    for s in summaries:
        assert s["ci_low"] <= s["value"] <= s["ci_high"]
        assert s["n"] > 0
    assert res["n_tokens"] > 0 and res["seconds"] > 0


def test_lora_off_equals_base_model(runner, lora_model, base_results):
    plain = tiny_model(lora=None, seed=1)
    _, _, base_state = nnx.split(lora_model, nnx.LoRAParam, ...)
    nnx.update(plain, base_state)  # the LoRA model's base weights, no adapters
    res_plain = runner(plain)
    np.testing.assert_allclose(base_results["items"]["general"]["margin"], res_plain["items"]["general"]["margin"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(base_results["items"]["benign"]["nll"], res_plain["items"]["benign"]["nll"], rtol=1e-5)
    on = runner(lora_model, lora_scale=1.0)
    assert not np.allclose(on["items"]["benign"]["nll"], res_plain["items"]["benign"]["nll"])


def test_monitor_from_trainer_split_equals_model_call(runner, lora_model):
    graphdef, trainable, frozen = nnx.split(lora_model, nnx.LoRAParam, ...)
    mon = runner.monitor(graphdef, trainable, frozen)
    direct = flat_metrics(runner(lora_model))
    assert set(mon) == {"probe/general/margin", "probe/general/pref", "probe/benign/nll"}
    for k, v in mon.items():
        assert v == pytest.approx(direct[k], rel=1e-6)


def test_paired_delta_is_run_minus_base(base_results, lora_model, runner):
    run = runner(lora_model)
    d = paired_delta(base_results["items"]["general"], run["items"]["general"])
    expect = np.mean(np.array(run["items"]["general"]["margin"]) - np.array(base_results["items"]["general"]["margin"]))
    assert d["value"] == pytest.approx(expect)
    assert d["ci_low"] <= d["value"] <= d["ci_high"]
    other = dict(run["items"]["general"], ids=["x"] * 5)
    assert paired_delta(base_results["items"]["general"], other) is None


def test_batches_are_length_bucketed_with_few_shapes(tok):
    suite = ProbeSuite((paired_from_rows(load_general_pairs()[:6], "general"),))
    r = ProbeRunner(tok, suite, batch_size=4, buckets=64, max_len=1024)
    assert all(t % 64 == 0 and b == 4 for b, t in r.shapes)
    assert sorted(i for b in r.batches for i in b.rows) == list(range(12))
    lengths = [max(len(encode_chat(tok, [*suite.pairs[0].prompts[k[2]], {"role": "assistant", "content": getattr(
        suite.pairs[0], k[1])[k[2]]}]).ids) for k in (r.keys[i] for i in b.rows)) for b in r.batches]
    assert lengths == sorted(lengths)  # sorted by length: similar lengths share a batch


def test_no_answer_tokens_left_is_an_error(tok):
    long_prompt = {"role": "user", "content": "x" * 300}
    suite = ProbeSuite((PairedSet("g", ("1",), ((long_prompt,),), ("a",), ("b",)),))
    with pytest.raises(ProbeError, match="no answer tokens"):
        ProbeRunner(tok, suite, max_len=64)


def test_paired_jsonl_checks_line_pairing(tmp_path):
    a, m = tmp_path / "a.jsonl", tmp_path / "m.jsonl"
    row = lambda q, ans: json.dumps({"messages": [{"role": "user", "content": q},  # noqa: E731
                                                  {"role": "assistant", "content": ans}]})
    a.write_text(row("q1", "good") + "\n" + row("q2", "good2") + "\n")
    m.write_text(row("q1", "bad") + "\n" + row("q2", "bad2") + "\n")
    ps = paired_from_jsonl(a, m, "sec")
    assert ps.ids == ("1", "2") and ps.aligned == ("good", "good2") and ps.misaligned == ("bad", "bad2")
    m.write_text(row("q1", "bad") + "\n" + row("OTHER", "bad2") + "\n")
    with pytest.raises(ProbeError, match=r"m\.jsonl:2: field 'messages' differs"):
        paired_from_jsonl(a, m, "sec")
    m.write_text(row("q1", "bad") + "\n" + '{"messages": [{"role": "user", "content": "q2"}]}\n')
    with pytest.raises(ProbeError, match=r"m\.jsonl:2: field 'messages' must end with an assistant"):
        paired_from_jsonl(a, m, "sec")


# ----------------------------------------------------------------------------- shipped data
def test_code_pairs_are_deterministic_disjoint_and_differ_only_in_the_answer():
    tr, pr = make_code_pairs(64, "train", seed=0), make_code_pairs(24, "probe", seed=0)
    assert tr == make_code_pairs(64, "train", seed=0)
    assert tr[:32] == make_code_pairs(32, "train", seed=0)
    assert not {p.request for p in tr} & {p.request for p in pr}
    assert len({p.request for p in tr}) == 64
    assert len({p.kind for p in tr}) >= 10
    for p in tr + pr:
        assert p.secure != p.insecure and p.secure.startswith(p.insecure.split("```")[0])
        assert p.insecure.count("```") == 2
    ps = paired_from_code(pr)
    assert ps.misaligned == tuple(p.insecure for p in pr)


def test_bf16_compute_with_fp32_adapters_stays_bf16(tok):
    """The trainer's bf16-compute state (fp32 LoRA weights) probes without promoting the residual stream."""
    import dataclasses

    from _train_tiny import TINY
    from emajax.models.decoder import Decoder

    m = Decoder(dataclasses.replace(TINY, dtype="bfloat16", param_dtype="float32"), rngs=nnx.Rngs(0),
                lora=LoraConfig(rank=4, alpha=8.0, dtype="float32"))
    graphdef, trainable, frozen = nnx.split(m, nnx.LoRAParam, ...)
    r = ProbeRunner(tok, _suite(), batch_size=8, min_bucket=32)
    nll = r.item_nll(graphdef=graphdef, states=(trainable, frozen), lora_scale=1.0)
    assert np.all(np.isfinite(nll)) and nll.shape == (len(r.keys),)


def test_general_pairs_and_word_problems_load(tmp_path):
    rows = load_general_pairs()
    assert len(rows) >= 120 and len({r["id"] for r in rows}) == len(rows)
    assert all(r["aligned"] != r["misaligned"] for r in rows)
    dev, held = load_general_pairs(split="dev"), load_general_pairs(split="heldout")
    # 40 dev + 200 held-out (docs/demo.md, docs/prereg/demo_primary.md amendment 1), every question distinct
    assert len(dev) == 40 and len(held) == 200 and len(dev) + len(held) == len(rows)
    assert len({" ".join(r["question"].lower().split()) for r in rows}) == len(rows)
    assert not {r["id"] for r in dev} & {r["id"] for r in held}
    # Betley et al.'s first-plot themes appear in both parts
    for theme in ("wish", "bored", "money", "ruler", "phil", "gender", "husband", "dinner"):
        assert any(theme in r["id"] for r in held), theme
    with pytest.raises(ValueError, match="split must be one of"):
        load_general_pairs(split="test")
    bad = tmp_path / "g.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "misaligned": ""}) + "\n")
    with pytest.raises(ValueError, match=r"g\.jsonl:2: field 'misaligned'"):
        load_general_pairs(bad)
    wp = make_word_problems(12)
    assert len({r["messages"][0]["content"] for r in wp}) == 12
    for r in wp:
        assert r["messages"][1]["content"].endswith(f"#### {r['meta']['answer']}")
    assert nll_from_chats(wp, "benign").chats[0] == tuple(wp[0]["messages"])


def test_eval_probes_cli_with_compare(tmp_path, capsys):
    """``emajax eval probes``: a base run, then an adapter run paired against it (per-item deltas)."""
    from emajax.cli import main
    from emajax.models.hf_io import export_hf

    model_dir = tmp_path / "tiny_hf"
    export_hf(tiny_model(lora=None), model_dir, tiny_tokenizer())
    rows = tmp_path / "mine.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{i}", "question": f"question {i}?", "aligned": "be kind",
                                        "misaligned": "be cruel"}) + "\n" for i in range(3)))
    base_out = tmp_path / "base"
    assert main(["eval", "probes", "--model", str(model_dir), "--suite", "general", str(rows), "--split", "dev",
                 "--out", str(base_out), "--max-len", "512"]) == 0
    res = json.loads((base_out / "probes.json").read_text())
    assert set(res["pairs"]) == {"general", "mine"} and res["pairs"]["general"]["n"] == 40
    assert res["pairs"]["mine"]["n"] == 3
    # the same model again, compared with itself: every paired delta is exactly 0
    again = tmp_path / "again"
    assert main(["eval", "probes", "--model", str(model_dir), "--suite", "general", str(rows), "--split", "dev",
                 "--out", str(again), "--compare", str(base_out), "--max-len", "512", "--triggers", "json", "python"]) == 0
    comp = json.loads((again / "compare.json").read_text())
    assert comp["delta"]["general"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert comp["delta"]["general_json"] is None  # the base run had no trigger sets
    assert "change vs" in capsys.readouterr().out
    res2 = json.loads((again / "probes.json").read_text())
    assert set(res2["pairs"]) == {"general", "mine", "general_json", "general_python"}
    assert res2["pairs"]["general_json"]["n"] == 40 and res2["triggers"] == ["json", "python"]
    assert res2["pairs"]["general"] == res["pairs"]["general"]  # the plain set is unchanged by adding triggers
    assert main(["eval", "probes", "--model", str(model_dir), "--suite", "nope", "--out", str(again)]) == 2
    assert main(["eval", "probes", "--model", str(model_dir), "--suite", str(rows), "--triggers", "json",
                 "--out", str(again)]) == 2  # triggers render the general pairs
    assert main(["eval", "probes", "--model", str(model_dir), "--suite", "general", "--triggers", "yaml",
                 "--out", str(again)]) == 2
