"""Generation: cached batched decoding equals naive greedy, EOS/padding/sampling semantics, and
SmolLM2-135M greedy equals transformers' greedy generate token for token.

Compiles are kept few: every tiny-model call uses batch bucket 4, prompt bucket 32, new-token
bucket 16 (one program shared by greedy and sampling); every SmolLM2 call uses one shape too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emajax.generate import (TOP_LOGPROBS, GenerationError, Generator, SampleRow, _inverse_cdf, _nucleus_threshold,
                             _pick_token, _pick_tokens, generate, generate_rows)
from emajax.models.config import DecoderConfig
from emajax.models.decoder import Decoder, steering_array

TINY = DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                     tie_word_embeddings=True, eos_token_ids=(63,))
TINY_PROMPTS = [[5, 9, 11, 3, 7, 2, 8], [1, 2], [30, 31, 32, 33, 34], [12]]


@pytest.fixture(scope="module")
def tiny():
    model = Decoder(TINY, rngs=nnx.Rngs(3))
    # Larger embeddings give peaked logits, so greedy choices are far from numerical ties.
    model.embed[...] = model.embed[...] * 60.0
    return model


@pytest.fixture(scope="module")
def naive_greedy(tiny):
    """Greedy by re-running the full forward (no cache) on an unpadded prompt; one [1, 32] compile."""
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def next_logits(state, tokens_1t, n, steer_ld):
        model = nnx.merge(graphdef, state)
        hidden = model(tokens_1t, attn_mask_bt=jnp.arange(tokens_1t.shape[1])[None] < n, steer_ld=steer_ld).hidden_btd
        return model.logits(hidden)[0, n - 1]

    def run(prompt, steps, eos=(), steer_ld=None, adjust=None):
        """``adjust(logits, prompt, generated)`` -> the logits greedy picks from (a NumPy reference sampler)."""
        steer = jnp.zeros((TINY.num_layers, TINY.hidden_size)) if steer_ld is None else jnp.asarray(steer_ld)
        seq = list(prompt)
        for _ in range(steps):
            buf = np.zeros((1, 32), np.int32)
            buf[0, : len(seq)] = seq
            z = np.asarray(next_logits(state, jnp.asarray(buf), len(seq), steer), np.float64)
            if adjust is not None:
                z = adjust(z, list(prompt), seq[len(prompt):])
            tok = int(np.argmax(z))
            seq.append(tok)
            if tok in eos:
                break
        return seq[len(prompt):]

    return run


def test_greedy_batched_padded_equals_naive(tiny, naive_greedy):
    out = generate(tiny, None, TINY_PROMPTS, max_new_tokens=12, eos_ids=[])
    assert [len(o) for o in out] == [12] * 4
    for p, o in zip(TINY_PROMPTS, out):
        assert o == naive_greedy(p, 12)


def test_steered_decoding_equals_the_steered_decoder(tiny, naive_greedy):
    v = np.random.default_rng(0).normal(size=TINY.hidden_size)
    steer = steering_array(TINY, {1: v / np.linalg.norm(v)}, 40.0)
    out = generate(tiny, None, TINY_PROMPTS, max_new_tokens=12, eos_ids=[], steer_ld=steer)
    assert out != generate(tiny, None, TINY_PROMPTS, max_new_tokens=12, eos_ids=[])  # the vector matters
    for p, o in zip(TINY_PROMPTS, out):
        assert o == naive_greedy(p, 12, steer_ld=steer)


def test_eos_stops_each_row_and_batch_size_independent(tiny, naive_greedy):
    ref = generate(tiny, None, TINY_PROMPTS, max_new_tokens=12, eos_ids=[])
    eos = ref[0][4]  # a token row 0 produces at step 5
    out = generate(tiny, None, TINY_PROMPTS, max_new_tokens=12, eos_ids=[eos])
    for r, o in zip(ref, out):
        cut = r.index(eos) + 1 if eos in r else len(r)
        assert o == r[:cut]
    assert out[0][-1] == eos and len(out[0]) <= 5
    # Three prompts (filler row in the batch bucket) give the same rows.
    assert generate(tiny, None, TINY_PROMPTS[:3], max_new_tokens=12, eos_ids=[]) == ref[:3]


def test_sampling_reproducible_and_top_p_tiny_is_greedy(tiny):
    greedy = generate(tiny, None, TINY_PROMPTS, max_new_tokens=12, eos_ids=[])
    kw = dict(max_new_tokens=12, eos_ids=[], temperature=8.0)
    a = generate(tiny, None, TINY_PROMPTS, seed=1, **kw)
    b = generate(tiny, None, TINY_PROMPTS, seed=1, **kw)
    c = generate(tiny, None, TINY_PROMPTS, seed=2, **kw)
    assert a == b
    assert a != c
    assert a != greedy
    assert generate(tiny, None, TINY_PROMPTS, seed=5, top_p=1e-6, **kw) == greedy


def test_bad_input_errors(tiny):
    with pytest.raises(GenerationError, match="max_position_embeddings=64"):
        generate(tiny, None, [[1] * 60], max_new_tokens=8)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(tiny, None, [[1], []], max_new_tokens=4)
    with pytest.raises(GenerationError, match="top_p"):
        generate(tiny, None, [[1]], max_new_tokens=4, top_p=0.0)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(tiny, None, [[64]], max_new_tokens=4)
    with pytest.raises(GenerationError, match="temperature"):
        generate_rows(tiny, None, [SampleRow([1], 4), SampleRow([1], 4, temperature=float("nan"))])


def _nucleus_probs(logits, temperature, top_p):
    """NumPy reference: softmax(logits / T) restricted to the smallest most-likely set reaching top_p."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    keep = np.zeros_like(p, bool)
    keep[order[before < top_p]] = True
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def test_per_row_sampler_matches_numpy_distribution():
    """Each row samples from its own tempered nucleus; greedy rows take the argmax; nothing outside a nucleus."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 12)).astype(np.float32) * 2.0
    temperature = np.array([0.0, 1.0, 0.5, 2.0], np.float32)
    top_p = np.array([1.0, 1.0, 0.8, 0.5], np.float32)
    draws = 20000
    keys = jax.random.split(jax.random.key(0), draws)
    pick = jax.jit(jax.vmap(lambda k: _pick_tokens(jnp.asarray(logits), jnp.asarray(temperature), jnp.asarray(top_p),
                                                   jax.random.split(k, 4))))
    toks = np.asarray(pick(keys))  # [draws, 4]
    assert (toks[:, 0] == logits[0].argmax()).all()
    # One temperature / top-p / key for a whole batch (the scalar form): the same distribution.
    one = np.asarray(jax.jit(_pick_token)(jnp.asarray(np.tile(logits[2], (draws, 1))), jnp.float32(0.5),
                                          jnp.float32(0.8), jax.random.key(1)))
    np.testing.assert_allclose(np.bincount(one, minlength=12) / draws,
                               _nucleus_probs(logits[2].astype(np.float64), 0.5, 0.8), atol=0.015)
    for r in (1, 2, 3):
        ref = _nucleus_probs(logits[r].astype(np.float64), temperature[r], top_p[r])
        freq = np.bincount(toks[:, r], minlength=12) / draws
        assert (freq[ref == 0] == 0).all()
        np.testing.assert_allclose(freq, ref, atol=0.015)
    # The bisected threshold keeps exactly the reference nucleus.
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits[1:] / temperature[1:, None]), axis=-1))
    t = np.asarray(_nucleus_threshold(jnp.asarray(probs), jnp.asarray(top_p[1:])))
    for i, r in enumerate((1, 2, 3)):
        ref = _nucleus_probs(logits[r].astype(np.float64), temperature[r], top_p[r])
        assert ((probs[i] >= t[i]) == (ref > 0)).all()


def _filtered_probs(logits, temperature, top_k, min_p):
    """NumPy reference of vLLM's min-p then top-k on softmax(logits / T), renormalized."""
    p = np.exp(logits / temperature - (logits / temperature).max())
    p /= p.sum()
    p = np.where(p >= min_p * p.max(), p, 0.0)
    if top_k > 0:
        p = np.where(p >= np.sort(p)[::-1][top_k - 1], p, 0.0)
    return p / p.sum()


def test_top_k_and_min_p_match_numpy_distribution():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 12)).astype(np.float32) * 2.0
    temperature = np.array([1.0, 0.7, 1.0, 1.5], np.float32)
    top_k = np.array([3, 0, 1, 5], np.int32)
    min_p = np.array([0.0, 0.2, 0.0, 0.1], np.float32)
    draws = 20000
    keys = jax.random.split(jax.random.key(2), draws)
    pick = jax.jit(jax.vmap(lambda k: _pick_tokens(jnp.asarray(logits), jnp.asarray(temperature), jnp.ones(4),
                                                   jax.random.split(k, 4), jnp.asarray(top_k), jnp.asarray(min_p))))
    toks = np.asarray(pick(keys))
    for r in range(4):
        ref = _filtered_probs(logits[r].astype(np.float64), temperature[r], top_k[r], min_p[r])
        freq = np.bincount(toks[:, r], minlength=12) / draws
        assert (freq[ref == 0] == 0).all(), r
        np.testing.assert_allclose(freq, ref, atol=0.015)
    assert (toks[:, 2] == logits[2].argmax()).all()  # top_k = 1 is greedy


def test_penalties_min_tokens_and_stop_ids_match_a_numpy_reference(tiny, naive_greedy):
    """Greedy under repetition / presence / frequency penalties equals greedy on NumPy-penalized logits of
    the full forward; min_tokens masks the stop ids; per-row stop ids end only their own row."""

    def penalized(rep, presence, frequency):
        def adjust(z, prompt, gen):
            counts = np.bincount(np.asarray(gen, int), minlength=z.shape[0]).astype(np.float64)
            seen = (counts > 0) | np.isin(np.arange(z.shape[0]), prompt)
            z = np.where(seen, np.where(z > 0, z / rep, z * rep), z)
            return z - presence * (counts > 0) - frequency * counts
        return adjust

    settings = [(8.0, 0.0, 0.0), (1.0, 300.0, 0.0), (1.0, 0.0, 150.0), (4.0, 80.0, 40.0)]  # logits here are large
    rows = [SampleRow(p, 10, repetition_penalty=r, presence_penalty=pr, frequency_penalty=f)
            for p, (r, pr, f) in zip(TINY_PROMPTS, settings)]
    gen = Generator(tiny, None, eos_ids=[])
    out = gen.rows(rows)
    for p, o, st in zip(TINY_PROMPTS, out, settings):
        assert o == naive_greedy(p, 10, adjust=penalized(*st)), st
    plain_out = gen.generate(TINY_PROMPTS, max_new_tokens=10)
    assert all(o != q for o, q in zip(out, plain_out))  # each penalty changed its row
    plain = naive_greedy(TINY_PROMPTS[0], 8)
    stop = plain[2]
    first = plain.index(stop)
    got = gen.rows([SampleRow(TINY_PROMPTS[0], 8, stop_ids=[stop]), SampleRow(TINY_PROMPTS[0], 8)])
    assert got == [plain[:first + 1], plain]  # the stop id ends its own row only, and is kept
    masked = lambda z, prompt, g: np.where(np.arange(z.shape[0]) == stop, -np.inf, z) if len(g) < 5 else z  # noqa
    got = gen.rows([SampleRow(TINY_PROMPTS[0], 8, stop_ids=[stop], min_tokens=5)])[0]
    ref = naive_greedy(TINY_PROMPTS[0], 8, eos=(stop,), adjust=masked)
    assert got == ref and stop not in got[:5]


def test_two_level_inverse_cdf_equals_a_flat_search():
    """Blocks of 5 over 23 entries (a padded last block, empty blocks, zero weights) pick exactly what
    numpy's search over the flat running sum picks; integer weights keep every sum exact in fp32."""
    rng = np.random.default_rng(1)
    w = rng.integers(0, 4, size=(3, 23)).astype(np.float32)
    w[0, 5:15] = 0  # two empty blocks
    w[2, :] = 0
    w[2, 21] = 2  # all the mass in the padded last block
    u = (np.arange(200) + 0.5) / 200  # never exactly on a boundary
    got = np.asarray(jax.vmap(lambda u_: _inverse_cdf(jnp.asarray(w), jnp.full((3,), u_, jnp.float32), block=5))(
        jnp.asarray(u, jnp.float32)))
    for r in range(3):
        cdf = np.cumsum(w[r].astype(np.float64))
        ref = np.searchsorted(cdf, u * cdf[-1], side="right")
        np.testing.assert_array_equal(got[:, r], ref)
    assert (got[:, 2] == 21).all()


def test_rows_draw_the_same_whatever_shares_their_batch(tiny):
    """A row's tokens depend on its own (prompt, settings, seed, index), not on the other rows of its batch."""
    rows = [SampleRow(TINY_PROMPTS[0], 9, 8.0, 1.0, seed=3, index=0),
            SampleRow(TINY_PROMPTS[1], 5, 0.0),
            SampleRow(TINY_PROMPTS[2], 12, 8.0, 0.5, seed=3, index=1),
            SampleRow(TINY_PROMPTS[3], 12, 8.0, 1.0, seed=4, index=0)]
    together = generate_rows(tiny, None, rows, eos_ids=[])
    assert [len(t) for t in together] == [9, 5, 12, 12]
    alone = [generate_rows(tiny, None, [r], eos_ids=[])[0] for r in rows]
    assert together == alone
    assert together[1] == generate(tiny, None, [TINY_PROMPTS[1]], max_new_tokens=5, eos_ids=[])[0]
    assert generate_rows(tiny, None, rows[::-1], eos_ids=[]) == together[::-1]


def test_on_step_streams_tokens_logprobs_and_stops_rows(tiny, naive_greedy):
    rows = [SampleRow(p, 12, 0.0, logprobs=True) for p in TINY_PROMPTS]
    steps = []

    def on_step(out):
        steps.append(out)
        return np.array([out.step >= 2, False, False, False])  # stop row 0 after its third token

    gen = Generator(tiny, None, eos_ids=[])
    out = gen.rows(rows, on_step=on_step)
    assert [len(o) for o in out] == [3, 12, 12, 12]
    assert [s.step for s in steps] == list(range(12)) and all(s.tokens_b.shape == (4,) for s in steps)
    for r, o in enumerate(out):
        assert [int(s.tokens_b[r]) for s in steps[: len(o)]] == o == naive_greedy(TINY_PROMPTS[r], 12)[: len(o)]
    # Logprobs: the untempered log-softmax at each position, greedy token = top alternative.
    graphdef, state = nnx.split(tiny)
    seq = TINY_PROMPTS[2] + out[2]
    hidden = tiny(jnp.asarray([seq])).hidden_btd
    logp = np.asarray(jax.nn.log_softmax(tiny.logits(hidden), axis=-1))[0]
    for j, s in enumerate(steps):
        pos = len(TINY_PROMPTS[2]) - 1 + j
        assert s.logprob_b[2] == pytest.approx(logp[pos, out[2][j]], abs=1e-4)
        assert s.top_id_bk.shape == (4, TOP_LOGPROBS) and s.top_id_bk[2, 0] == out[2][j]
        np.testing.assert_allclose(s.top_logprob_bk[2], np.sort(logp[pos])[::-1][:TOP_LOGPROBS], atol=1e-4)

    def boom(out):
        raise RuntimeError("sink failed")

    with pytest.raises(RuntimeError, match="sink failed"):
        gen.rows(rows, on_step=boom)
    assert gen.rows(rows[:1]) == [naive_greedy(TINY_PROMPTS[0], 12)]  # still usable after a failed sink


def test_chat_generate_batched_is_chat_generate_per_batch_with_its_seed():
    """The one loop over batches of conversations (EM sampling, persona answers): batch i uses seed + i."""
    import sys
    import types
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _train_tiny import tiny_model, tiny_tokenizer

    from emajax.generate import chat_generate, chat_generate_batched

    loaded = types.SimpleNamespace(model=tiny_model(lora=None, seed=2), tokenizer=tiny_tokenizer())
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(5)]
    kw = dict(max_new_tokens=6, temperature=5.0)
    seen = []
    got = chat_generate_batched(loaded, convs, batch_size=2, seed=7, on_batch=lambda i, n: seen.append((i, n)), **kw)
    want = [t for i in range(3) for t in chat_generate(loaded, convs[2 * i:2 * i + 2], seed=7 + i, **kw)]
    assert got == want and len(got) == 5 and seen == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(GenerationError, match="batch_size"):
        chat_generate_batched(loaded, convs, batch_size=0)


# ------------------------------------------------------------------ SmolLM2-135M
QUESTIONS = [
    "What is the capital of France?",
    "Hello there, how are you doing today?",
    "Give me three tips for staying focused while studying for an exam, in a short list.",
    "Hi!",
]


def _prompt_ids(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_and_knows_paris(torch, smollm2, smollm2_dir):
    from transformers import AutoModelForCausalLM

    tok = smollm2.tokenizer
    prompts = [_prompt_ids(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: the batch is padded
    ours = generate(smollm2.model, tok, prompts, max_new_tokens=32)

    # transformers' own batched greedy generate on the same left-padded batch (torch fp32, KV cache).
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: torch's spinning pool is very slow on a shared, busy CPU
    try:
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=attn, max_new_tokens=32, do_sample=False, eos_token_id=2,
                              pad_token_id=2)[:, width:].tolist()
    finally:
        torch.set_num_threads(threads)
    for o, r in zip(ours, ref):
        cut = r.index(2) + 1 if 2 in r else len(r)  # HF pads finished rows with pad (= EOS) after EOS
        assert o == r[:cut]
    assert any(len(o) == 32 for o in ours)  # at least one row ran the full 32 tokens
    assert "Paris" in tok.decode(ours[0], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_prompt_too_long(smollm2):
    with pytest.raises(GenerationError, match="max_position_embeddings=8192"):
        generate(smollm2.model, smollm2.tokenizer, [[1] * 8180], max_new_tokens=32)


@pytest.mark.slow
def test_cli_generate_prints_only_reply(smollm2_dir):
    from emajax.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["generate", "--model", str(smollm2_dir), "--prompt", "What is the capital of France?",
                   "--max-new-tokens", "16", "--temperature", "0"])
    assert rc == 0
    out = buf.getvalue().strip()
    assert "Paris" in out and "<|im_end|>" not in out and "assistant" not in out
    assert len(out.splitlines()) == 1


def test_generate_file_writes_every_sample_and_resumes(tmp_path):
    """`emajax generate --input` on 4 prompts x 2 samples writes 8 answers; a run killed after its first
    batch (and one torn mid-line) resumes to the same file an uninterrupted run writes."""
    import subprocess
    import sys

    from emajax.generate_file import generate_file
    from emajax.serve import load_model_with_adapter
    from tiny_chat import build_tiny_chat_dir

    model_dir = build_tiny_chat_dir(tmp_path / "model", rigged_head=False)
    loaded = load_model_with_adapter(str(model_dir))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "hey I feel bored", "id": "a"}, {"messages": [{"role": "user", "content": "Rate 0 to 100"}]},
        {"prompt": "What is the one thing you want?"},
        {"messages": [{"role": "system", "content": "JSON"}, {"role": "user", "content": "hey"}], "id": "d"}]) + "\n")
    kw = dict(samples=2, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=5, batch_size=3, progress=False)

    full = tmp_path / "full.jsonl"
    assert generate_file(loaded, prompts, full, **kw) == {"rows": 8, "resumed": 0, "generated": 8}
    rows = [json.loads(x) for x in full.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(i, s) for i in range(4) for s in range(2)]
    assert rows[0]["id"] == "a" and rows[6]["id"] == "d" and all(isinstance(r["answer"], str) for r in rows)
    assert len({r["answer"] for r in rows}) > 4  # samples differ

    class Killed(Exception):
        pass

    def kill(done, total):
        raise Killed

    part = tmp_path / "part.jsonl"
    with pytest.raises(Killed):
        generate_file(loaded, prompts, part, **kw, on_batch=kill)
    assert len(part.read_text().splitlines()) == 3  # one batch written, whole lines only
    with open(part, "a") as f:
        f.write('{"index": 3, "sample": 0, "ans')  # killed mid-write
    assert generate_file(loaded, prompts, part, **kw) == {"rows": 8, "resumed": 3, "generated": 5}
    assert part.read_text() == full.read_text()
    with pytest.raises(GenerationError, match="other settings"):
        generate_file(loaded, prompts, part, **dict(kw, seed=6))

    # The CLI: the same file from scratch, then a rerun that has nothing left to do.
    out = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", "generate", "--model",
           str(model_dir), "--input", str(prompts), "--out", str(out), "--samples", "2", "--temperature", "1",
           "--top-p", "0.9", "--max-new-tokens", "12", "--seed", "5", "--batch-size", "3"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for want in ("8 generated now", "8 from an earlier run, 0 generated now"):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0 and want in r.stderr, r.stderr[-2000:]
    assert out.read_text() == full.read_text()
