"""The GRPO policy objective: token-level clipped policy ratio plus a KL penalty, pure jax.

For completion token t of row b with log-probability lp = log pi_theta(y_t | y_<t), the probability
under the policy that sampled the rollouts lp_old, the reference model's lp_ref and the row's advantage A:

    r      = exp(lp - lp_old)
    pg     = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    kl     = exp(lp_ref - lp) - (lp_ref - lp) - 1          (the k3 estimator of KL(pi_theta || pi_ref))
    loss   = sum_{b,t} w[b,t] (pg + beta kl)

``w`` aggregates tokens (:func:`token_weights`): "token" weighs every completion token of the whole
rollout batch equally (DAPO; TRL's default ``loss_type="dapo"``), "sequence" averages within each
completion and then over completions (the original GRPO). Where the minimum takes the clipped branch the
token contributes no policy gradient; ``clip_fraction`` counts those tokens. With one update per rollout
batch lp_old is lp itself (stop-gradient): r = 1 and the gradient is the plain policy gradient.

:func:`policy_objective` computes it from final hidden states and the output projection without ever
holding [B, T, V] logits: per chunk of completion positions it forms the logits once, derives lp, the
entropy and dloss/dlp in closed form, and keeps only dloss/dhidden (and dloss/dW when W is trained), like
``emajax.losses.masked_ce``. Prompt and padding positions (weight 0) never reach the vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from emajax.losses.ce import (check_bt, check_hidden_w, chunk_logits, chunk_nll, grad_h, grad_w, resolve_seq_chunk,
                              scale_grads, scan_weighted, softmax_minus_onehot, sum_v)

AGGREGATIONS = ("token", "sequence")
METRICS = ("pg_loss", "kl", "clip_fraction", "ratio", "entropy")  # each a w-weighted sum over tokens


class ObjectiveSpec(NamedTuple):
    """Static settings of :func:`policy_objective` (hashable: part of the compiled program)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_weight: float = 0.0
    has_old: bool = False  # False: lp_old = stop_gradient(lp) (one update per rollout batch)
    has_ref: bool = False
    chunk: int = 256


def token_terms(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, adv: jax.Array, *,
                clip_low: float, clip_high: float, kl_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Elementwise per-token loss (pg + beta kl) and its parts (see module doc); any matching shapes."""
    ratio = jnp.exp(logp - old_logp)
    surr = ratio * adv
    surr_clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    pg = -jnp.minimum(surr, surr_clipped)
    loss = pg
    kl = jnp.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = jnp.exp(d) - d - 1.0
        loss = loss + kl_weight * kl
    clipped = (surr_clipped < surr).astype(jnp.float32)  # the minimum is the constant, clipped branch
    return loss, {"pg_loss": pg, "kl": kl, "clip_fraction": clipped, "ratio": ratio}


def token_weights(loss_mask: jax.Array, aggregation: str = "token") -> jax.Array:
    """Weights w (same shape as ``loss_mask``, rows on the second-to-last axis, tokens on the last) that sum
    to 1 over the whole batch: every completion token alike ("token") or every completion alike, its tokens
    alike within it ("sequence"). Rows without completion tokens get weight 0."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")
    m = jax.lax.stop_gradient(loss_mask).astype(jnp.float32)
    if aggregation == "token":
        return m / jnp.maximum(jnp.sum(m), 1.0)
    per_row = jnp.sum(m, axis=-1, keepdims=True)
    rows = jnp.sum(per_row > 0)
    return m / jnp.maximum(per_row, 1.0) / jnp.maximum(rows, 1).astype(jnp.float32)


def _chunk_logp_entropy(z_bcv: jax.Array, tgt_bc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lse, log p(target), entropy) of one chunk of fp32 logits, each [B, c]."""
    lse, nll = chunk_nll(z_bcv, tgt_bc)
    p = jnp.exp(z_bcv - lse[..., None])
    return lse, -nll, lse - sum_v(p * z_bcv)


def _objective_scan(h_btd, w_dv, tgt_bt, wt_bt, adv_bt, old_bt, ref_bt, spec: ObjectiveSpec, need_dh: bool,
                    need_dw: bool):
    """(sums [1 + len(METRICS)]: the loss then each metric, dloss/dh or None, dloss/dW or None)."""

    def body(carry, xs):
        sums, dw = carry
        h, tg, wt, adv, old, ref = xs
        z = chunk_logits(h, w_dv)
        lse, logp, ent = _chunk_logp_entropy(z, tg)

        def weighted_loss(lp):
            lp_old = old if spec.has_old else jax.lax.stop_gradient(lp)
            loss, parts = token_terms(lp, lp_old, ref if spec.has_ref else None, adv, clip_low=spec.clip_low,
                                      clip_high=spec.clip_high, kl_weight=spec.kl_weight)
            return jnp.sum(wt * loss), parts

        val, vjp_fn, parts = jax.vjp(weighted_loss, logp, has_aux=True)
        row = [val] + [jnp.sum(wt * parts[k]) for k in METRICS[:-1]] + [jnp.sum(wt * ent)]
        sums = sums + jnp.stack(row)
        dh = None
        if need_dh or need_dw:
            (g_logp,) = vjp_fn(jnp.ones((), jnp.float32))
            dz = softmax_minus_onehot(z, lse, tg, -g_logp)  # d logp / dz = onehot - softmax
            if need_dh:
                dh = grad_h(dz, w_dv, h_btd.dtype)
            if need_dw:
                dw = dw + grad_w(h, dz)
        return (sums, dw), dh

    dw0 = jnp.zeros(w_dv.shape, jnp.float32) if need_dw else None
    sums0 = jnp.zeros((1 + len(METRICS),), jnp.float32)
    (sums, dw), dh = scan_weighted(body, (sums0, dw0), (h_btd, tgt_bt, wt_bt, adv_bt, old_bt, ref_bt), (wt_bt,),
                                   spec.chunk)
    return sums, dh, dw


def _objective_impl(h, w, tgt, wt, adv, old, ref, spec):
    sums = _objective_scan(h, w, tgt, wt, adv, old, ref, spec, False, False)[0]
    return sums[0], sums[1:]


_objective_vjp = jax.custom_vjp(_objective_impl, nondiff_argnums=(7,))


def _objective_fwd(h, w, tgt, wt, adv, old, ref, spec):
    sums, dh, dw = _objective_scan(h.value, w.value, tgt.value, wt.value, adv.value, old.value, ref.value, spec,
                                   h.perturbed, w.perturbed)
    return (sums[0], sums[1:]), (dh, None if dw is None else dw.astype(w.value.dtype))


def _objective_bwd(spec, res, g):
    g_loss, _ = g  # the metrics are reported, never differentiated
    dh, dw = scale_grads(g_loss, *res)
    return dh, dw, None, None, None, None, None


_objective_vjp.defvjp(_objective_fwd, _objective_bwd, symbolic_zeros=True)


def policy_objective(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                     adv_b: jax.Array, *, old_logp_bt: jax.Array | None = None, ref_logp_bt: jax.Array | None = None,
                     clip_eps: float = 0.2, clip_eps_high: float | None = None, kl_weight: float = 0.0,
                     seq_chunk: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the module doc for one micro-batch; differentiable in ``hidden_btd`` and ``w_dv``.

    ``weights_bt`` are this micro-batch's slice of :func:`token_weights` over the whole rollout batch (so
    micro-batch losses and metrics add up to the batch's), ``adv_b`` the rows' advantages. Without
    ``old_logp_bt`` the rollouts count as sampled by the current parameters (ratio 1); without
    ``ref_logp_bt`` there is no KL term (``kl_weight`` must then be 0). Metrics are the w-weighted sums of
    ``pg_loss``, ``kl``, ``clip_fraction``, ``ratio`` and ``entropy`` (no gradient flows through them).
    """
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, "policy_objective")
    for name, x in (("targets_bt", targets_bt), ("weights_bt", weights_bt), ("old_logp_bt", old_logp_bt),
                    ("ref_logp_bt", ref_logp_bt)):
        if x is not None:
            check_bt(x, b, t, name, "policy_objective")
    if kl_weight and ref_logp_bt is None:
        raise ValueError("policy_objective: kl_weight > 0 needs ref_logp_bt")
    zeros = jnp.zeros((b, t), jnp.float32)
    spec = ObjectiveSpec(float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high),
                         float(kl_weight), old_logp_bt is not None, ref_logp_bt is not None,
                         resolve_seq_chunk(seq_chunk, b, t, v))
    adv_bt = jnp.broadcast_to(jnp.asarray(adv_b, jnp.float32)[:, None], (b, t))
    tgt = jnp.clip(targets_bt.astype(jnp.int32), 0, v - 1)
    loss, sums = _objective_vjp(hidden_btd, w_dv, tgt, jax.lax.stop_gradient(weights_bt).astype(jnp.float32),
                                jax.lax.stop_gradient(adv_bt),
                                zeros if old_logp_bt is None else jax.lax.stop_gradient(old_logp_bt).astype(jnp.float32),
                                zeros if ref_logp_bt is None else jax.lax.stop_gradient(ref_logp_bt).astype(jnp.float32),
                                spec)
    return loss, dict(zip(METRICS, sums))


def token_logp_entropy(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array, *,
                       seq_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy), fp32 [B, T] each, at the masked positions (0 elsewhere). Forward only:
    the rollout policy's and the reference's log-probabilities of the sampled tokens."""
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, "token_logp_entropy")
    check_bt(targets_bt, b, t, "targets_bt", "token_logp_entropy")
    check_bt(mask_bt, b, t, "mask_bt", "token_logp_entropy")
    chunk = resolve_seq_chunk(seq_chunk, b, t, v)
    h = jax.lax.stop_gradient(hidden_btd)
    w = jax.lax.stop_gradient(w_dv)

    def body(_, xs):
        hc, tg = xs
        _, logp, ent = _chunk_logp_entropy(chunk_logits(hc, w), tg)
        return None, (logp, ent)

    m = mask_bt.astype(jnp.float32)
    _, (logp, ent) = scan_weighted(body, None, (h, jnp.clip(targets_bt.astype(jnp.int32), 0, v - 1)), (m,), chunk)
    return logp * m, ent * m
