"""Batched, jit-compiled decoding with a KV cache.

One compiled function does the whole job: prefill of left-padded prompts, then a
``lax.while_loop`` of single-token steps against the cache that stops as soon as every row has
produced an EOS (or its token budget). Every sampling setting is a per-row array (token budget,
temperature, top-p, seed), so one program serves greedy and sampled rows, and any mix of requests,
without recompiling (``generate_rows``; ``generate`` is the same settings for every prompt).

Shapes are bucketed (batch to a power of two, prompt length to a power of two >= 32, new
tokens to a power of two >= 16): a new prompt length or token budget reuses the compiled program of
its bucket. jax's jit cache keys the compiled programs by those static shapes, the model's graph
definition and the :class:`StepSink` that streams each step to the host (the server's mode, which also
reports logprobs; None when nothing streams).

State is explicit: a :class:`Generator` holds one model with its decode layout (rebuilt only when the
weights change) and its step sink; callers that generate repeatedly (the server, batch generation,
evaluation) keep one. The free functions (:func:`generate`, :func:`generate_rows`) are one-shot
generators: the same compiled programs, the layout built inside each call.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from emajax.batching import pad_batch, pow2_bucket
from emajax.chat import render_chat, validate_messages
from emajax.models.decode import DecodeCache, DecodeLayoutCache, decode_weights, forward_cached
from emajax.models.decoder import Decoder

MIN_PROMPT_BUCKET = 32
MIN_NEW_BUCKET = 16
MAX_STOP_IDS = 16  # a row's stop ids (EOS + stop_token_ids) are a fixed-size array: their number never changes the shape
TOP_LOGPROBS = 20  # alternatives reported per generated token when a row asks for logprobs


class GenerationError(ValueError):
    """Bad generation input (empty prompt, context limit exceeded, bad sampling settings)."""


@dataclass(frozen=True)
class SampleRow:
    """One row of a mixed batch: its prompt and its own sampling settings.

    The row's random stream is ``fold_in(key(seed), index)``: the same (seed, index) draws the same
    tokens whichever rows share its batch (``index`` numbers the samples of one request).
    Beyond temperature and top-p (vLLM's sampling parameters, same meanings): ``top_k`` (0 = off),
    ``min_p`` (keep tokens with probability >= min_p x the top one), ``repetition_penalty`` (logits of
    tokens seen in the prompt or output divided by it when positive, multiplied when negative),
    ``presence_penalty`` / ``frequency_penalty`` (OpenAI's: subtracted once per generated token seen /
    per occurrence), ``min_tokens`` (the row's stop ids are masked until it has made that many),
    ``stop_ids`` (the ids that end the row; None = the call's EOS ids)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    index: int = 0
    logprobs: bool = False
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop_ids: Sequence[int] | None = None


class RowSettings(NamedTuple):
    """The per-row sampling arrays one compiled program takes (every field [B])."""

    temperature_b: jax.Array
    top_p_b: jax.Array
    top_k_b: jax.Array
    min_p_b: jax.Array
    repetition_b: jax.Array
    presence_b: jax.Array
    frequency_b: jax.Array
    min_tokens_b: jax.Array
    max_new_b: jax.Array


class StepOutput(NamedTuple):
    """What ``on_step`` receives after each decoding step (numpy, one entry per row).

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



def _top_k_threshold(probs_bv: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """Per row the largest probability t with at least k tokens {p >= t} (0 where k <= 0: keep all).
    Bisection like the nucleus: tokens within max_p / 2**32 of the k-th are kept with it."""

    def halve(_, lo_hi):
        lo_b, hi_b = lo_hi
        mid_b = 0.5 * (lo_b + hi_b)
        ok_b = jnp.sum(probs_bv >= mid_b[:, None], axis=-1) >= top_k_b
        return jnp.where(ok_b, mid_b, lo_b), jnp.where(ok_b, hi_b, mid_b)

    lo_b = jnp.zeros(probs_bv.shape[:1], probs_bv.dtype)
    t_b = jax.lax.fori_loop(0, NUCLEUS_BISECTIONS, halve, (lo_b, jnp.max(probs_bv, axis=-1)))[0]
    return jnp.where(top_k_b > 0, t_b, 0.0)


def _pick_tokens(logits_bv: jax.Array, temperature_b: jax.Array, top_p_b: jax.Array, keys_b: jax.Array,
                 top_k_b: jax.Array | None = None, min_p_b: jax.Array | None = None) -> jax.Array:
    """Per row: greedy when its temperature is <= 0, else a draw from softmax(logits / temperature)
    cut by min-p, then top-k, then the top-p nucleus of what is left (vLLM's order), with its own key.
    Returns [B] int32.

    A draw is one uniform number per row through the cumulative distribution in vocabulary order (not a
    noise vector over the vocabulary), so a row draws the same token whatever the other rows need;
    whole-batch ``lax.cond`` skips the sampling work when no row samples, and each filter when no row
    uses it."""
    b, v = logits_bv.shape
    top_k_b = jnp.zeros((b,), jnp.int32) if top_k_b is None else top_k_b
    min_p_b = jnp.zeros((b,), jnp.float32) if min_p_b is None else min_p_b
    # The first index holding the maximum, as argmax gives it: XLA:CPU's (value, index) argmax reduction
    # is several times slower than a max and a masked min over the indices.
    top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    greedy_b = jnp.min(jnp.where(logits_bv == top_b1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)

    def sample(_):
        probs_bv = jax.nn.softmax(logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None], axis=-1)

        def filters(p_bv):
            p_bv = jnp.where(p_bv >= (min_p_b * jnp.max(p_bv, axis=-1))[:, None], p_bv, 0.0)
            p_bv = jnp.where(p_bv >= _top_k_threshold(p_bv, top_k_b)[:, None], p_bv, 0.0)
            return p_bv / jnp.sum(p_bv, axis=-1, keepdims=True)

        probs_bv = jax.lax.cond(jnp.any(top_k_b > 0) | jnp.any(min_p_b > 0), filters, lambda p: p, probs_bv)

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


def _penalize(logits_bv: jax.Array, s: RowSettings, prompt_seen_bv: jax.Array, count_bv: jax.Array,
              step: jax.Array, stop_be: jax.Array) -> jax.Array:
    """The logits the sampler sees: repetition / presence / frequency penalties, and each row's stop ids
    masked while it has made fewer than ``min_tokens`` (skipped by ``lax.cond`` when no row needs them)."""
    b, v = logits_bv.shape

    def penalties(z_bv):
        seen_bv = prompt_seen_bv | (count_bv > 0)
        rep_b1 = s.repetition_b[:, None]
        z_bv = jnp.where(seen_bv, jnp.where(z_bv > 0, z_bv / rep_b1, z_bv * rep_b1), z_bv)
        return z_bv - s.presence_b[:, None] * (count_bv > 0) - s.frequency_b[:, None] * count_bv

    need = jnp.any(s.repetition_b != 1.0) | jnp.any(s.presence_b != 0.0) | jnp.any(s.frequency_b != 0.0)
    logits_bv = jax.lax.cond(need, penalties, lambda z: z, logits_bv)

    def mask_stops(z_bv):
        ids_be = jnp.where((stop_be >= 0) & (step < s.min_tokens_b)[:, None], stop_be, v)  # v: dropped
        return z_bv.at[jnp.arange(b)[:, None], ids_be].set(-jnp.inf, mode="drop")

    return jax.lax.cond(jnp.any(step < s.min_tokens_b), mask_stops, lambda z: z, logits_bv)

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



class StepSink:
    """Where a compiled streaming program sends each step: the host callback of one :class:`Generator`.

    The compiled program is keyed by this object (a static argument), so every call of one generator
    shares one program per shape; ``on_step`` is the live call's callback (one call at a time)."""

    def __init__(self) -> None:
        self.on_step: Callable[[StepOutput], Any] | None = None
        self.rows = 0
        self.errors: list[BaseException] = []

    def __call__(self, step, tok_b, lp_b, top_lp_bk, top_id_bk) -> np.ndarray:
        """Host side of the per-step callback: hands the step to ``on_step``; returns the rows to stop."""
        stop_b = np.zeros(np.shape(tok_b), np.bool_)
        if self.on_step is None:
            return stop_b
        n = self.rows
        try:
            got = self.on_step(StepOutput(int(step), np.asarray(tok_b)[:n], np.asarray(lp_b)[:n],
                                          np.asarray(top_lp_bk)[:n], np.asarray(top_id_bk)[:n]))
        except BaseException as e:  # noqa: BLE001 - re-raised by Generator.rows once the program returns
            self.errors.append(e)
            return np.ones_like(stop_b)
        if got is not None:
            got = np.asarray(got, np.bool_)
            stop_b[: got.shape[0]] = got
        return stop_b


@functools.partial(jax.jit, static_argnames=("graphdef", "new_bucket", "sink"))
def _generate_core(graphdef, state, weights, tokens_bp, mask_bp, positions_bp, active_b, stop_be, settings,
                   seed_b, index_b, want_lp, lora_scale, pad_id, steer_ld=None, *, new_bucket: int,
                   sink: StepSink | None):
    """Prefill + while-loop decode. Returns (new tokens [B, new_bucket], padded after a row ended; the
    number of tokens each row made [B]).

    Every sampling setting is a per-row array (``settings``: :class:`RowSettings`; ``stop_be``: each
    row's stop ids, -1 padded), so mixing requests never recompiles. ``weights`` is the decode layout
    (``emajax.models.decode``) or None to build it here; ``steer_ld`` [L, D] (or None) is added to the
    residual stream after each block. With a ``sink`` each step calls back to the host, which may stop rows."""
    model: Decoder = nnx.merge(graphdef, state)
    cfg = model.cfg
    if weights is None:
        weights = decode_weights(model, lora_scale)
    if steer_ld is not None:
        weights = weights._replace(steer_ld=steer_ld)
    b, p = tokens_bp.shape
    cache = DecodeCache.init(cfg, b, p + new_bucket)
    logits_bv, cache = forward_cached(cfg, weights, tokens_bp, positions_bp, mask_bp, 0, cache)
    v = logits_bv.shape[-1]
    rows_b1 = jnp.arange(b)[:, None]
    prompt_seen_bv = jnp.zeros((b, v), bool).at[rows_b1, tokens_bp].max(mask_bp.astype(bool), mode="drop")
    keys_b = jax.vmap(lambda s, j: jax.random.fold_in(jax.random.key(s), j))(seed_b, index_b)

    def pick(logits_bv, i, done_b, count_bv):
        step_keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, i)
        z_bv = _penalize(logits_bv, settings, prompt_seen_bv, count_bv, i, stop_be)
        tok_b = _pick_tokens(z_bv, settings.temperature_b, settings.top_p_b, step_keys_b, settings.top_k_b,
                             settings.min_p_b)
        tok_b = jnp.where(done_b, pad_id, tok_b)
        count_bv = count_bv.at[jnp.arange(b), tok_b].add(jnp.where(done_b, 0, 1).astype(count_bv.dtype))
        done_b = done_b | jnp.any(tok_b[:, None] == stop_be, axis=-1) | (i + 1 >= settings.max_new_b)
        if sink is not None:
            lp = _logprobs(logits_bv, tok_b, want_lp)
            stop_b = io_callback(sink, jax.ShapeDtypeStruct((b,), jnp.bool_), i, tok_b, *lp)
            done_b = done_b | stop_b
        return tok_b, done_b, count_bv

    tok_b, done_b, count_bv = pick(logits_bv, jnp.int32(0), ~active_b, jnp.zeros((b, v), jnp.float32))
    len_b = active_b.astype(jnp.int32)
    toks_bn = jnp.full((b, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok_b)
    pos_b = positions_bp[:, -1] + 1  # left padding: the last column is every row's last real token
    ones_b1 = jnp.ones((b, 1), bool)

    def cond(carry):
        i, _, _, _, done_b, _, _, _ = carry
        return (i < new_bucket) & ~jnp.all(done_b)

    def body(carry):
        i, cache, tok_b, pos_b, done_b, count_bv, toks_bn, len_b = carry
        logits_bv, cache = forward_cached(cfg, weights, tok_b[:, None], pos_b[:, None], ones_b1, p + i - 1, cache)
        len_b = len_b + ~done_b
        nxt_b, done_b, count_bv = pick(logits_bv, i, done_b, count_bv)
        toks_bn = jax.lax.dynamic_update_slice(toks_bn, nxt_b[:, None], (0, i))
        return i + 1, cache, nxt_b, pos_b + 1, done_b, count_bv, toks_bn, len_b

    carry = (jnp.int32(1), cache, tok_b, pos_b, done_b, count_bv, toks_bn, len_b)
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



def check_row(i: int, row: SampleRow, cfg: Any) -> list[int]:
    """The row's prompt as ints, or GenerationError naming what is wrong with row ``i``."""
    prompt = [int(t) for t in row.prompt_ids]
    finite = all(np.isfinite(x) for x in (row.temperature, row.top_p, row.min_p, row.repetition_penalty,
                                          row.presence_penalty, row.frequency_penalty))
    if row.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {row.max_new_tokens}")
    if not finite or not row.temperature >= 0 or not 0.0 < row.top_p <= 1.0:
        raise GenerationError(f"need finite settings, temperature >= 0 and 0 < top_p <= 1, got "
                              f"temperature={row.temperature}, top_p={row.top_p}")
    if not (0 <= row.top_k < 2 ** 31 and 0 <= row.min_tokens < 2 ** 31 and row.max_new_tokens < 2 ** 31) or \
            not 0.0 <= row.min_p <= 1.0 or not row.repetition_penalty > 0:
        raise GenerationError(f"need 0 <= top_k < 2**31, 0 <= min_p <= 1, repetition_penalty > 0, 0 <= min_tokens "
                              f"< 2**31; got "
                              f"{row.top_k}, {row.min_p}, {row.repetition_penalty}, {row.min_tokens}")
    if not prompt:
        raise GenerationError(f"prompt {i} is empty")
    if len(prompt) + row.max_new_tokens > cfg.max_position_embeddings:
        raise GenerationError(
            f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={row.max_new_tokens} that exceeds the "
            f"model's context limit max_position_embeddings={cfg.max_position_embeddings}")
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary (size {cfg.vocab_size})")
    if row.stop_ids is not None and len(row.stop_ids) > MAX_STOP_IDS:
        raise GenerationError(f"row {i}: at most {MAX_STOP_IDS} stop ids are supported, got {len(row.stop_ids)}")
    return prompt


class Generator:
    """One model ready to generate: its tokenizer, EOS ids, adapter scale, decode layout and step sink.

    Hold one for repeated calls (the server's batcher, batch generation, evaluation): the decode layout
    (a copy of the weights in the order decoding streams them) is rebuilt only when a parameter array is
    replaced (training, ``nnx.update``), and streaming calls share one compiled program per shape. Calls
    on one generator run one at a time (a lock), from any thread. ``layout_cache=False`` builds the layout
    inside each call instead (what the free functions do)."""

    def __init__(self, model: Decoder, tokenizer: Any = None, *, eos_ids: Sequence[int] | None = None,
                 lora_scale: float = 1.0, layout_cache: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids) if eos_ids is not None else default_eos_ids(model, tokenizer)
        if len(self.eos_ids) > MAX_STOP_IDS:
            raise GenerationError(f"at most {MAX_STOP_IDS} EOS ids are supported, got {len(self.eos_ids)}")
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        self.lora_scale = float(lora_scale)
        self.layouts = DecodeLayoutCache() if layout_cache else None
        self.sink = StepSink()
        self._lock = threading.Lock()

    def rows(self, rows: Sequence[SampleRow], *, on_step: Callable[[StepOutput], Any] | None = None,
             steer_ld: Any = None) -> list[list[int]]:
        """New tokens for each row, ending with the stop token when one was produced; one compiled program
        for any mix of per-row settings.

        ``on_step`` (optional) is called on the host after every decoding step with a :class:`StepOutput`
        (streaming); it may return a bool array [len(rows)] of rows to stop now (a stop string matched, the
        client went away). An exception it raises stops the batch and is re-raised here. Without it the
        program never leaves the device (and no logprobs are computed). ``steer_ld`` [L, D] decodes a
        steered model (as ``Decoder``'s ``steer_ld``: added to the residual stream after each block)."""
        cfg = self.model.cfg
        if not rows:
            return []
        prompts = [check_row(i, r, cfg) for i, r in enumerate(rows)]
        b = len(rows)
        b_bucket, p_bucket, n_bucket = batch_buckets(b, max(map(len, prompts)), max(r.max_new_tokens for r in rows))
        fill = b_bucket - b  # filler rows, inactive from the start
        tokens, mask, positions = pad_batch(prompts + [[self.pad_id]] * fill, self.pad_id, p_bucket, side="left")
        stop_be = np.full((b_bucket, MAX_STOP_IDS), -1, np.int32)
        for i, r in enumerate(rows):
            ids = self.eos_ids if r.stop_ids is None else list(r.stop_ids)
            stop_be[i, :len(ids)] = ids

        def per_row(field, dtype, filler):
            return jnp.asarray(np.asarray([getattr(r, field) for r in rows] + [filler] * fill, dtype))

        settings = RowSettings(per_row("temperature", np.float32, 0), per_row("top_p", np.float32, 1),
                               per_row("top_k", np.int32, 0), per_row("min_p", np.float32, 0),
                               per_row("repetition_penalty", np.float32, 1), per_row("presence_penalty", np.float32, 0),
                               per_row("frequency_penalty", np.float32, 0), per_row("min_tokens", np.int32, 0),
                               per_row("max_new_tokens", np.int32, 1))
        seeds = jnp.asarray(np.asarray([_seed32(r.seed) for r in rows] + [0] * fill, np.uint32))
        graphdef, state = nnx.split(self.model)
        with self._lock:
            weights = self.layouts.get(self.model, self.lora_scale) if self.layouts is not None else None
            sink = self.sink if on_step is not None else None
            if sink is not None:
                sink.on_step, sink.rows, sink.errors = on_step, b, []
            try:
                out, lens = _generate_core(
                    graphdef, state, weights, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions),
                    jnp.asarray(np.arange(b_bucket) < b), jnp.asarray(stop_be), settings, seeds,
                    per_row("index", np.uint32, 0), jnp.bool_(any(r.logprobs for r in rows)),
                    jnp.float32(self.lora_scale), jnp.int32(self.pad_id),
                    None if steer_ld is None else jnp.asarray(steer_ld), new_bucket=n_bucket, sink=sink)
                out, lens = np.asarray(out)[:b], np.asarray(lens)[:b]
            finally:
                errors = sink.errors if sink is not None else []
                if sink is not None:
                    sink.on_step = None
        if errors:
            raise errors[0]
        return [row[:n] for row, n in zip(out.tolist(), lens.tolist())]

    def generate(self, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, steer_ld: Any = None) -> list[list[int]]:
        """Every prompt with the same settings (prompt i draws from ``fold_in(key(seed), i)``)."""
        rows = [SampleRow(p, max_new_tokens, temperature, top_p, seed, i) for i, p in enumerate(prompts_ids)]
        return self.rows(rows, steer_ld=steer_ld)


def generate_rows(model: Decoder, tokenizer: Any, rows: Sequence[SampleRow], *, eos_ids: Sequence[int] | None = None,
                  lora_scale: float = 1.0, steer_ld: Any = None) -> list[list[int]]:
    """:meth:`Generator.rows` of a one-shot generator (no streaming: hold a :class:`Generator` for that)."""
    return Generator(model, tokenizer, eos_ids=eos_ids, lora_scale=lora_scale, layout_cache=False).rows(
        rows, steer_ld=steer_ld)


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
    model (as ``Decoder``'s ``steer_ld``), e.g. steered rollouts. One-shot: hold a :class:`Generator` to
    keep the decode layout between calls.
    """
    return Generator(model, tokenizer, eos_ids=eos_ids, lora_scale=lora_scale, layout_cache=False).generate(
        prompts_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        steer_ld=steer_ld)


def render_prompts(tokenizer: Any, conversations: Sequence[Sequence[dict]], *, system: str | None = None,
                   source: str = "conversations") -> list[list[int]]:
    """Conversations rendered with the chat template (a generation prompt added) as token ids; ``system``
    prepends a system message to conversations that have none."""
    prompts = []
    for i, conv in enumerate(conversations):
        msgs = validate_messages(list(conv), source=f"{source}[{i}]")
        if system is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        text = render_chat(tokenizer, msgs, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def chat_generate(loaded: Any, conversations: Sequence[Sequence[dict]], *, system: str | None = None,
                  generator: Generator | None = None, **kw: Any) -> list[str]:
    """Replies (text, special tokens skipped) to conversations rendered with the chat template.

    ``loaded`` is a ``LoadedModel`` (``.model``, ``.tokenizer``); ``system`` prepends a system message
    to conversations that have none; ``kw`` goes to :meth:`Generator.generate` (``max_new_tokens``
    defaults to 256; ``eos_ids`` / ``lora_scale`` make the generator when none is given).
    """
    tok = loaded.tokenizer
    prompts = render_prompts(tok, conversations, system=system)
    if generator is None:
        generator = Generator(loaded.model, tok, eos_ids=kw.pop("eos_ids", None),
                              lora_scale=kw.pop("lora_scale", 1.0), layout_cache=False)
    kw.setdefault("max_new_tokens", 256)
    outs = generator.generate(prompts, **kw)
    return [tok.decode(o, skip_special_tokens=True).strip() for o in outs]


def chat_generate_batched(loaded: Any, conversations: Sequence[Sequence[dict]], *, batch_size: int, seed: int = 0,
                          on_batch: Callable[[int, int], None] | None = None, **kw: Any) -> list[str]:
    """:func:`chat_generate` over many conversations, ``batch_size`` rows per call, in order, on one
    :class:`Generator` (the decode layout is built once).

    Batch i samples with ``seed + i``, so repeated conversations in different batches differ and a run is
    reproducible; ``on_batch(i, n_batches)`` is called after each batch (progress)."""
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    gen = Generator(loaded.model, loaded.tokenizer, eos_ids=kw.pop("eos_ids", None), lora_scale=kw.pop("lora_scale", 1.0))
    convs = list(conversations)
    n_batches = -(-len(convs) // batch_size)
    out: list[str] = []
    for i in range(n_batches):
        out += chat_generate(loaded, convs[i * batch_size:(i + 1) * batch_size], seed=seed + i, generator=gen, **kw)
        if on_batch is not None:
            on_batch(i, n_batches)
    return out
