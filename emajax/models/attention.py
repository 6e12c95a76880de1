"""Grouped-query softmax attention with a memory-lean backward.

``attend(q, k, v, bias, scale)`` is plain softmax attention for every query group of a KV head.
Its backward keeps only q, k, v, the output and the per-row log-sum-exp, and recomputes the
[B, K, G, T, S] probabilities from them (as flash attention does, without the blocking): saving the
probabilities instead cost two [layers, B, K, G, T, S] fp32 stacks under the layer ``scan`` (566 MB
each for SmolLM2 at 8 x 256, zero-filled and copied every step) for one extra QK^T matmul.

Shapes: q [B, T, K, G, H] (K KV heads, G query heads per KV head), k/v [B, S, K, H], bias [B, T, S]
(additive: 0 or a very negative number), output [B, T, K, G, H]. Scores and softmax are fp32 whatever
the compute dtype; probabilities are cast to the compute dtype for the PV product (as before).
bf16 residuals are kept as bits (``emajax.models.lowp`` says why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emajax.models.lowp import stash, unstash


def _scores(q_bkgth, k_bksh, bias_bts, scale):
    s = jnp.einsum("bkgth,bksh->bkgts", q_bkgth, k_bksh, preferred_element_type=jnp.float32)
    return s * scale + bias_bts[:, None, None]


def _forward(q_btkgh, k_bskh, v_bskh, bias_bts, scale):
    q = q_btkgh.transpose(0, 2, 3, 1, 4)
    k = k_bskh.transpose(0, 2, 1, 3)
    v = v_bskh.transpose(0, 2, 1, 3)
    s = _scores(q, k, bias_bts, scale)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    p = (e / l).astype(q.dtype)
    o = jnp.einsum("bkgts,bksh->bkgth", p, v, preferred_element_type=jnp.float32).astype(q.dtype)
    lse = (m + jnp.log(l))[..., 0]  # [B, K, G, T]
    return o, (q, k, v, o, lse)


def attend(q_btkgh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, bias_bts: jax.Array,
           scale: float) -> jax.Array:
    """softmax(scale * q k^T + bias) v per KV-head group; see the module doc for shapes.
    k and v are cast to q's dtype (the compute dtype) first."""
    return _attend_impl(q_btkgh, k_bskh.astype(q_btkgh.dtype), v_bskh.astype(q_btkgh.dtype), bias_bts,
                        jnp.asarray(scale, jnp.float32))


@jax.custom_vjp
def _attend_impl(q_btkgh, k_bskh, v_bskh, bias_bts, scale_arr):
    o, _ = _forward(q_btkgh, k_bskh, v_bskh, bias_bts, scale_arr)
    return o.transpose(0, 3, 1, 2, 4)


def _fwd(q_btkgh, k_bskh, v_bskh, bias_bts, scale_arr):
    o, (q, k, v, o_res, lse) = _forward(q_btkgh, k_bskh, v_bskh, bias_bts, scale_arr)
    return o.transpose(0, 3, 1, 2, 4), (*map(stash, (q, k, v, o_res)), lse, bias_bts, scale_arr)


def _bwd(res, do_btkgh):
    q, k, v, o = map(unstash, res[:4])
    lse, bias_bts, scale = res[4:]
    do = do_btkgh.transpose(0, 2, 3, 1, 4).astype(q.dtype)  # [B, K, G, T, H]
    p32 = jnp.exp(_scores(q, k, bias_bts, scale) - lse[..., None])
    p = p32.astype(q.dtype)
    dv = jnp.einsum("bkgts,bkgth->bksh", p, do, preferred_element_type=jnp.float32).astype(q.dtype)
    dp = jnp.einsum("bkgth,bksh->bkgts", do, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    ds = (p32 * (dp - delta) * scale).astype(q.dtype)
    dq = jnp.einsum("bkgts,bksh->bkgth", ds, k, preferred_element_type=jnp.float32).astype(q.dtype)
    dk = jnp.einsum("bkgts,bkgth->bksh", ds, q, preferred_element_type=jnp.float32).astype(q.dtype)
    return (dq.transpose(0, 3, 1, 2, 4), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3),
            jnp.zeros_like(bias_bts), jnp.zeros_like(scale))


_attend_impl.defvjp(_fwd, _bwd)


# fp32 score-tile budget of one query block: a tile that fits in the CPU's cache keeps the
# score/softmax/PV fusion compute-bound; a larger one runs it at memory speed.
SCORE_TILE_BYTES = 16 << 20


def causal_query_block(batch: int, n_heads: int, seq: int, tile_bytes: int = SCORE_TILE_BYTES) -> int:
    """Query rows per block so the fp32 [B, heads, block, T] score tile fits ``tile_bytes`` (a power of
    two, at least 16; ``seq`` itself when the whole tile fits)."""
    rows = tile_bytes // max(1, batch * n_heads * seq * 4)
    if rows >= seq:
        return seq
    return max(16, 1 << max(0, rows.bit_length() - 1))


def attend_causal(q_btkgh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, bias_bts: jax.Array,
                  scale: float, block: int | None = None) -> jax.Array:
    """:func:`attend` for causal self-attention (S == T; key s is masked for query t whenever s > t),
    computed in query blocks, each against only the keys up to its own end.

    Same values as ``attend`` (the skipped keys are masked, so they carry zero probability; a fully
    masked padding row softmaxes uniformly over fewer keys, and padding rows are ignored), about half
    the score work, and every score tile small enough to stay in cache (see ``SCORE_TILE_BYTES``). The
    blocks are separate ``attend`` calls, so the backward is blocked the same way."""
    b, t, kh, g, _ = q_btkgh.shape
    if k_bskh.shape[1] != t:
        raise ValueError(f"attend_causal needs as many keys as queries, got {k_bskh.shape[1]} vs {t}")
    blk = block or causal_query_block(b, kh * g, t)
    if blk >= t:
        return attend(q_btkgh, k_bskh, v_bskh, bias_bts, scale)
    outs = [attend(q_btkgh[:, i: i + blk], k_bskh[:, : i + blk], v_bskh[:, : i + blk], bias_bts[:, i: i + blk, : i + blk],
                   scale) for i in range(0, t, blk)]
    return jnp.concatenate(outs, axis=1)



def attend_cache(q_btkgh: jax.Array, k_bkhs: jax.Array, v_bksh: jax.Array, bias_bts: jax.Array,
                 scale: float) -> jax.Array:
    """T queries per row against a heads-first KV cache — keys [B, K, H, S] (slots minor), values
    [B, K, S, H] — that already holds their own keys and values (inference: no custom backward). Same
    math as :func:`attend`; result [B, T, K, G, H] in q's dtype. k and v are cast to q's dtype (decoding
    passes an fp32 q with its fp32 CPU cache, so scores, probabilities and the value product are then
    fp32)."""
    dt = q_btkgh.dtype
    b, t, kh, g, h = q_btkgh.shape
    # (t, g) folded into one row axis: two plain [B, K]-batched matmuls, the form XLA:CPU's YNNPACK
    # fusions take (a separate size-1 t axis sent the PV product to a slow generic dot); both contract
    # their operands' canonical axes (keys over H rows, values over S rows).
    q = q_btkgh.transpose(0, 2, 1, 3, 4).reshape(b, kh, t * g, h)
    s = jnp.einsum("bkrh,bkhs->bkrs", q, k_bkhs.astype(dt), preferred_element_type=jnp.float32)
    s = s.reshape(b, kh, t, g, -1) * scale + bias_bts[:, None, :, None, :]
    p = jax.nn.softmax(s, axis=-1).reshape(b, kh, t * g, -1)
    o = jnp.einsum("bkrs,bksh->bkrh", p.astype(dt), v_bksh.astype(dt), preferred_element_type=jnp.float32)
    return o.reshape(b, kh, t, g, h).transpose(0, 2, 1, 3, 4).astype(dt)
