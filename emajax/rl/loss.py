"""The GRPO policy objective: token-level clipped policy ratio plus a KL penalty, pure jax.

For completion token t of row b with log-probability lp = log softmax(z / T)[y_t] (z the logits, T the
sampling temperature: the score function of the policy that sampled the rollouts, as TRL scales the
logits of the policy and the reference), the probability under the policy that sampled the rollouts
lp_old, the reference model's lp_ref (all three at the same T) and the row's advantage A:

    r      = exp(lp - lp_old)
    pg     = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)
    kl     = exp(lp_ref - lp) - (lp_ref - lp) - 1          (the k3 estimator of KL(pi_theta || pi_ref))
    loss   = sum_{b,t} w[b,t] (pg + beta kl)

``w`` normalises the token sum as TRL's ``loss_type`` does (:func:`loss_weights`): ``dapo`` divides by
the completion tokens of the whole rollout batch, ``bnpo`` by each micro-batch's tokens (then averages
the micro-batches), ``grpo`` averages within each completion and then over completions, ``dr_grpo``
divides by rows x max_new_tokens. The reported metrics (kl, entropy, ratio, clip_fraction) are token
means whatever the loss type (``metric_weights``). Where the minimum takes the clipped branch the token
contributes no policy gradient; ``clip_fraction`` counts those tokens. With one update per rollout batch
lp_old is lp itself (stop-gradient): r = 1 and the gradient is the plain policy gradient. Positions
with weight 0 (prompt, padding, masked completions) are excluded *before* any exp: their log-ratios are
set to 0, so a dead position never makes an inf (and 0 x inf = NaN) in the value or the gradient.

:func:`policy_objective` computes it from final hidden states and the output projection without ever
holding [B, T, V] logits: per chunk of completion positions it forms the logits once, derives lp, the
entropy and dloss/dlp in closed form, and keeps only dloss/dhidden (and dloss/dW when W is trained), like
``emajax.losses.masked_ce``. Prompt and padding positions (weight 0) never reach the vocabulary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from emajax.losses.ce import (check_bt, check_hidden_w, chunk_logits, chunk_nll, fused_vjp, grad_h, grad_w,
                              resolve_seq_chunk, scan_weighted, softmax_minus_onehot, sum_v)
from emajax.train.choices import LossType

METRICS = ("pg_loss", "kl", "clip_fraction", "ratio", "entropy")  # each a w-weighted sum over tokens


class ObjectiveSpec(NamedTuple):
    """Static settings of :func:`policy_objective` (hashable: part of the compiled program)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_weight: float = 0.0
    has_old: bool = False  # False: lp_old = stop_gradient(lp) (one update per rollout batch)
    has_ref: bool = False
    chunk: int = 256
    temperature: float = 1.0
    has_anchor: bool = False  # lp's values come from anchor_logp where anchor_on (gradient still through lp)


def token_terms(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, adv: jax.Array, *,
                clip_low: float, clip_high: float, kl_weight: float,
                live: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Elementwise per-token loss (pg + beta kl) and its parts (see module doc); any matching shapes.
    ``live`` (bool) marks the positions that count: elsewhere both log-ratios are 0 before the exp."""
    keep = (lambda x: x) if live is None else (lambda x: jnp.where(live, x, 0.0))
    ratio = jnp.exp(keep(logp - old_logp))
    surr = ratio * adv
    surr_clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    pg = -jnp.minimum(surr, surr_clipped)
    loss = pg
    kl = jnp.zeros_like(logp)
    if ref_logp is not None:
        d = keep(ref_logp - logp)
        kl = jnp.exp(d) - d - 1.0
        loss = loss + kl_weight * kl
    clipped = (surr_clipped < surr).astype(jnp.float32)  # the minimum is the constant, clipped branch
    return loss, {"pg_loss": pg, "kl": kl, "clip_fraction": clipped, "ratio": ratio}


def loss_weights(loss_mask_abt: jax.Array, loss_type: LossType | str = "dapo", *,
                 max_completion_length: int | None = None) -> jax.Array:
    """Token weights w [A, B, T] of the whole rollout batch (A micro-batches of B rows) whose w-weighted sum
    of per-token losses is TRL's loss of that ``loss_type`` (micro-batches = TRL's accumulation steps):

    * ``dapo``: sum / completion tokens of the whole batch;
    * ``bnpo``: each micro-batch's sum / its completion tokens, averaged over micro-batches;
    * ``grpo``: each completion's token mean, averaged over all rows (a row with no loss tokens counts as 0);
    * ``dr_grpo``: sum / (rows x ``max_completion_length``).
    """
    loss_type = LossType(loss_type)
    m = jax.lax.stop_gradient(loss_mask_abt).astype(jnp.float32)
    a, b = m.shape[0], m.shape[1]
    if loss_type is LossType.dapo:
        return m / jnp.maximum(jnp.sum(m), 1.0)
    if loss_type is LossType.bnpo:
        return m / jnp.maximum(jnp.sum(m, axis=(1, 2), keepdims=True), 1.0) / a
    if loss_type is LossType.grpo:
        return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0) / (a * b)
    if max_completion_length is None:
        raise ValueError("loss_weights: dr_grpo needs max_completion_length")
    return m / float(a * b * max_completion_length)


def metric_weights(loss_mask: jax.Array) -> jax.Array:
    """Weights of the reported token means: every loss token of the batch alike (sums to 1)."""
    m = jax.lax.stop_gradient(loss_mask).astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)


def _chunk_logp_entropy(z_bcv: jax.Array, tgt_bc: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lse, log p(target), entropy) of one chunk of fp32 (temperature-scaled) logits, each [B, c]."""
    lse, nll = chunk_nll(z_bcv, tgt_bc)
    p = jnp.exp(z_bcv - lse[..., None])
    return lse, -nll, lse - sum_v(p * z_bcv)


def scaled_logits(h_bcd: jax.Array, w_dv: jax.Array, temperature: float) -> jax.Array:
    """fp32 logits z / T of one chunk (z / 1 is z itself: no extra op at T = 1)."""
    z = chunk_logits(h_bcd, w_dv)
    return z if temperature == 1.0 else z / temperature


def _objective_scan(h_btd, w_dv, tgt_bt, wt_bt, mwt_bt, adv_bt, old_bt, ref_bt, anc_bt, anc_on, spec: ObjectiveSpec,
                    need_dh: bool, need_dw: bool):
    """(sums [1 + len(METRICS)]: the loss then each metric, dloss/dh or None, dloss/dW or None)."""

    def body(carry, xs):
        sums, dw = carry
        h, tg, wt, mwt, adv, old, ref, anc = xs
        z = scaled_logits(h, w_dv, spec.temperature)
        lse, logp, ent = _chunk_logp_entropy(z, tg)
        live = (wt > 0) | (mwt > 0)

        def weighted_loss(lp):
            if spec.has_anchor:  # the anchor's value, lp's gradient
                lp = jnp.where(anc_on, anc + (lp - jax.lax.stop_gradient(lp)), lp)
            lp_old = old if spec.has_old else jax.lax.stop_gradient(lp)
            loss, parts = token_terms(lp, lp_old, ref if spec.has_ref else None, adv, clip_low=spec.clip_low,
                                      clip_high=spec.clip_high, kl_weight=spec.kl_weight, live=live)
            return jnp.sum(jnp.where(live, wt * loss, 0.0)), parts

        val, vjp_fn, parts = jax.vjp(weighted_loss, logp, has_aux=True)
        row = [val] + [jnp.sum(jnp.where(live, mwt * parts[k], 0.0)) for k in METRICS[:-1]] + [jnp.sum(mwt * ent)]
        sums = sums + jnp.stack(row)
        dh = None
        if need_dh or need_dw:
            (g_logp,) = vjp_fn(jnp.ones((), jnp.float32))
            # d logp / dz = (onehot - softmax(z / T)) / T
            dz = softmax_minus_onehot(z, lse, tg, -g_logp / spec.temperature)
            if need_dh:
                dh = grad_h(dz, w_dv, h_btd.dtype)
            if need_dw:
                dw = dw + grad_w(h, dz)
        return (sums, dw), dh

    dw0 = jnp.zeros(w_dv.shape, jnp.float32) if need_dw else None
    sums0 = jnp.zeros((1 + len(METRICS),), jnp.float32)
    (sums, dw), dh = scan_weighted(body, (sums0, dw0), (h_btd, tgt_bt, wt_bt, mwt_bt, adv_bt, old_bt, ref_bt, anc_bt),
                                   (wt_bt, mwt_bt), spec.chunk)
    return sums, dh, dw


def _objective(h, w, tgt, wt, mwt, adv, old, ref, anc, anc_on, spec, *, need_dh, need_dw):
    sums, dh, dw = _objective_scan(h, w, tgt, wt, mwt, adv, old, ref, anc, anc_on, spec, need_dh, need_dw)
    return (sums[0], sums[1:]), (dh,), (dw,)


# the metrics (second output) are reported, never differentiated: only the loss's cotangent counts
_objective_vjp = fused_vjp(_objective, nondiff_argnums=(10,), cotangents=lambda g: (g[0],))


def policy_objective(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, weights_bt: jax.Array,
                     adv_b: jax.Array, *, old_logp_bt: jax.Array | None = None, ref_logp_bt: jax.Array | None = None,
                     clip_eps: float = 0.2, clip_eps_high: float | None = None, kl_weight: float = 0.0,
                     temperature: float = 1.0, metric_weights_bt: jax.Array | None = None,
                     anchor_logp_bt: jax.Array | None = None, anchor_on: Any = True, seq_chunk: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of the module doc for one micro-batch; differentiable in ``hidden_btd`` and ``w_dv``.

    ``weights_bt`` are this micro-batch's slice of :func:`loss_weights` over the whole rollout batch (so
    micro-batch losses add up to the batch's), ``metric_weights_bt`` its slice of :func:`metric_weights`
    (default: ``weights_bt``), ``adv_b`` the rows' advantages, ``temperature`` the sampling temperature
    (log-probs of z / T; ``old_logp_bt`` and ``ref_logp_bt`` must be at the same T). Without
    ``old_logp_bt`` the rollouts count as sampled by the current parameters (ratio 1); without
    ``ref_logp_bt`` there is no KL term (``kl_weight`` must then be 0). Metrics are the weighted sums of
    ``pg_loss``, ``kl``, ``clip_fraction``, ``ratio`` and ``entropy`` (no gradient flows through them).
    ``anchor_logp_bt`` (where the traced or static bool ``anchor_on``): the values of lp are taken from it, the
    gradient still from ``hidden_btd`` / ``w_dv`` (the same log-probs computed by the program that computed the
    reference's, so KL and ratio are exact at the parameters both saw: ``emajax.rl.step``).
    """
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, "policy_objective")
    for name, x in (("targets_bt", targets_bt), ("weights_bt", weights_bt), ("old_logp_bt", old_logp_bt),
                    ("ref_logp_bt", ref_logp_bt), ("metric_weights_bt", metric_weights_bt),
                    ("anchor_logp_bt", anchor_logp_bt)):
        if x is not None:
            check_bt(x, b, t, name, "policy_objective")
    if kl_weight and ref_logp_bt is None:
        raise ValueError("policy_objective: kl_weight > 0 needs ref_logp_bt")
    if not temperature > 0:
        raise ValueError(f"policy_objective: temperature must be > 0, got {temperature}")
    zeros = jnp.zeros((b, t), jnp.float32)
    spec = ObjectiveSpec(float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high),
                         float(kl_weight), old_logp_bt is not None, ref_logp_bt is not None,
                         resolve_seq_chunk(seq_chunk, b, t, v), float(temperature), anchor_logp_bt is not None)
    wt = jax.lax.stop_gradient(weights_bt).astype(jnp.float32)
    mwt = wt if metric_weights_bt is None else jax.lax.stop_gradient(metric_weights_bt).astype(jnp.float32)
    adv_bt = jnp.broadcast_to(jnp.asarray(adv_b, jnp.float32)[:, None], (b, t))
    tgt = jnp.clip(targets_bt.astype(jnp.int32), 0, v - 1)
    loss, sums = _objective_vjp(hidden_btd, w_dv, tgt, wt, mwt, jax.lax.stop_gradient(adv_bt),
                                zeros if old_logp_bt is None else jax.lax.stop_gradient(old_logp_bt).astype(jnp.float32),
                                zeros if ref_logp_bt is None else jax.lax.stop_gradient(ref_logp_bt).astype(jnp.float32),
                                zeros if anchor_logp_bt is None else jax.lax.stop_gradient(anchor_logp_bt).astype(jnp.float32),
                                jnp.asarray(anchor_on, bool), spec)
    return loss, dict(zip(METRICS, sums))


def token_logp_entropy(hidden_btd: jax.Array, w_dv: jax.Array, targets_bt: jax.Array, mask_bt: jax.Array, *,
                       temperature: float = 1.0, seq_chunk: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log p(target), entropy) of softmax(z / T), fp32 [B, T] each, at the masked positions (0 elsewhere).
    Forward only: the rollout policy's and the reference's log-probabilities of the sampled tokens."""
    b, t, _, v = check_hidden_w(hidden_btd, w_dv, "token_logp_entropy")
    check_bt(targets_bt, b, t, "targets_bt", "token_logp_entropy")
    check_bt(mask_bt, b, t, "mask_bt", "token_logp_entropy")
    chunk = resolve_seq_chunk(seq_chunk, b, t, v)
    h = jax.lax.stop_gradient(hidden_btd)
    w = jax.lax.stop_gradient(w_dv)

    def body(_, xs):
        hc, tg = xs
        _, logp, ent = _chunk_logp_entropy(scaled_logits(hc, w, temperature), tg)
        return None, (logp, ent)

    m = mask_bt.astype(jnp.float32)
    _, (logp, ent) = scan_weighted(body, None, (h, jnp.clip(targets_bt.astype(jnp.int32), 0, v - 1)), (m,), chunk)
    return logp * m, ent * m
