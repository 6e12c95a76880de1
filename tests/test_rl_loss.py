"""GRPO advantages and the fused policy objective against NumPy / naive-jax references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emajax.rl.advantages import group_advantages
from emajax.rl.loss import loss_weights, metric_weights, policy_objective, token_logp_entropy, token_terms


def np_advantages(r, g, scale):
    r = np.asarray(r, np.float64).reshape(-1, g)
    c = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        return (c / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)).ravel()
    if scale == "batch":
        return (c / (r.std(ddof=1) + 1e-4)).ravel()
    return c.ravel()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_numpy(scale):
    rng = np.random.default_rng(0)
    r = rng.normal(size=12).astype(np.float32)
    r[4:8] = 1.0  # a group with no spread: advantages 0, not NaN
    adv, std = group_advantages(r, 4, scale)
    np.testing.assert_allclose(np.asarray(adv), np_advantages(r, 4, scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(std), r.reshape(3, 4).std(axis=1, ddof=1), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(adv)[4:8] == 0.0)
    with pytest.raises(ValueError):
        group_advantages(r, 5)


def _problem(seed=0, b=4, t=9, d=8, v=23):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.7, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    mask = np.zeros((b, t), bool)
    for i, (s, n) in enumerate([(2, 5), (3, 6), (1, 3), (0, 0)]):  # completion spans; the last row has none
        mask[i, s:s + n] = True
    adv = jnp.asarray(rng.normal(size=b), jnp.float32)
    return h, w, tgt, jnp.asarray(mask), adv


def _np_logp(h, w, tgt, temperature=1.0):
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    p = np.exp(lsm)
    return np.take_along_axis(lsm, np.asarray(tgt)[..., None], -1)[..., 0], -(p * lsm).sum(-1)


def _np_weights(mask, loss_type, micro=2, max_len=12):
    """TRL GRPOTrainer's normalisations, written from its loss code over micro-batches of ``micro`` rows."""
    m = np.asarray(mask, np.float64)
    a = m.shape[0] // micro
    mb = m.reshape(a, micro, -1)
    if loss_type == "dapo":  # sum / num_items_in_batch (tokens of the whole generation batch)
        w = mb / m.sum()
    elif loss_type == "bnpo":  # per micro-batch token mean, / accumulation steps
        w = mb / np.maximum(mb.sum(axis=(1, 2), keepdims=True), 1) / a
    elif loss_type == "grpo":  # per-row mean (clamp 1), mean over the micro-batch's rows, / accumulation steps
        w = mb / np.maximum(mb.sum(-1, keepdims=True), 1) / micro / a
    else:  # dr_grpo: sum / (rows x max_completion_length), / accumulation steps
        w = mb / (micro * max_len) / a
    return w.reshape(m.shape)


def _np_objective(h, w, tgt, mask, adv, old, ref, eps_lo, eps_hi, beta, loss_type, temperature=1.0):
    lp, ent = _np_logp(h, w, tgt, temperature)
    old = lp if old is None else np.asarray(old, np.float64)
    m = np.asarray(mask, np.float64)
    wt = _np_weights(mask, loss_type)
    tok = m / m.sum()
    ratio = np.exp(lp - old)
    a = np.asarray(adv, np.float64)[:, None]
    pg = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_lo, 1 + eps_hi) * a)
    kl = np.zeros_like(lp) if ref is None else np.exp(np.asarray(ref) - lp) - (np.asarray(ref) - lp) - 1
    return float((wt * (pg + beta * kl)).sum()), float((tok * kl).sum()), float((tok * ent).sum())


def _np_grads(h, w, tgt, mask, adv, old, ref, eps_lo, eps_hi, beta, loss_type, temperature):
    """dloss/dh and dloss/dW in NumPy (float64), written out: d loss/d lp per token (pg: -A r where the
    unclipped branch is the minimum; k3: 1 - exp(ref - lp)), d lp/d z = (onehot - softmax(z / T)) / T."""
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    z = h64 @ w64 / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    lp = np.log(np.take_along_axis(p, np.asarray(tgt)[..., None], -1)[..., 0])
    old = lp if old is None else np.asarray(old, np.float64)
    a = np.asarray(adv, np.float64)[:, None]
    r = np.exp(lp - old)
    unclipped = r * a <= np.clip(r, 1 - eps_lo, 1 + eps_hi) * a
    g_lp = np.where(unclipped, -a * r, 0.0)
    if ref is not None:
        g_lp = g_lp + beta * (1.0 - np.exp(np.asarray(ref, np.float64) - lp))
    g_lp = g_lp * _np_weights(mask, loss_type)
    onehot = np.eye(w64.shape[1])[np.asarray(tgt)]
    dz = g_lp[..., None] * (onehot - p) / temperature
    return dz @ w64.T, np.einsum("btd,btv->dv", h64, dz)


def _naive_loss(h, w, tgt, wt, adv, old, ref, eps_lo, eps_hi, beta):
    """The same objective through full [B, T, V] logits and autodiff: the gradient oracle."""
    lp = jnp.take_along_axis(jax.nn.log_softmax(h @ w, axis=-1), tgt[..., None], -1)[..., 0]
    loss, _ = token_terms(lp, jax.lax.stop_gradient(lp) if old is None else old, ref, adv[:, None],
                          clip_low=eps_lo, clip_high=eps_hi, kl_weight=beta)
    return jnp.sum(wt * loss)


def _weights(mask, loss_type, micro=2):
    m = jnp.asarray(mask)
    wt = loss_weights(m.reshape(m.shape[0] // micro, micro, -1), loss_type, max_completion_length=12)
    return wt.reshape(m.shape), metric_weights(m)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
@pytest.mark.parametrize("with_old,beta", [(False, 0.0), (True, 0.0), (True, 0.1), (False, 0.1)])
def test_policy_objective_value_and_grads(loss_type, with_old, beta):
    h, w, tgt, mask, adv = _problem()
    rng = np.random.default_rng(1)
    lp, _ = _np_logp(h, w, tgt)
    old = jnp.asarray(lp + rng.normal(size=lp.shape) * 0.3, jnp.float32) if with_old else None
    ref = jnp.asarray(lp + rng.normal(size=lp.shape) * 0.5, jnp.float32) if beta else None
    wt, mwt = _weights(mask, loss_type)
    np.testing.assert_allclose(np.asarray(wt), _np_weights(mask, loss_type), rtol=1e-6, atol=1e-9)
    kw = dict(old_logp_bt=old, ref_logp_bt=ref, clip_eps=0.2, clip_eps_high=0.28, kl_weight=beta, seq_chunk=4,
              metric_weights_bt=mwt)
    (loss, m), (gh, gw) = jax.value_and_grad(lambda h_, w_: policy_objective(h_, w_, tgt, wt, adv, **kw),
                                             argnums=(0, 1), has_aux=True)(h, w)
    ref_loss, ref_kl, ref_ent = _np_objective(h, w, tgt, mask, adv, old, ref, 0.2, 0.28, beta, loss_type)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), ref_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["entropy"]), ref_ent, rtol=1e-5)
    nh, nw = jax.grad(_naive_loss, argnums=(0, 1))(h, w, tgt, wt, adv, old, ref, 0.2, 0.28, beta)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(nh), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(nw), rtol=1e-4, atol=1e-6)
    assert not np.asarray(gh)[3].any()  # a row without completion tokens gets no gradient


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_temperature_scales_logprobs_and_gradient_like_numpy(loss_type):
    """At T = 0.7 the objective is that of log softmax(z / T) for the policy, pi_old and the reference (the
    rollouts' sampling distribution): value, KL and entropy metrics and both gradients vs NumPy."""
    T = 0.7
    h, w, tgt, mask, adv = _problem(seed=2)
    rng = np.random.default_rng(4)
    lp, _ = _np_logp(h, w, tgt, T)
    old = jnp.asarray(lp + rng.normal(size=lp.shape) * 0.3, jnp.float32)
    ref = jnp.asarray(lp + rng.normal(size=lp.shape) * 0.5, jnp.float32)
    wt, mwt = _weights(mask, loss_type)
    kw = dict(old_logp_bt=old, ref_logp_bt=ref, clip_eps=0.2, clip_eps_high=0.28, kl_weight=0.1, seq_chunk=4,
              metric_weights_bt=mwt, temperature=T)
    (loss, m), (gh, gw) = jax.value_and_grad(lambda h_, w_: policy_objective(h_, w_, tgt, wt, adv, **kw),
                                             argnums=(0, 1), has_aux=True)(h, w)
    ref_loss, ref_kl, ref_ent = _np_objective(h, w, tgt, mask, adv, old, ref, 0.2, 0.28, 0.1, loss_type, T)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), ref_kl, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["entropy"]), ref_ent, rtol=1e-5)
    nh, nw = _np_grads(h, w, tgt, mask, adv, old, ref, 0.2, 0.28, 0.1, loss_type, T)
    np.testing.assert_allclose(np.asarray(gh), nh, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gw), nw, rtol=1e-4, atol=1e-6)
    # the forward-only log-probs (pi_old and the reference's) use the same T
    lpj, _ = token_logp_entropy(h, w, tgt, mask, temperature=T, seq_chunk=3)
    np.testing.assert_allclose(np.asarray(lpj)[np.asarray(mask)], lp[np.asarray(mask)], rtol=1e-5, atol=1e-6)


def test_dead_positions_never_make_nan():
    """k3 and the ratio are masked before their exp: a log-prob of -100 at a dead position (weight 0; the
    reference's is 0 there) gives a finite value and gradient, equal to those without that position."""
    h, w, tgt, mask, adv = _problem(seed=6)
    m = np.asarray(mask)
    b, t = 3, int(np.argmin(m[3]))  # a dead position (row 3 has no completion tokens)
    assert not m[b, t]
    big = np.asarray(w).copy()
    hh = np.asarray(h).copy()
    # make log p(target) there about -100: a hidden state pointing hard away from the target's column
    col = big[:, int(tgt[b, t])]
    hh[b, t] = -col / np.dot(col, col) * 100.0
    hh = jnp.asarray(hh)
    lp, _ = _np_logp(hh, w, tgt)
    assert lp[b, t] < -90
    ref = jnp.asarray(np.where(m, lp + 0.1, 0.0), jnp.float32)  # 0 at dead positions, as token_logp_entropy gives
    wt, mwt = _weights(mask, "dapo")
    for old in (None, ref):
        f = lambda h_, w_: policy_objective(h_, w_, tgt, wt, adv, old_logp_bt=old, ref_logp_bt=ref,  # noqa: E731
                                            kl_weight=0.1, metric_weights_bt=mwt, seq_chunk=4)
        (loss, mt), (gh, gw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hh, w)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in mt.values())
        assert np.isfinite(np.asarray(gh)).all() and np.isfinite(np.asarray(gw)).all()
        (loss0, _), (gh0, _) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)


def test_clipped_tokens_have_zero_gradient():
    h, w, tgt, mask, adv = _problem(seed=3)
    adv = jnp.asarray([1.0, -1.0, 1.0, -1.0])
    lp, _ = _np_logp(h, w, tgt)
    # ratios far above 1 + eps where A > 0 and far below 1 - eps where A < 0: clipped; others near 1
    shift = np.where(np.arange(lp.shape[1]) % 2 == 0, 1.0, 0.0)[None] * np.asarray(adv)[:, None]
    old = jnp.asarray(lp - shift, jnp.float32)
    clipped = (np.asarray(mask) & (shift != 0))
    lpj = jnp.asarray(lp, jnp.float32)
    g = jax.grad(lambda x: jnp.sum(token_terms(x, old, None, adv[:, None], clip_low=0.2, clip_high=0.2,
                                               kl_weight=0.0)[0] * mask))(lpj)
    assert np.all(np.asarray(g)[clipped] == 0.0) and np.all(np.asarray(g)[np.asarray(mask) & ~clipped] != 0.0)
    wt, _ = _weights(mask, "dapo")
    (_, m), gh = jax.value_and_grad(lambda h_: policy_objective(h_, w, tgt, wt, adv, old_logp_bt=old, seq_chunk=4),
                                    has_aux=True)(h)
    np.testing.assert_allclose(float(m["clip_fraction"]), clipped.sum() / np.asarray(mask).sum(), rtol=1e-6)
    # the fused gradient is the gradient of the unclipped tokens alone
    keep = jnp.asarray(np.asarray(wt) * ~clipped)
    gh_unclipped = jax.grad(_naive_loss)(h, w, tgt, keep, adv, old, None, 0.2, 0.2, 0.0)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_unclipped), rtol=1e-4, atol=1e-7)


def test_kl_is_zero_at_the_reference_and_logp_entropy():
    h, w, tgt, mask, adv = _problem(seed=5)
    lp, ent = token_logp_entropy(h, w, tgt, mask, seq_chunk=3)
    nlp, nent = _np_logp(h, w, tgt)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(lp)[m], nlp[m], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ent)[m], nent[m], rtol=1e-5, atol=1e-6)
    assert not np.asarray(lp)[~m].any()
    wt, _ = _weights(mask, "dapo")
    _, mt = policy_objective(h, w, tgt, wt, adv, ref_logp_bt=lp, kl_weight=0.1)
    assert abs(float(mt["kl"])) < 1e-6 and abs(float(mt["ratio"]) - 1.0) < 1e-6
