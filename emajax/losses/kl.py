"""Per-token KL between the trained and reference next-token distributions, in sequence chunks.

Both models' logits are computed one chunk of positions at a time from their hidden states and output
projections, so at most one chunk of each ([B, c, V] fp32) is live — never two full [B, T, V] tensors.
The loss is scalar, so its gradient is fused into the forward rule of a ``custom_vjp``: each chunk's
logit gradient is turned into dL/dhidden (and dL/dW when the output projection is trained) right away,
and the backward rule only scales them. The reference side is constant: ``stop_gradient`` on its
inputs and no cotangent for them (the KL-to-reference defense never trains the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emajax.losses.ce import (
    check_bt,
    check_hidden_w,
    chunk_logits,
    chunk_nll,
    log_softmax_v,
    grad_h,
    grad_w,
    mask_weights,
    resolve_seq_chunk,
    fused_vjp,
    scan_weighted,
    softmax_minus_onehot,
)


def _chunk_kl(z_bcv, zr_bcv, reverse: bool, want_grad: bool, lse_z_bc=None):
    """Per-token KL [B, c] and, if wanted, its gradient w.r.t. the trained logits z [B, c, V] (fp32).

    forward  KL(p||q) = sum_v p (log p - log q);  d/dz_j = p_j (log p_j - log q_j - KL)
    reverse  KL(q||p) = sum_v q (log q - log p);  d/dz_j = p_j - q_j
    with p = softmax(z) (trained), q = softmax(zr) (reference). ``lse_z_bc``: logsumexp of z when the
    caller has it already (CE + KL share it).
    """
    logp = log_softmax_v(z_bcv) if lse_z_bc is None else z_bcv - lse_z_bc[..., None]
    logq = log_softmax_v(zr_bcv)  # the same function on both sides: KL(p || p) is exactly 0
    p = jnp.exp(logp)
    diff = logp - logq
    if reverse:
        q = jnp.exp(logq)
        kl = -jnp.sum(q * diff, axis=-1)
        dz = (p - q) if want_grad else None
    else:
        kl = jnp.sum(p * diff, axis=-1)
        dz = p * (diff - kl[..., None]) if want_grad else None
    return kl, dz


def _kl_scan(h_btd, rh_btd, w_dv, rw_dv, wt_bt, reverse, chunk, need_dh, need_dw):
    want_grad = need_dh or need_dw

    def body(carry, xs):
        loss, dw = carry
        h, rh, wt = xs
        kl, dz = _chunk_kl(chunk_logits(h, w_dv), chunk_logits(rh, rw_dv), reverse, want_grad)
        loss = loss + jnp.sum(wt * kl)
        dh = None
        if want_grad:
            dz = wt[..., None] * dz
            if need_dh:
                dh = grad_h(dz, w_dv, h_btd.dtype)
            if need_dw:
                dw = dw + grad_w(h, dz)
        return (loss, dw), dh

    dw0 = jnp.zeros(w_dv.shape, jnp.float32) if need_dw else None
    (loss, dw), dh = scan_weighted(body, (jnp.zeros((), jnp.float32), dw0), (h_btd, rh_btd, wt_bt), (wt_bt,), chunk)
    return loss, dh, dw


def _weighted_kl(h, rh, w, rw, wt, reverse, chunk, *, need_dh, need_dw):
    loss, dh, dw = _kl_scan(h, rh, w, rw, wt, reverse, chunk, need_dh, need_dw)
    return loss, (dh,), (dw,)


_weighted_kl_vjp = fused_vjp(_weighted_kl, nondiff_argnums=(5, 6), w_argnum=2)


def token_kl(
    hidden_btd: jax.Array,
    ref_hidden_btd: jax.Array,
    w_dv: jax.Array,
    ref_w_dv: jax.Array,
    loss_mask_bt: jax.Array,
    *,
    reverse: bool = False,
    seq_chunk: int | None = None,
    denom: jax.Array | float | None = None,
) -> jax.Array:
    """Masked mean per-token KL to the reference model, fp32 scalar.

        p = softmax(hidden_btd @ w_dv),  q = softmax(ref_hidden_btd @ ref_w_dv)      (fp32, per token)
        kl[b,t] = sum_v p (log p - log q)             = KL(p_theta || p_ref)   (reverse=False)
        kl[b,t] = sum_v q (log q - log p)             = KL(p_ref || p_theta)   (reverse=True)
        loss    = sum_{b,t} m[b,t] kl[b,t] / max(N, 1),   m = loss_mask_bt,  N = denom or sum m

    Gradients flow only into hidden_btd and w_dv; the reference inputs are stop_gradient'ed. When the
    trained and reference inputs are equal, the loss is exactly 0 and so is its gradient
    (log p - log q = 0 elementwise). Logits are computed ``seq_chunk`` positions at a time (default: one
    chunk's fp32 logits <= 64 MiB per model) and the gradient is fused into the chunked forward.
    """
    b, t, d, v = check_hidden_w(hidden_btd, w_dv, "token_kl")
    if tuple(ref_hidden_btd.shape) != (b, t, ref_hidden_btd.shape[-1]) or ref_hidden_btd.ndim != 3:
        raise ValueError(
            f"emajax.losses.token_kl: ref_hidden_btd must be [B, T, D_ref] with B, T = {b}, {t}, "
            f"got shape {ref_hidden_btd.shape}"
        )
    if ref_w_dv.ndim != 2 or tuple(ref_w_dv.shape) != (ref_hidden_btd.shape[2], v):
        raise ValueError(
            f"emajax.losses.token_kl: ref_w_dv must be [D_ref, V] = [{ref_hidden_btd.shape[2]}, {v}], "
            f"got shape {ref_w_dv.shape}"
        )
    check_bt(loss_mask_bt, b, t, "loss_mask_bt", "token_kl")
    chunk = resolve_seq_chunk(seq_chunk, b, t, v)
    ref_h = jax.lax.stop_gradient(ref_hidden_btd)
    ref_w = jax.lax.stop_gradient(ref_w_dv)
    return _weighted_kl_vjp(hidden_btd, ref_h, w_dv, ref_w, mask_weights(loss_mask_bt, denom), bool(reverse), chunk)


# ----------------------------------------------------------------------------- CE + KL sharing logits
def _ce_kl_scan(h_btd, rh_btd, w_dv, rw_dv, tgt_bt, ce_wt_bt, kl_wt_bt, reverse, chunk, need_dh, need_dw,
                kl_weight=None):
    """(Σ ce_wt·nll, Σ kl_wt·kl) over chunks from one trained-logits matmul per chunk, plus gradients.

    ``kl_weight`` None: one gradient per term, (dh_ce, dh_kl), (dw_ce, dw_kl). Otherwise the gradient of
    ce + kl_weight·kl alone, ((dh,), (dw,)): the two logit gradients are added before they are projected
    back through the output matrix, one [c, V] x [V, D] product per chunk instead of two."""
    want_grad = need_dh or need_dw
    parts = 1 if kl_weight is not None else 2

    def body(carry, xs):
        ce, kl_sum, dws = carry
        h, rh, tg, cw, kw = xs
        z = chunk_logits(h, w_dv)
        lse, nll = chunk_nll(z, tg)
        kl, dz_kl = _chunk_kl(z, chunk_logits(rh, rw_dv), reverse, want_grad, lse)
        ce = ce + jnp.sum(cw * nll)
        kl_sum = kl_sum + jnp.sum(kw * kl)
        dh = None
        if want_grad:
            dz_ce = softmax_minus_onehot(z, lse, tg, cw)
            dz_kl = kw[..., None] * dz_kl
            dzs = (dz_ce, dz_kl) if kl_weight is None else (dz_ce + kl_weight * dz_kl,)
            if need_dh:
                dh = tuple(grad_h(dz, w_dv, h_btd.dtype) for dz in dzs)
            if need_dw:
                dws = tuple(acc + grad_w(h, dz) for acc, dz in zip(dws, dzs))
        return (ce, kl_sum, dws), dh

    dw0 = tuple(jnp.zeros(w_dv.shape, jnp.float32) for _ in range(parts)) if need_dw else None
    zero = jnp.zeros((), jnp.float32)
    (ce, kl, dws), dhs = scan_weighted(body, (zero, zero, dw0), (h_btd, rh_btd, tgt_bt, ce_wt_bt, kl_wt_bt),
                                       (ce_wt_bt, kl_wt_bt), chunk)
    dhs = dhs if need_dh else (None,) * parts
    return (ce, kl), (dhs, dws if need_dw else (None,) * parts)


def _ce_kl(h, rh, w, rw, tgt, cw, kw, reverse, chunk, *, need_dh, need_dw):
    out, (dhs, dws) = _ce_kl_scan(h, rh, w, rw, tgt, cw, kw, reverse, chunk, need_dh, need_dw)
    return out, dhs, dws


_ce_kl_vjp = fused_vjp(_ce_kl, nondiff_argnums=(7, 8), w_argnum=2, cotangents=lambda g: g)  # (g_ce, g_kl)


def _ce_plus_kl(h, rh, w, rw, tgt, cw, kw, lam, reverse, chunk, *, need_dh, need_dw):
    want = need_dh or need_dw  # the value needs no kl_weight; the gradient is that of ce + lam kl
    (ce, kl), (dhs, dws) = _ce_kl_scan(h, rh, w, rw, tgt, cw, kw, reverse, chunk, need_dh, need_dw,
                                       kl_weight=lam if want else None)
    return (ce + lam * kl, ce, kl), dhs[:1], dws[:1]


# ce and kl leave ce_plus_kl through stop_gradient: only the sum's cotangent counts
_ce_plus_kl_vjp = fused_vjp(_ce_plus_kl, nondiff_argnums=(8, 9), w_argnum=2, cotangents=lambda g: (g[0],))


def _ce_kl_inputs(name, hidden_btd, ref_hidden_btd, w_dv, ref_w_dv, targets_bt, loss_mask_bt, kl_mask_bt,
                  seq_chunk, ce_denom=None, kl_denom=None):
    """Checked inputs of ce_and_kl / ce_plus_kl: (ref_h, ref_w (no gradient), targets, CE and KL token
    weights, chunk)."""
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, name)
    if ref_hidden_btd.ndim != 3 or tuple(ref_hidden_btd.shape[:2]) != (b, t):
        raise ValueError(f"emajax.losses.{name}: ref_hidden_btd must be [{b}, {t}, D_ref], got {ref_hidden_btd.shape}")
    if ref_w_dv.ndim != 2 or tuple(ref_w_dv.shape) != (ref_hidden_btd.shape[2], v):
        raise ValueError(
            f"emajax.losses.{name}: ref_w_dv must be [D_ref, V] = [{ref_hidden_btd.shape[2]}, {v}], got {ref_w_dv.shape}"
        )
    check_bt(targets_bt, b, t, "targets_bt", name)
    check_bt(loss_mask_bt, b, t, "loss_mask_bt", name)
    kl_mask_bt = loss_mask_bt if kl_mask_bt is None else kl_mask_bt
    check_bt(kl_mask_bt, b, t, "kl_mask_bt", name)
    return (jax.lax.stop_gradient(ref_hidden_btd), jax.lax.stop_gradient(ref_w_dv),
            jnp.clip(targets_bt.astype(jnp.int32), 0, v - 1), mask_weights(loss_mask_bt, ce_denom),
            mask_weights(kl_mask_bt, kl_denom),
            resolve_seq_chunk(seq_chunk, b, t, v))


def ce_and_kl(
    hidden_btd: jax.Array,
    ref_hidden_btd: jax.Array,
    w_dv: jax.Array,
    ref_w_dv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    kl_mask_bt: jax.Array | None = None,
    *,
    reverse: bool = False,
    seq_chunk: int | None = None,
    ce_denom: jax.Array | float | None = None,
    kl_denom: jax.Array | float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(masked_ce(...), token_kl(...)) in one pass that computes the trained logits once per chunk.

        ce = Σ m nll / max(Σ m, 1)                    (as ``masked_ce``, m = loss_mask_bt)
        kl = Σ k kl_tok / max(Σ k, 1)                 (as ``token_kl``, k = kl_mask_bt or m)

    ``ce_denom`` / ``kl_denom`` replace Σ m / Σ k (the counts of an accumulated batch; see ``masked_ce``).

    Equal to calling both functions, values and gradients (each output is separately differentiable,
    e.g. through ``compose``), with one vocabulary matmul fewer per chunk: the KL-regularised step
    needs the trained logits for both terms. The reference side gets no gradient. When the weight of
    the KL term is known, :func:`ce_plus_kl` saves one more product per chunk.
    """
    ref_h, ref_w, tgt, cw, kw, chunk = _ce_kl_inputs("ce_and_kl", hidden_btd, ref_hidden_btd, w_dv, ref_w_dv,
                                                     targets_bt, loss_mask_bt, kl_mask_bt, seq_chunk, ce_denom,
                                                     kl_denom)
    return _ce_kl_vjp(hidden_btd, ref_h, w_dv, ref_w, tgt, cw, kw, bool(reverse), chunk)


def ce_plus_kl(
    hidden_btd: jax.Array,
    ref_hidden_btd: jax.Array,
    w_dv: jax.Array,
    ref_w_dv: jax.Array,
    targets_bt: jax.Array,
    loss_mask_bt: jax.Array,
    kl_mask_bt: jax.Array | None = None,
    *,
    kl_weight: float | jax.Array,
    reverse: bool = False,
    seq_chunk: int | None = None,
    ce_denom: jax.Array | float | None = None,
    kl_denom: jax.Array | float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ce + kl_weight * kl, ce, kl) with ce and kl as in :func:`ce_and_kl`; only the first is
    differentiable (ce and kl come back through ``stop_gradient``, for reporting).

    The KL-regularised objective with its weight fixed at the call: each chunk's two logit gradients
    are added before the [c, V] x [V, D] product back to the hidden states, so a chunk costs one such
    product instead of :func:`ce_and_kl`'s two. ``kl_weight`` may be a traced scalar (a schedule)."""
    ref_h, ref_w, tgt, cw, kw, chunk = _ce_kl_inputs("ce_plus_kl", hidden_btd, ref_hidden_btd, w_dv, ref_w_dv,
                                                     targets_bt, loss_mask_bt, kl_mask_bt, seq_chunk, ce_denom,
                                                     kl_denom)
    if jnp.ndim(kl_weight) != 0:
        raise ValueError(f"emajax.losses.ce_plus_kl: kl_weight must be a scalar, got shape {jnp.shape(kl_weight)}")
    lam = jax.lax.stop_gradient(jnp.asarray(kl_weight, jnp.float32))
    total, ce, kl = _ce_plus_kl_vjp(hidden_btd, ref_h, w_dv, ref_w, tgt, cw, kw, lam, bool(reverse), chunk)
    return total, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(kl)
