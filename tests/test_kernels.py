"""The hand-written backward passes (LoRA delta, attention, bf16 matmul) equal plain autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emajax.models.attention import attend, attend_causal, causal_query_block
from emajax.models.lora import lora_delta
from emajax.models.matmul import mm


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_lora_delta_grads_match_autodiff():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 5, 12))
    a = jax.random.normal(k[1], (12, 4))
    b = jax.random.normal(k[2], (4, 9))
    w = jax.random.normal(k[3], (2, 5, 9))
    plain = lambda x, a, b: jnp.sum(((x @ a) @ b) * w)  # noqa: E731
    ours = lambda x, a, b: jnp.sum(lora_delta(x, a, b) * w)  # noqa: E731
    assert _rel(ours(x, a, b), plain(x, a, b)) < 1e-6
    for g, r in zip(jax.grad(ours, (0, 1, 2))(x, a, b), jax.grad(plain, (0, 1, 2))(x, a, b)):
        assert g.shape == r.shape and _rel(g, r) < 1e-5


def _ref_attention(q, k, v, bias, scale):
    s = jnp.einsum("btkgh,bskh->bkgts", q, k) * scale + bias[:, None, None]
    return jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize("t,s", [(6, 6), (1, 9)])  # training/prefill, and one decode query over a cache
def test_attention_matches_reference_and_its_gradient(t, s):
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (2, t, 2, 3, 8))
    k = jax.random.normal(ks[1], (2, s, 2, 8))
    v = jax.random.normal(ks[2], (2, s, 2, 8))
    allowed = np.array(jax.random.bernoulli(ks[3], 0.6, (2, t, s)))
    allowed[:, :, 0] = True  # every query sees at least one key
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    w = jax.random.normal(ks[4], q.shape)
    ours = lambda q, k, v: jnp.sum(attend(q, k, v, bias, 0.35) * w)  # noqa: E731
    ref = lambda q, k, v: jnp.sum(_ref_attention(q, k, v, bias, 0.35) * w)  # noqa: E731
    assert _rel(attend(q, k, v, bias, 0.35), _ref_attention(q, k, v, bias, 0.35)) < 1e-6
    for g, r in zip(jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
        assert _rel(g, r) < 1e-5


def test_blocked_causal_attention_equals_full_attention_and_its_gradient():
    """Query blocks against key prefixes (T = 13 in blocks of 4, so the last block is short), right padding."""
    ks = jax.random.split(jax.random.key(2), 4)
    b, t = 2, 13
    q = jax.random.normal(ks[0], (b, t, 2, 3, 8))
    k = jax.random.normal(ks[1], (b, t, 2, 8))
    v = jax.random.normal(ks[2], (b, t, 2, 8))
    valid = np.arange(t)[None, :] < np.array([[t], [9]])  # row 1: 4 padding tokens at the end
    allowed = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    w = jax.random.normal(ks[3], q.shape) * valid[:, :, None, None, None]  # padding queries carry no loss
    full = lambda q, k, v: jnp.sum(attend(q, k, v, bias, 0.35) * w)  # noqa: E731
    blocked = lambda q, k, v: jnp.sum(attend_causal(q, k, v, bias, 0.35, block=4) * w)  # noqa: E731
    keep = valid[:, :, None, None, None]
    assert _rel(attend_causal(q, k, v, bias, 0.35, block=4) * keep, attend(q, k, v, bias, 0.35) * keep) < 1e-6
    for g, r in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(full, (0, 1, 2))(q, k, v)):
        assert _rel(g, r) < 1e-5
    # the block follows the score-tile budget: whole sequence when it fits, else a power of two >= 16
    assert causal_query_block(8, 9, 256, tile_bytes=64 << 20) == 256
    assert causal_query_block(8, 9, 512, tile_bytes=16 << 20) == 64
    assert causal_query_block(64, 32, 4096, tile_bytes=16 << 20) == 16


def test_bf16_matmul_accumulates_in_fp32_forward_and_backward():
    k = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(k[0], (64, 256))
    wt = jax.random.normal(k[1], (256, 32)) / 16
    g = jax.random.normal(k[2], (64, 32))
    f32 = lambda x, w: jnp.sum(mm(x, w) * g)  # noqa: E731
    low = lambda x, w: jnp.sum(mm(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).astype(jnp.float32) * g)  # noqa: E731
    y = mm(x.astype(jnp.bfloat16), wt)
    assert y.dtype == jnp.bfloat16
    assert _rel(y, x @ wt) < 1e-2  # bf16 inputs and output, one rounding of an fp32 sum
    gx, gw = jax.grad(low, (0, 1))(x, wt)
    rx, rw = jax.grad(f32, (0, 1))(x, wt)
    assert gx.dtype == jnp.float32 and gw.dtype == jnp.float32
    assert _rel(gx, rx) < 2e-2 and _rel(gw, rw) < 2e-2


def test_cache_attention_equals_attend_on_the_same_keys():
    """attend_cache (heads-first cache, T queries at slots 4..5, stale slots past them) equals attend."""
    from emajax.models.attention import attend_cache

    ks = jax.random.split(jax.random.key(3), 3)
    b, s, kh, g, h, t = 2, 9, 2, 3, 8, 2
    q = jax.random.normal(ks[0], (b, t, kh, g, h))
    kc = jax.random.normal(ks[1], (b, s, kh, h))
    vc = jax.random.normal(ks[2], (b, s, kh, h))
    valid = np.array([[True] * s, [False, True] + [True] * (s - 2)])  # row 1 left-padded
    q_slot = np.array([4, 5])
    allowed = (np.arange(s)[None, :] <= q_slot[:, None])[None] & valid[:, None, :]
    bias = jnp.asarray(np.where(allowed, 0.0, np.finfo(np.float32).min), jnp.float32)
    want = attend(q, kc, vc, bias, 0.3)
    kt_ = lambda x: x.transpose(0, 2, 3, 1)  # noqa: E731  (the decode cache's keys are [B, K, H, S]
    vt_ = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  and its values [B, K, S, H])
    got = attend_cache(q, kt_(kc), vt_(vc), bias, 0.3)
    assert got.shape == want.shape and _rel(got, want) < 1e-6
    # Keys past the queries' slots (the cache's stale tail) carry no weight.
    assert _rel(attend_cache(q, kt_(kc.at[:, 6:].set(9.0)), vt_(vc.at[:, 6:].set(9.0)), bias, 0.3), want) < 1e-6


def test_bf16_residuals_are_stashed_and_recomputed_exactly():
    """stash/unstash is a bit-exact round trip, and recompute_vjp's gradients equal fp32 autodiff of
    the same op evaluated at the bf16 inputs (they are what the backward recomputes from)."""
    from emajax.models.decoder import gated_act, rms_norm
    from emajax.models.lowp import recompute_vjp, stash, unstash

    x = jax.random.normal(jax.random.key(3), (2, 5, 16), jnp.bfloat16)
    assert stash(x).dtype == jnp.uint16
    assert bool(jnp.all(unstash(stash(x)) == x))
    u = jax.random.normal(jax.random.key(4), (2, 5, 16), jnp.bfloat16)
    scale = jax.random.normal(jax.random.key(5), (16,), jnp.float32)
    w = jax.random.normal(jax.random.key(6), (2, 5, 16), jnp.bfloat16).astype(jnp.float32)  # an exact bf16 cotangent
    for fn, args in ((lambda g, v: gated_act(g, v, "silu"), (x, u)),
                     (lambda g, v: gated_act(g, v, "gelu_pytorch_tanh"), (x, u)),
                     (lambda a, s: rms_norm(a, s, 1e-5), (x, scale))):
        ours = jax.grad(lambda *a: jnp.sum(recompute_vjp(fn)(*a).astype(jnp.float32) * w), argnums=(0, 1))(*args)
        f32 = [a.astype(jnp.float32) for a in args]
        want = jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1))(*f32)
        for o, r, a in zip(ours, want, args):
            assert o.dtype == a.dtype
            assert _rel(o.astype(jnp.float32), r.astype(a.dtype).astype(jnp.float32)) < 1e-6


def test_rope_backward_is_the_inverse_rotation():
    """apply_rope's hand-written backward equals autodiff of the textbook rotate-half formula."""
    from emajax.models.decoder import apply_rope

    b, t, h, d = 2, 5, 3, 8
    x = jax.random.normal(jax.random.key(7), (b, t, h, d), jnp.float32)
    ang = jnp.arange(t, dtype=jnp.float32)[None, :, None] * jnp.array([1.0, 0.3, 0.05, 0.01])
    ang = jnp.broadcast_to(jnp.concatenate([ang, ang], -1), (b, t, d))
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    w = jax.random.normal(jax.random.key(8), (b, t, h, d), jnp.float32)

    def textbook(x):
        rot = jnp.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
        return x * cos[:, :, None] + rot * sin[:, :, None]

    assert _rel(apply_rope(x, cos, sin), textbook(x)) < 1e-6
    ours = jax.grad(lambda x: jnp.sum(apply_rope(x, cos, sin) * w))(x)
    want = jax.grad(lambda x: jnp.sum(textbook(x) * w))(x)
    assert _rel(ours, want) < 1e-6
