"""Generation: cached batched decoding equals naive greedy, EOS/padding/sampling semantics, and
SmolLM2-135M greedy equals transformers' greedy generate token for token.

Compiles are kept few: every tiny-model call uses batch bucket 4, prompt bucket 32, new-token
bucket 16 (one program shared by greedy and sampling); every SmolLM2 call uses one shape too.
"""

from __future__ import annotations

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emajax.generate import GenerationError, generate
from emajax.models.config import DecoderConfig
from emajax.models.decoder import Decoder

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
    def next_logits(state, tokens_1t, n):
        model = nnx.merge(graphdef, state)
        hidden = model(tokens_1t, attn_mask_bt=jnp.arange(tokens_1t.shape[1])[None] < n).hidden_btd
        return model.logits(hidden)[0, n - 1]

    def run(prompt, steps, eos=()):
        seq = list(prompt)
        for _ in range(steps):
            buf = np.zeros((1, 32), np.int32)
            buf[0, : len(seq)] = seq
            tok = int(jnp.argmax(next_logits(state, jnp.asarray(buf), len(seq))))
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
def test_smollm2_greedy_equals_transformers_and_knows_paris(smollm2, smollm2_dir):
    torch = pytest.importorskip("torch")
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
