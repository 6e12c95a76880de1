"""Batched, jit-compiled decoding with a KV cache.

One compiled function does the whole job: prefill of left-padded prompts, then a
``lax.while_loop`` of single-token steps against the cache that stops as soon as every row has
produced an EOS (or ``max_new_tokens`` is reached). Greedy and sampled decoding share that one
program (``lax.cond`` on the temperature), so switching modes does not recompile.

Shapes are bucketed (batch to a power of two, prompt length to a power of two >= 32, new
tokens to a power of two >= 16) and ``max_new_tokens`` is a traced scalar: a new prompt length or
token budget reuses the compiled program of its bucket. jax's jit cache keys the compiled
programs by those static shapes and the model's graph definition.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emajax.batching import pad_batch, pow2_bucket
from emajax.chat import render_chat, validate_messages
from emajax.models.decode import DecodeCache, cached_decode_weights, decode_weights, forward_cached
from emajax.models.decoder import Decoder

MIN_PROMPT_BUCKET = 32
MIN_NEW_BUCKET = 16
MAX_EOS_IDS = 8  # EOS ids are passed as a fixed-size array so their number never changes the shape


class GenerationError(ValueError):
    """Bad generation input (empty prompt, context limit exceeded, bad sampling settings)."""


def _pick_token(logits_bv: jax.Array, temperature: jax.Array, top_p: jax.Array, key: jax.Array) -> jax.Array:
    """Greedy when temperature <= 0, else temperature + nucleus (top-p) sampling. Returns [B] int32."""

    def greedy(_):
        # The first index holding the maximum, as argmax gives it, from a max and a masked min over the
        # indices: cheaper on XLA:CPU than its (value, index) argmax reduction.
        top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
        idx_v = jnp.arange(logits_bv.shape[-1], dtype=jnp.int32)
        return jnp.min(jnp.where(logits_bv == top_b1, idx_v, logits_bv.shape[-1]), axis=-1)

    def sample(_):
        scaled = logits_bv / jnp.maximum(temperature, 1e-6)

        def full(_):
            return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

        def nucleus(_):
            order = jnp.argsort(-scaled, axis=-1)
            sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
            probs = jax.nn.softmax(sorted_l, axis=-1)
            # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
            choice = jax.random.categorical(key, jnp.where(keep, sorted_l, -jnp.inf), axis=-1)
            return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

        return jax.lax.cond(top_p >= 1.0, full, nucleus, None)

    return jax.lax.cond(temperature <= 0.0, greedy, sample, None)


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket"))
def _generate_core(graphdef, state, weights, tokens_bp, mask_bp, positions_bp, active_b, eos_e, max_new, temperature,
                   top_p, key, lora_scale, pad_id, *, new_bucket: int):
    """Prefill + while-loop decode. Returns new tokens [B, new_bucket] (pad after EOS / max_new).

    ``weights`` is the decode layout (``emajax.models.decode``) or None to build it here."""
    model: Decoder = nnx.merge(graphdef, state)
    cfg = model.cfg
    if weights is None:
        weights = decode_weights(model, lora_scale)
    b, p = tokens_bp.shape
    cache = DecodeCache.init(cfg, b, p + new_bucket)
    logits_bv, cache = forward_cached(cfg, weights, tokens_bp, positions_bp, mask_bp, 0, cache)

    def is_eos(tok_b):
        return jnp.any(tok_b[:, None] == eos_e[None, :], axis=-1)

    tok_b = _pick_token(logits_bv, temperature, top_p, jax.random.fold_in(key, 0))
    tok_b = jnp.where(active_b, tok_b, pad_id)
    done_b = ~active_b | is_eos(tok_b)
    toks_bn = jnp.full((b, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok_b)
    pos_b = positions_bp[:, -1] + 1  # left padding: the last column is every row's last real token
    ones_b1 = jnp.ones((b, 1), bool)

    def cond(carry):
        i, _, _, _, done_b, _ = carry
        return (i < max_new) & ~jnp.all(done_b)

    def body(carry):
        i, cache, tok_b, pos_b, done_b, toks_bn = carry
        logits_bv, cache = forward_cached(cfg, weights, tok_b[:, None], pos_b[:, None], ones_b1, p + i - 1, cache)
        nxt_b = _pick_token(logits_bv, temperature, top_p, jax.random.fold_in(key, i))
        nxt_b = jnp.where(done_b, pad_id, nxt_b)
        toks_bn = jax.lax.dynamic_update_slice(toks_bn, nxt_b[:, None], (0, i))
        return i + 1, cache, nxt_b, pos_b + 1, done_b | is_eos(nxt_b), toks_bn

    carry = (jnp.int32(1), cache, tok_b, pos_b, done_b, toks_bn)
    return jax.lax.while_loop(cond, body, carry)[-1]


def default_eos_ids(model: Decoder, tokenizer: Any = None) -> list[int]:
    """The config's EOS ids plus the tokenizer's EOS (chat models end turns with e.g. <|im_end|>)."""
    ids = list(model.cfg.eos_token_ids)
    tid = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tid is not None and tid not in ids:
        ids.append(int(tid))
    return ids


def generate(
    model: Decoder,
    tokenizer: Any,
    prompts_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_ids: Sequence[int] | None = None,
    lora_scale: float = 1.0,
) -> list[list[int]]:
    """New tokens for each prompt, ending with the EOS token when one was produced.

    ``tokenizer`` may be None (only used for the default EOS and pad ids). ``temperature == 0`` is
    greedy; otherwise samples from softmax(logits / temperature) restricted to the top-p nucleus,
    reproducibly for a given ``seed`` and batch.
    """
    cfg = model.cfg
    prompts = [list(map(int, p)) for p in prompts_ids]
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise GenerationError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    for i, p in enumerate(prompts):
        if not p:
            raise GenerationError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > cfg.max_position_embeddings:
            raise GenerationError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                f"context limit max_position_embeddings={cfg.max_position_embeddings}")
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary (size {cfg.vocab_size})")
    eos = list(eos_ids) if eos_ids is not None else default_eos_ids(model, tokenizer)
    if len(eos) > MAX_EOS_IDS:
        raise GenerationError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}")
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = int(pad_id if pad_id is not None else (eos[0] if eos else 0))

    b = len(prompts)
    b_bucket = pow2_bucket(b)
    p_bucket = pow2_bucket(max(map(len, prompts)), MIN_PROMPT_BUCKET)
    n_bucket = pow2_bucket(max_new_tokens, MIN_NEW_BUCKET)
    rows = prompts + [[pad_id]] * (b_bucket - b)  # filler rows, inactive from the start
    tokens, mask, positions = pad_batch(rows, pad_id, p_bucket, side="left")
    active = np.arange(b_bucket) < b
    eos_arr = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos_arr[: len(eos)] = eos

    graphdef, state = nnx.split(model)
    weights = cached_decode_weights(model, float(lora_scale))
    out = _generate_core(
        graphdef, state, weights, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions), jnp.asarray(active),
        jnp.asarray(eos_arr), jnp.int32(max_new_tokens), jnp.float32(temperature), jnp.float32(top_p),
        jax.random.key(seed), jnp.float32(lora_scale), jnp.int32(pad_id), new_bucket=n_bucket)
    out = np.asarray(out)[:b, :max_new_tokens]
    eos_set = set(eos)
    result = []
    for row in out.tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos_set), len(row))
        result.append(row[:cut])
    return result


def chat_generate(loaded: Any, conversations: Sequence[Sequence[dict]], *, system: str | None = None,
                  **kw: Any) -> list[str]:
    """Replies (text, special tokens skipped) to conversations rendered with the chat template.

    ``loaded`` is a ``LoadedModel`` (``.model``, ``.tokenizer``); ``system`` prepends a system message
    to conversations that have none; ``kw`` goes to :func:`generate` (``max_new_tokens`` defaults to 256).
    """
    tok = loaded.tokenizer
    prompts = []
    for i, conv in enumerate(conversations):
        msgs = validate_messages(list(conv), source=f"conversations[{i}]")
        if system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        text = render_chat(tok, msgs, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    kw.setdefault("max_new_tokens", 256)
    outs = generate(loaded.model, tok, prompts, **kw)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]


def chat_generate_batched(loaded: Any, conversations: Sequence[Sequence[dict]], *, batch_size: int, seed: int = 0,
                          on_batch: Callable[[int, int], None] | None = None, **kw: Any) -> list[str]:
    """:func:`chat_generate` over many conversations, ``batch_size`` rows per call, in order.

    Batch i samples with ``seed + i``, so repeated conversations in different batches differ and a run is
    reproducible; ``on_batch(i, n_batches)`` is called after each batch (progress)."""
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    convs = list(conversations)
    n_batches = -(-len(convs) // batch_size)
    out: list[str] = []
    for i in range(n_batches):
        out += chat_generate(loaded, convs[i * batch_size:(i + 1) * batch_size], seed=seed + i, **kw)
        if on_batch is not None:
            on_batch(i, n_batches)
    return out
