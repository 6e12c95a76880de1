"""Batched, jit-compiled decoding with a KV cache.

One compiled function does the whole job: prefill of left-padded prompts, then a
``lax.while_loop`` of single-token steps against the cache that stops as soon as every row has
produced an EOS (or its token budget). Every sampling setting is a per-row array (token budget,
temperature, top-p, seed), so one program serves greedy and sampled rows, and any mix of requests,
without recompiling (``generate_rows``; ``generate`` is the same settings for every prompt).

Shapes are bucketed (batch to a power of two, prompt length to a power of two >= 32, new
tokens to a power of two >= 16): a new prompt length or token budget reuses the compiled program of
its bucket. jax's jit cache keys the compiled programs by those static shapes, the model's graph
definition and whether a host callback streams each step (the server's mode, which also reports
logprobs).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from emajax.batching import pad_batch, pow2_bucket
from emajax.chat import render_chat, validate_messages
from emajax.models.decode import DecodeCache, cached_decode_weights, decode_weights, forward_cached
from emajax.models.decoder import Decoder

MIN_PROMPT_BUCKET = 32
MIN_NEW_BUCKET = 16
MAX_EOS_IDS = 8  # EOS ids are passed as a fixed-size array so their number never changes the shape
TOP_LOGPROBS = 20  # alternatives reported per generated token when a row asks for logprobs


class GenerationError(ValueError):
    """Bad generation input (empty prompt, context limit exceeded, bad sampling settings)."""


@dataclass(frozen=True)
class SampleRow:
    """One row of a mixed batch: its prompt and its own sampling settings.

    The row's random stream is ``fold_in(key(seed), index)``: the same (seed, index) draws the same
    tokens whichever rows share its batch (``index`` numbers the samples of one request)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    logprobs: bool = False


class StepOutput(NamedTuple):
    """What ``generate_rows``' ``on_step`` receives after each decoding step (numpy, one entry per row).

    ``tokens_b``: the token each row produced at ``step`` (the pad id for rows already finished);
    ``logprob_b``, ``top_logprob_bk``, ``top_id_bk``: its log-probability under the untempered
    distribution and the ``TOP_LOGPROBS`` best alternatives (zeros unless some row asked for logprobs)."""

    step: int
    tokens_b: np.ndarray
    logprob_b: np.ndarray
    top_logprob_bk: np.ndarray
    top_id_bk: np.ndarray


NUCLEUS_BISECTIONS = 32  # halvings of the top-p probability threshold: within max_p / 2**32 of exact


def _nucleus_threshold(probs_bv: jax.Array, top_p_b: jax.Array) -> jax.Array:
    """Per row the largest probability t whose tokens {p >= t} hold at least top_p of the mass: the
    smallest set of most likely tokens that reaches top_p (the top token always qualifies). Found by
    bisection (masked sums only); a full sort of the vocabulary costs far more on CPU."""

    def halve(_, lo_hi):
        lo_b, hi_b = lo_hi
        mid_b = 0.5 * (lo_b + hi_b)
        ok_b = jnp.sum(jnp.where(probs_bv >= mid_b[:, None], probs_bv, 0.0), axis=-1) >= top_p_b
        return jnp.where(ok_b, mid_b, lo_b), jnp.where(ok_b, hi_b, mid_b)

    lo_b = jnp.zeros(probs_bv.shape[:1], probs_bv.dtype)
    return jax.lax.fori_loop(0, NUCLEUS_BISECTIONS, halve, (lo_b, jnp.max(probs_bv, axis=-1)))[0]


SAMPLE_BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def _inverse_cdf(weights_bv: jax.Array, u_b: jax.Array, block: int = SAMPLE_BLOCK) -> jax.Array:
    """Per row the first index whose running sum of ``weights`` exceeds ``u`` x their total (u in [0, 1)):
    a draw from weights / total. Running sums over block sums, then inside the chosen block only: a
    cumulative sum over the whole vocabulary cost several milliseconds per step on CPU."""
    b, v = weights_bv.shape
    nb = -(-v // block)
    w_bnk = jnp.pad(weights_bv, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    sums_bn = jnp.sum(w_bnk, axis=-1)
    cdf_bn = jnp.cumsum(sums_bn, axis=-1)
    target_b = u_b * cdf_bn[:, -1]
    # The last block / entry with any weight bounds the choice when rounding puts the target past the end.
    last_blk_b = nb - 1 - jnp.argmax(sums_bn[:, ::-1] > 0, axis=-1)
    blk_b = jnp.minimum(jnp.sum(cdf_bn <= target_b[:, None], axis=-1), last_blk_b)
    at = lambda x_bn: jnp.take_along_axis(x_bn, blk_b[:, None], axis=-1)[:, 0]  # noqa: E731
    inner_bk = jnp.take_along_axis(w_bnk, blk_b[:, None, None], axis=1)[:, 0]
    rest_b = target_b - (at(cdf_bn) - at(sums_bn))
    j_b = jnp.sum(jnp.cumsum(inner_bk, axis=-1) <= rest_b[:, None], axis=-1)
    last_j_b = block - 1 - jnp.argmax(inner_bk[:, ::-1] > 0, axis=-1)
    return (blk_b * block + jnp.minimum(j_b, last_j_b)).astype(jnp.int32)


def _pick_tokens(logits_bv: jax.Array, temperature_b: jax.Array, top_p_b: jax.Array, keys_b: jax.Array) -> jax.Array:
    """Per row: greedy when its temperature is <= 0, else a draw from softmax(logits / temperature)
    restricted to its top-p nucleus, with its own key. Returns [B] int32.

    A draw is one uniform number per row through the cumulative distribution in vocabulary order (not a
    noise vector over the vocabulary), so a row draws the same token whatever the other rows need;
    whole-batch ``lax.cond`` skips the sampling work when no row samples, the nucleus when none needs it."""
    v = logits_bv.shape[-1]
    # The first index holding the maximum, as argmax gives it: XLA:CPU's (value, index) argmax reduction
    # is several times slower than a max and a masked min over the indices.
    top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    greedy_b = jnp.min(jnp.where(logits_bv == top_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)

    def sample(_):
        probs_bv = jax.nn.softmax(logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None], axis=-1)

        def nucleus(_):
            t_b = jnp.where(top_p_b >= 1.0, 0.0, _nucleus_threshold(probs_bv, top_p_b))
            return jnp.where(probs_bv >= t_b[:, None], probs_bv, 0.0)

        kept_bv = jax.lax.cond(jnp.all(top_p_b >= 1.0), lambda _: probs_bv, nucleus, None)
        drawn_b = _inverse_cdf(kept_bv, jax.vmap(jax.random.uniform)(keys_b))
        return jnp.where(temperature_b > 0.0, drawn_b, greedy_b)

    return jax.lax.cond(jnp.any(temperature_b > 0.0), sample, lambda _: greedy_b, None)


def _pick_token(logits_bv: jax.Array, temperature: jax.Array, top_p: jax.Array, key: jax.Array) -> jax.Array:
    """:func:`_pick_tokens` with one temperature, top-p and key for the whole batch (row i: fold_in(key, i))."""
    b = logits_bv.shape[0]
    keys_b = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(b))
    return _pick_tokens(logits_bv, jnp.full((b,), temperature, jnp.float32), jnp.full((b,), top_p, jnp.float32),
                        keys_b)


def _logprobs(logits_bv: jax.Array, tok_b: jax.Array, want: jax.Array):
    """(logprob of tok [B], top-k logprobs [B, K], their ids [B, K]) of the untempered distribution, or
    zeros when ``want`` is False (no row asked: the log-softmax and top-k are skipped)."""
    b = logits_bv.shape[0]

    def compute(_):
        logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
        tok_lp_b = jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]
        top_lp_bk, top_id_bk = jax.lax.top_k(logp_bv, TOP_LOGPROBS)
        return tok_lp_b, top_lp_bk, top_id_bk.astype(jnp.int32)

    def skip(_):
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, TOP_LOGPROBS), jnp.float32),
                jnp.zeros((b, TOP_LOGPROBS), jnp.int32))

    return jax.lax.cond(want, compute, skip, None)


# call id -> (on_step, errors raised by it). The compiled program's host callback finds the live call's
# ``on_step`` here by the id it was traced with as an argument, so every call shares one program.
_STEP_SINKS: dict[int, tuple[Callable[[StepOutput], Any], list[BaseException]]] = {}
_SINK_IDS = itertools.count(1)


def _dispatch_step(call_id, step, tok_b, lp_b, top_lp_bk, top_id_bk) -> np.ndarray:
    """Host side of the per-step callback: hands the step to its ``on_step``; returns the rows to stop."""
    stop_b = np.zeros(np.shape(tok_b), np.bool_)
    entry = _STEP_SINKS.get(int(call_id))
    if entry is None:
        return stop_b
    on_step, errors = entry
    try:
        got = on_step(StepOutput(int(step), np.asarray(tok_b), np.asarray(lp_b), np.asarray(top_lp_bk),
                                 np.asarray(top_id_bk)))
    except BaseException as e:  # noqa: BLE001 - re-raised by generate_rows once the program returns
        errors.append(e)
        return np.ones_like(stop_b)
    if got is not None:
        got = np.asarray(got, np.bool_)
        stop_b[: got.shape[0]] = got
    return stop_b


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket", "stream"))
def _generate_core(graphdef, state, weights, tokens_bp, mask_bp, positions_bp, active_b, eos_e, max_new_b,
                   temperature_b, top_p_b, seed_b, index_b, want_lp, lora_scale, pad_id, call_id, steer_ld=None, *,
                   new_bucket: int, stream: bool):
    """Prefill + while-loop decode. Returns (new tokens [B, new_bucket], padded after a row ended; the
    number of tokens each row made [B]).

    Every sampling setting is a per-row array (mixing requests never recompiles). ``weights`` is the
    decode layout (``emajax.models.decode``) or None to build it here; ``steer_ld`` [L, D] (or None) is
    added to the residual stream after each block. With ``stream`` each step calls back to the host
    (``_dispatch_step``), which may stop rows."""
    model: Decoder = nnx.merge(graphdef, state)
    cfg = model.cfg
    if weights is None:
        weights = decode_weights(model, lora_scale)
    if steer_ld is not None:
        weights = weights._replace(steer_ld=steer_ld)
    b, p = tokens_bp.shape
    cache = DecodeCache.init(cfg, b, p + new_bucket)
    logits_bv, cache = forward_cached(cfg, weights, tokens_bp, positions_bp, mask_bp, 0, cache)
    keys_b = jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(seed_b, index_b)

    def pick(logits_bv, i, done_b):
        step_keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, i)
        tok_b = jnp.where(done_b, pad_id, _pick_tokens(logits_bv, temperature_b, top_p_b, step_keys_b))
        done_b = done_b | jnp.any(tok_b[:, None] == eos_e[None, :], axis=-1) | (i + 1 >= max_new_b)
        if stream:
            lp = _logprobs(logits_bv, tok_b, want_lp)
            stop_b = io_callback(_dispatch_step, jax.ShapeDtypeStruct((b,), jnp.bool_), call_id, i, tok_b, *lp)
            done_b = done_b | stop_b
        return tok_b, done_b

    tok_b, done_b = pick(logits_bv, jnp.int32(0), ~active_b)
    len_b = active_b.astype(jnp.int32)
    toks_bn = jnp.full((b, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok_b)
    pos_b = positions_bp[:, -1] + 1  # left padding: the last column is every row's last real token
    ones_b1 = jnp.ones((b, 1), bool)

    def cond(carry):
        i, _, _, _, done_b, _, _ = carry
        return (i < new_bucket) & ~jnp.all(done_b)

    def body(carry):
        i, cache, tok_b, pos_b, done_b, toks_bn, len_b = carry
        logits_bv, cache = forward_cached(cfg, weights, tok_b[:, None], pos_b[:, None], ones_b1, p + i - 1, cache)
        len_b = len_b + ~done_b
        nxt_b, done_b = pick(logits_bv, i, done_b)
        toks_bn = jax.lax.dynamic_update_slice(toks_bn, nxt_b[:, None], (0, i))
        return i + 1, cache, nxt_b, pos_b + 1, done_b, toks_bn, len_b

    carry = (jnp.int32(1), cache, tok_b, pos_b, done_b, toks_bn, len_b)
    return jax.lax.while_loop(cond, body, carry)[-2:]


def default_eos_ids(model: Decoder, tokenizer: Any = None) -> list[int]:
    """The config's EOS ids plus the tokenizer's EOS (chat models end turns with e.g. <|im_end|>)."""
    ids = list(model.cfg.eos_token_ids)
    tid = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tid is not None and tid not in ids:
        ids.append(int(tid))
    return ids


def pad_token_id(tokenizer: Any, eos_ids: Sequence[int]) -> int:
    """The tokenizer's pad id, else the first EOS id, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return int(pad if pad is not None else (eos_ids[0] if eos_ids else 0))


def batch_buckets(n_rows: int, longest_prompt: int, most_new_tokens: int) -> tuple[int, int, int]:
    """The compiled shape (batch, prompt length, new tokens) a batch runs in: powers of two, the prompt
    at least ``MIN_PROMPT_BUCKET``, the new tokens at least ``MIN_NEW_BUCKET``."""
    return (pow2_bucket(n_rows), pow2_bucket(longest_prompt, MIN_PROMPT_BUCKET),
            pow2_bucket(most_new_tokens, MIN_NEW_BUCKET))


def _seed32(seed: int) -> int:
    """A Python int seed (any size, any sign) folded to the 32 bits a jax key takes."""
    s = int(seed) & ((1 << 64) - 1)
    return (s ^ (s >> 32)) & 0xFFFFFFFF


def _check_row(i: int, row: SampleRow, cfg: Any) -> list[int]:
    prompt = [int(t) for t in row.prompt_ids]
    if row.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {row.max_new_tokens}")
    if not (row.temperature >= 0 and np.isfinite(row.temperature)) or not 0.0 < row.top_p <= 1.0:
        raise GenerationError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={row.temperature}, "
                              f"top_p={row.top_p}")
    if not prompt:
        raise GenerationError(f"prompt {i} is empty")
    if len(prompt) + row.max_new_tokens > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={row.max_new_tokens} that exceeds the "
            f"model's context limit max_position_embeddings={cfg.max_position_embeddings}")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary (size {cfg.vocab_size})")
    return prompt


def generate_rows(
    model: Decoder,
    tokenizer: Any,
    rows: Sequence[SampleRow],
    *,
    eos_ids: Sequence[int] | None = None,
    lora_scale: float = 1.0,
    on_step: Callable[[StepOutput], Any] | None = None,
    steer_ld: Any = None,
) -> list[list[int]]:
    """New tokens for each row, ending with the EOS token when one was produced; one compiled program
    for any mix of per-row settings (prompt, token budget, temperature, top-p, seed, logprobs).

    ``on_step`` (optional) is called on the host after every decoding step with a :class:`StepOutput`
    (streaming); it may return a bool array [len(rows)] of rows to stop now (a stop string matched, the
    client went away). An exception it raises stops the batch and is re-raised here. Without it the
    program never leaves the device (and no logprobs are computed). ``steer_ld`` [L, D] decodes a steered
    model (as ``Decoder``'s ``steer_ld``: added to the residual stream after each block)."""
    cfg = model.cfg
    if not rows:
        return []
    prompts = [_check_row(i, r, cfg) for i, r in enumerate(rows)]
    eos = list(eos_ids) if eos_ids is not None else default_eos_ids(model, tokenizer)
    if len(eos) > MAX_EOS_IDS:
        raise GenerationError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(eos)}")
    pad_id = pad_token_id(tokenizer, eos)

    b = len(rows)
    b_bucket, p_bucket, n_bucket = batch_buckets(b, max(map(len, prompts)), max(r.max_new_tokens for r in rows))
    fill = b_bucket - b  # filler rows, inactive from the start
    tokens, mask, positions = pad_batch(prompts + [[pad_id]] * fill, pad_id, p_bucket, side="left")
    eos_arr = np.full((MAX_EOS_IDS,), -1, np.int32)
    eos_arr[: len(eos)] = eos

    def per_row(values, dtype, filler):
        return jnp.asarray(np.asarray(list(values) + [filler] * fill, dtype))

    graphdef, state = nnx.split(model)
    weights = cached_decode_weights(model, float(lora_scale))
    call_id, errors = 0, []
    if on_step is not None:
        call_id = next(_SINK_IDS)
        _STEP_SINKS[call_id] = (lambda out: on_step(out._replace(
            tokens_b=out.tokens_b[:b], logprob_b=out.logprob_b[:b], top_logprob_bk=out.top_logprob_bk[:b],
            top_id_bk=out.top_id_bk[:b])), errors)
    try:
        out, lens = _generate_core(
            graphdef, state, weights, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions),
            jnp.asarray(np.arange(b_bucket) < b), jnp.asarray(eos_arr),
            per_row((r.max_new_tokens for r in rows), np.int32, 1), per_row((r.temperature for r in rows), np.float32, 0),
            per_row((r.top_p for r in rows), np.float32, 1), per_row((_seed32(r.seed) for r in rows), np.uint32, 0),
            per_row((r.index for r in rows), np.uint32, 0), jnp.bool_(any(r.logprobs for r in rows)),
            jnp.float32(lora_scale), jnp.int32(pad_id), jnp.int32(call_id),
            None if steer_ld is None else jnp.asarray(steer_ld), new_bucket=n_bucket, stream=on_step is not None)
        out, lens = np.asarray(out)[:b], np.asarray(lens)[:b]
    finally:
        _STEP_SINKS.pop(call_id, None)
    if errors:
        raise errors[0]
    return [row[:n] for row, n in zip(out.tolist(), lens.tolist())]


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
    steer_ld: Any = None,
) -> list[list[int]]:
    """New tokens for each prompt, ending with the EOS token when one was produced.

    ``tokenizer`` may be None (only used for the default EOS and pad ids). ``temperature == 0`` is
    greedy; otherwise samples from softmax(logits / temperature) restricted to the top-p nucleus;
    prompt i draws from ``fold_in(key(seed), i)``, reproducibly for a given ``seed``. Every prompt with
    the same settings: :func:`generate_rows` takes them per row. ``steer_ld`` [L, D] decodes a steered
    model (as ``Decoder``'s ``steer_ld``), e.g. steered rollouts.
    """
    rows = [SampleRow(p, max_new_tokens, temperature, top_p, seed, i) for i, p in enumerate(prompts_ids)]
    return generate_rows(model, tokenizer, rows, eos_ids=eos_ids, lora_scale=lora_scale, steer_ld=steer_ld)


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
