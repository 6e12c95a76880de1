"""Token cross-entropy from hidden states, computed in sequence chunks.

Logits are never materialised for the whole batch: ``hidden_btd @ w_dv`` is evaluated one chunk of
``seq_chunk`` positions at a time inside ``lax.scan`` (so one fp32 [B, c, V] block is live, not [B, T, V]),
and the backward pass never reads a saved logit tensor:

* ``token_nll`` (per-token output, e.g. bulk scoring) saves only the fp32 logsumexp [B, T] and recomputes
  each chunk's logits in its ``custom_vjp`` backward.
* ``masked_ce`` (scalar output, the training loss) is *fused*: when differentiated, its forward rule
  computes each chunk's softmax gradient right after the chunk's logits and keeps only dL/dhidden
  [B, T, D] and dL/dW [D, V] (each only if that input is being differentiated); the backward rule just
  scales them by the output cotangent. Three vocabulary matmuls per chunk (logits, dh, dW), no
  recomputation, and two when ``w_dv`` is frozen (LoRA). Only positions with a nonzero weight reach
  the vocabulary (``scan_weighted``): prompt and padding chunks are skipped.

Inputs are already shifted: position t of ``hidden_btd`` predicts ``targets_bt[t]``. Logits are
accumulated in fp32 (``preferred_element_type``) and logsumexp is taken in fp32 whatever the input dtype.
Targets are clipped into [0, V) so ignore-index values such as -100 on masked positions are harmless.
These functions use ``jax.custom_vjp``: reverse-mode only (``jax.grad``/``vjp``), no ``jax.jvp``.

The chunking helpers here are shared with ``kl.py``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from emajax.losses.rows import constrain_rows

LOGITS_BUDGET_BYTES = 64 * 2**20  # default size of one chunk's fp32 logits


# ----------------------------------------------------------------------------- chunking helpers
def default_seq_chunk(batch: int, seq_len: int, vocab: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Chunk length c (positions) whose fp32 logits B*c*V*4 fit in budget_bytes, balanced over T.

    c_max = clamp(budget // (B*V*4), 1, T); n = ceil(T / c_max) chunks; c = ceil(T / n), so padding
    T up to n*c wastes less than one position per chunk (T=256, c_max=42 -> c=37, not 42 with 38 pad).
    """
    per_position = max(1, batch * vocab * 4)
    t = max(1, seq_len)
    c_max = int(max(1, min(t, budget_bytes // per_position)))
    n = -(-t // c_max)
    return int(-(-t // n))


def resolve_seq_chunk(seq_chunk: int | None, batch: int, seq_len: int, vocab: int) -> int:
    if seq_chunk is None:
        return default_seq_chunk(batch, seq_len, vocab)
    if isinstance(seq_chunk, bool) or not isinstance(seq_chunk, int) or seq_chunk < 1:
        raise ValueError(f"emajax.losses: seq_chunk must be a positive int or None, got {seq_chunk!r}")
    return int(min(seq_chunk, max(seq_len, 1)))


def to_chunks(x_bt: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [nC, B, c, ...], zero-padding T up to a multiple of c (padding carries weight 0)."""
    b, t = x_bt.shape[:2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        x_bt = jnp.pad(x_bt, [(0, 0), (0, pad)] + [(0, 0)] * (x_bt.ndim - 2))
    x = x_bt.reshape((b, n, chunk) + x_bt.shape[2:])
    return constrain_rows(jnp.moveaxis(x, 1, 0), axis=1)


def from_chunks(x_cb: jax.Array, seq_len: int) -> jax.Array:
    """[nC, B, c, ...] -> [B, T, ...] (drops the padding added by ``to_chunks``)."""
    n, b, c = x_cb.shape[:3]
    x = jnp.moveaxis(x_cb, 0, 1).reshape((b, n * c) + x_cb.shape[3:])
    return x[:, :seq_len]


def live_first(live_gn: jax.Array) -> jax.Array:
    """Per row, the indices that put the True positions first, each group in its original order."""
    return jnp.argsort(jnp.logical_not(live_gn).astype(jnp.int8), axis=1, stable=True)


def take_rows(x_gn: jax.Array, idx_gn: jax.Array) -> jax.Array:
    """``x_gn`` [G, N, ...] with each row's positions reordered by ``idx_gn`` [G, N]."""
    return jnp.take_along_axis(x_gn, idx_gn.reshape(idx_gn.shape + (1,) * (x_gn.ndim - 2)), axis=1)


def scan_weighted(body: Any, carry: Any, arrays_bt: tuple[jax.Array, ...], weights_bt: tuple[jax.Array, ...],
                  chunk: int) -> tuple[Any, Any]:
    """``lax.scan(body, carry, chunks of arrays_bt)`` over the positions that carry weight only.

    Within each row, positions with a nonzero weight in any of ``weights_bt`` are moved to the front
    (stable order), and only the chunks up to the fullest row's last such position run (a loop with a
    traced trip count: the loss functions compute their gradients in their forward rules, so nothing
    differentiates through it). Prompt and padding positions (42 % of the safe pool's tokens are
    not answers, before any padding) then cost no vocabulary products. ``body(carry, xs) -> (carry, ys)`` sees permuted positions; ys
    (e.g. dL/dh per chunk) come back as [B, T, ...] in the original order, zero where skipped. Rows
    stay whole, so a batch sharded over rows needs no communication."""
    t = arrays_bt[0].shape[1]
    live_bt = weights_bt[0] != 0
    for w in weights_bt[1:]:
        live_bt = live_bt | (w != 0)
    order_bt = live_first(live_bt)
    back_bt = jnp.argsort(order_bt, axis=1)
    xs = tuple(to_chunks(take_rows(a, order_bt), chunk) for a in arrays_bt)
    n = xs[0].shape[0]
    n_live = jnp.minimum(-(-jnp.max(jnp.sum(live_bt, axis=1)) // chunk), n)
    at = lambda i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), xs)  # noqa: E731
    y_shape = jax.eval_shape(body, carry, at(0))[1]
    ys0 = jax.tree.map(lambda sd: jnp.zeros((n,) + sd.shape, sd.dtype), y_shape)

    def step(i, state):
        c, ys = state
        c, y = body(c, at(i))
        return c, jax.tree.map(lambda acc, v: jax.lax.dynamic_update_index_in_dim(acc, v, i, 0), ys, y)

    carry, ys = jax.lax.fori_loop(0, n_live, step, (carry, ys0))
    return carry, jax.tree.map(lambda y: take_rows(from_chunks(y, t), back_bt), ys)


def chunk_logits(h_bcd: jax.Array, w_dv: jax.Array) -> jax.Array:
    """fp32 logits of one chunk: z = h W, accumulated in fp32 whatever the input dtype."""
    return constrain_rows(jnp.einsum("bcd,dv->bcv", h_bcd, w_dv, preferred_element_type=jnp.float32))


def grad_h(dz_bcv: jax.Array, w_dv: jax.Array, h_dtype: Any) -> jax.Array:
    """dL/dh = dz W^T for one chunk, matmul in the inputs' dtype with fp32 accumulation."""
    cdt = jnp.result_type(h_dtype, w_dv.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dz_bcv.astype(cdt), w_dv, preferred_element_type=jnp.float32)
    return constrain_rows(dh).astype(h_dtype)


def grad_w(h_bcd: jax.Array, dz_bcv: jax.Array) -> jax.Array:
    """dL/dW contribution h^T dz of one chunk, fp32."""
    cdt = h_bcd.dtype
    return jnp.einsum("bcd,bcv->dv", h_bcd, dz_bcv.astype(cdt), preferred_element_type=jnp.float32)


def is_zero(ct: Any) -> bool:
    return ct is None or isinstance(ct, SymbolicZero)


def check_hidden_w(hidden_btd: jax.Array, w_dv: jax.Array, where: str) -> tuple[int, int, int, int]:
    if hidden_btd.ndim != 3:
        raise ValueError(f"emajax.losses.{where}: hidden_btd must be [B, T, D], got shape {hidden_btd.shape}")
    if w_dv.ndim != 2 or w_dv.shape[0] != hidden_btd.shape[2]:
        raise ValueError(
            f"emajax.losses.{where}: w_dv must be [D, V] with D={hidden_btd.shape[2]}, got shape {w_dv.shape}"
        )
    b, t, d = hidden_btd.shape
    return b, t, d, w_dv.shape[1]


def check_bt(x_bt: jax.Array, b: int, t: int, name: str, where: str) -> None:
    if tuple(x_bt.shape) != (b, t):
        raise ValueError(f"emajax.losses.{where}: {name} must be [B, T] = [{b}, {t}], got shape {x_bt.shape}")


def mask_weights(loss_mask_bt: jax.Array, denom: Any = None) -> jax.Array:
    """Per-token weights mask / max(denom, 1) in fp32, outside the gradient; ``denom`` defaults to sum(mask).

    A ``denom`` counted over more than this batch (e.g. every micro-batch of an accumulated optimiser
    step) makes the loss that batch's share of the larger batch's token mean: summing the shares gives
    the mean over all of them, with every token weighted alike."""
    m = jax.lax.stop_gradient(loss_mask_bt).astype(jnp.float32)
    d = jnp.sum(m) if denom is None else jax.lax.stop_gradient(jnp.asarray(denom, jnp.float32))
    return m / jnp.maximum(d, 1.0)


# ----------------------------------------------------------------------------- per-chunk math
def sum_v(x_bcv: jax.Array) -> jax.Array:
    """Sum over the last (vocabulary) axis as a product with a ones vector, fp32.

    XLA:CPU runs that as a matrix-vector product, several times faster than its fused
    elementwise-and-reduce loop over a vocabulary of tens of thousands."""
    x = x_bcv.astype(jnp.float32)
    return jnp.dot(x, jnp.ones((x.shape[-1],), jnp.float32), precision=jax.lax.Precision.HIGHEST)


def logsumexp_v(z_bcv: jax.Array) -> jax.Array:
    """logsumexp over the last (vocabulary) axis, in fp32; finite inputs (logits). See :func:`sum_v`."""
    z = z_bcv.astype(jnp.float32)
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return m[..., 0] + jnp.log(sum_v(jnp.exp(z - m)))


def log_softmax_v(z_bcv: jax.Array) -> jax.Array:
    """log softmax over the last axis in fp32 (see :func:`logsumexp_v`)."""
    z = z_bcv.astype(jnp.float32)
    return z - logsumexp_v(z)[..., None]


def chunk_nll(z_bcv: jax.Array, tgt_bc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """lse = logsumexp_v z, nll = lse - z[target]; both fp32 [B, c]."""
    lse = logsumexp_v(z_bcv)
    z_t = jnp.take_along_axis(z_bcv, tgt_bc[..., None], axis=-1)[..., 0]
    return lse, lse - z_t


def softmax_minus_onehot(z_bcv: jax.Array, lse_bc: jax.Array, tgt_bc: jax.Array, g_bc: jax.Array) -> jax.Array:
    """dz = g (softmax(z) - onehot(target)): the gradient of g * nll w.r.t. the logits."""
    p = jnp.exp(z_bcv - lse_bc[..., None])
    onehot = jnp.arange(z_bcv.shape[-1], dtype=tgt_bc.dtype) == tgt_bc[..., None]
    return g_bc[..., None] * (p - onehot.astype(jnp.float32))


def _clip_targets(targets_bt: jax.Array, vocab: int) -> jax.Array:
    return jnp.clip(targets_bt.astype(jnp.int32), 0, vocab - 1)


# ----------------------------------------------------------------------------- token_nll
def _nll_scan(h_btd, w_dv, tgt_bt, chunk):
    t = h_btd.shape[1]

    def body(_, xs):
        h, tg = xs
        lse, nll = chunk_nll(chunk_logits(h, w_dv), tg)
        return None, (lse, nll)

    _, (lse_c, nll_c) = jax.lax.scan(body, None, (to_chunks(h_btd, chunk), to_chunks(tgt_bt, chunk)))
    return from_chunks(lse_c, t), from_chunks(nll_c, t)


def _token_nll_impl(h_btd, w_dv, tgt_bt, chunk):
    return _nll_scan(h_btd, w_dv, tgt_bt, chunk)[1]


_token_nll_vjp = jax.custom_vjp(_token_nll_impl, nondiff_argnums=(3,))


def _token_nll_fwd(h_btd, w_dv, tgt_bt, chunk):
    lse_bt, nll_bt = _nll_scan(h_btd, w_dv, tgt_bt, chunk)
    return nll_bt, (h_btd, w_dv, tgt_bt, lse_bt)


def _token_nll_bwd(chunk, res, g_bt):
    h_btd, w_dv, tgt_bt, lse_bt = res
    t = h_btd.shape[1]

    def body(dw, xs):
        h, tg, lse, g = xs
        dz = softmax_minus_onehot(chunk_logits(h, w_dv), lse, tg, g)  # logits recomputed, never saved
        return dw + grad_w(h, dz), grad_h(dz, w_dv, h_btd.dtype)

    xs = tuple(to_chunks(a, chunk) for a in (h_btd, tgt_bt, lse_bt, g_bt.astype(jnp.float32)))
    dw, dh_c = jax.lax.scan(body, jnp.zeros(w_dv.shape, jnp.float32), xs)
    return from_chunks(dh_c, t), dw.astype(w_dv.dtype), None


_token_nll_vjp.defvjp(_token_nll_fwd, _token_nll_bwd)


def token_nll(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, *, seq_chunk: int | None = None) -> jax.Array:
    """Per-token negative log-likelihood, fp32 [B, T].

        nll[b, t] = logsumexp_v(z[b, t, :]) - z[b, t, targets[b, t]],   z = hidden_btd @ w_dv  (fp32)

    Position t predicts targets_bt[t] (inputs already shifted). Logits are computed ``seq_chunk``
    positions at a time (default: a chunk's fp32 logits <= 64 MiB); the backward recomputes them
    per chunk from the saved fp32 logsumexp, so no [B, T, V] tensor is kept for the gradient.
    """
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, "token_nll")
    check_bt(targets_bt, b, t, "targets_bt", "token_nll")
    chunk = resolve_seq_chunk(seq_chunk, b, t, v)
    return _token_nll_vjp(hidden_btd, w_dv, _clip_targets(targets_bt, v), chunk)


# ----------------------------------------------------------------------------- masked_nll_sums
def masked_nll_sums(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array, *,
                    per_row: bool = False, chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-row sum of the NLL over masked positions and the number of them: fp32 [B], [B]. Forward only.

        sums[b] = sum_t mask[b, t] * (logsumexp_v z[b, t, :] - z[b, t, targets[b, t]]),   z = hidden @ w_dv

    Only masked positions reach the vocabulary projection: they are gathered to the front (stable order),
    the projection and log-softmax run over ``chunk`` gathered positions at a time, and chunks past the
    last masked position are skipped (``lax.cond``). Scoring answer tokens, which are ~58 % of the tokens
    of a chat pool, then pays for ~58 % of the projection instead of all of it, with static shapes (no
    recompile per answer count). ``per_row=True`` gathers within each row instead of across the batch (a
    chunk runs while any row still has masked positions): use it when the batch axis is sharded, so each
    device keeps its own rows; across the batch the skipped share is larger.
    """
    b, t, d, v = check_hidden_w(hidden_btd, w_dv, "masked_nll_sums")
    check_bt(targets_bt, b, t, "targets_bt", "masked_nll_sums")
    check_bt(mask_bt, b, t, "mask_bt", "masked_nll_sums")
    mask = mask_bt.astype(bool)
    tgt = _clip_targets(targets_bt, v)
    g, n = (b, t) if per_row else (1, b * t)  # gather within groups of n positions
    c = resolve_seq_chunk(chunk, g, n, v)
    m_gn, h_gnd, tg_gn = mask.reshape(g, n), hidden_btd.reshape(g, n, d), tgt.reshape(g, n)
    order_gn = live_first(m_gn)
    h_gnd, tg_gn, m_gn = (take_rows(x, order_gn) for x in (h_gnd, tg_gn, m_gn))
    live = jnp.max(jnp.sum(m_gn, axis=1))  # positions worth computing in the fullest group

    def body(_, xs):
        i, h, tg = xs
        nll = jax.lax.cond(i * c < live, lambda: chunk_nll(chunk_logits(h, w_dv), tg)[1],
                           lambda: jnp.zeros(tg.shape, jnp.float32))
        return None, nll

    h_c, tg_c = to_chunks(h_gnd, c), to_chunks(tg_gn, c)
    _, nll_c = jax.lax.scan(body, None, (jnp.arange(h_c.shape[0]), h_c, tg_c))
    nll_gn = jnp.where(m_gn, from_chunks(nll_c, n), 0.0)
    row_gn = (order_gn // t) if not per_row else jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    sums = jnp.zeros((b,), jnp.float32).at[row_gn.reshape(-1)].add(nll_gn.reshape(-1))
    return sums, jnp.sum(mask, axis=1).astype(jnp.float32)


# ----------------------------------------------------------------------------- masked_ce (fused)
def _ce_scan(h_btd, w_dv, tgt_bt, wt_bt, chunk, need_dh, need_dw):
    """Sum_t wt*nll over chunks; optionally also dL/dh [B,T,D] and dL/dW [D,V] of that sum."""

    def body(carry, xs):
        loss, dw = carry
        h, tg, wt = xs
        z = chunk_logits(h, w_dv)
        lse, nll = chunk_nll(z, tg)
        loss = loss + jnp.sum(wt * nll)
        dh = None
        if need_dh or need_dw:
            dz = softmax_minus_onehot(z, lse, tg, wt)
            if need_dh:
                dh = grad_h(dz, w_dv, h_btd.dtype)
            if need_dw:
                dw = dw + grad_w(h, dz)
        return (loss, dw), dh

    dw0 = jnp.zeros(w_dv.shape, jnp.float32) if need_dw else None
    (loss, dw), dh = scan_weighted(body, (jnp.zeros((), jnp.float32), dw0), (h_btd, tgt_bt, wt_bt), (wt_bt,), chunk)
    return loss, dh, dw


def scale_grads(g: Any, *grads: jax.Array | None) -> tuple[jax.Array | None, ...]:
    """Backward of a fused scalar loss: multiply each precomputed gradient by the cotangent g."""
    if is_zero(g):
        return tuple(None for _ in grads)
    return tuple(None if x is None else (g * x.astype(jnp.float32)).astype(x.dtype) for x in grads)


def fused_vjp(scan: Any, *, nondiff_argnums: tuple[int, ...], h_argnum: int = 0, w_argnum: int = 1,
              cotangents: Any = lambda g: (g,)) -> Any:
    """``jax.custom_vjp`` of a loss whose gradients its forward pass computes (chunk by chunk, never holding
    the logits): ``scan(*args, need_dh=, need_dw=) -> (out, dhs, dws)`` returns the outputs and, as asked,
    per differentiated output the gradient w.r.t. the hidden states (argument ``h_argnum``) and the output
    matrix (``w_argnum``), tuples in the order of ``cotangents(g)`` (g: the outputs' cotangent). The
    backward scales each by its cotangent and sums them; every other argument gets no gradient, so no rule
    spells out a tuple of ``None`` per argument. ``nondiff_argnums`` are static (hashable) arguments."""
    import inspect

    names = [n for n in inspect.signature(scan).parameters if n not in ("need_dh", "need_dw")]
    diff = [i for i in range(len(names)) if i not in nondiff_argnums]

    def impl(*args):
        return scan(*args, need_dh=False, need_dw=False)[0]

    def fwd(*args):
        primal = [a.value if i in diff else a for i, a in enumerate(args)]
        out, dhs, dws = scan(*primal, need_dh=args[h_argnum].perturbed, need_dw=args[w_argnum].perturbed)
        w_dtype = primal[w_argnum].dtype
        return out, (tuple(dhs), tuple(None if d is None else d.astype(w_dtype) for d in dws))

    def add(a, b):
        return a if b is None else b if a is None else a + b

    def bwd(*rest):
        (dhs, dws), g = rest[-2], rest[-1]
        dh = dw = None
        for g_i, dh_i, dw_i in zip(cotangents(g), dhs, dws):
            dh_i, dw_i = scale_grads(g_i, dh_i, dw_i)
            dh, dw = add(dh, dh_i), add(dw, dw_i)
        return tuple(dh if i == h_argnum else dw if i == w_argnum else None for i in diff)

    f = jax.custom_vjp(impl, nondiff_argnums=nondiff_argnums)
    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def _weighted_ce(h_btd, w_dv, tgt_bt, wt_bt, chunk, *, need_dh, need_dw):
    loss, dh, dw = _ce_scan(h_btd, w_dv, tgt_bt, wt_bt, chunk, need_dh, need_dw)
    return loss, (dh,), (dw,)


_weighted_ce_vjp = fused_vjp(_weighted_ce, nondiff_argnums=(4,))


def masked_ce(
    hidden_btd: jax.Array,
    w_dv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    *,
    seq_chunk: int | None = None,
    denom: jax.Array | float | None = None,
) -> jax.Array:
    """Answer-masked mean token cross-entropy, fp32 scalar.

        ce = sum_{b,t} m[b,t] * nll[b,t] / max(N, 1),   N = denom, default sum_{b,t} m[b,t]

    with nll as in ``token_nll`` and m = loss_mask_bt (1 where the target is an answer token). ``denom``
    (no gradient) is the answer-token count of a larger batch this one is part of (gradient
    accumulation): the micro-batches' values then sum to that batch's token mean. The
    gradient is computed in the forward pass chunk by chunk (fused), only for the inputs being
    differentiated; no [B, T, V] tensor is stored. The mask gets no gradient.
    """
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, "masked_ce")
    check_bt(targets_bt, b, t, "targets_bt", "masked_ce")
    check_bt(loss_mask_bt, b, t, "loss_mask_bt", "masked_ce")
    chunk = resolve_seq_chunk(seq_chunk, b, t, v)
    return _weighted_ce_vjp(hidden_btd, w_dv, _clip_targets(targets_bt, v), mask_weights(loss_mask_bt, denom), chunk)
