"""The optional oneDNN matmul path (emajax.native.onednn): exact products, and ``mm`` through it
matches the default path in value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emajax.native import onednn


@pytest.fixture(scope="module")
def loaded():
    reason = onednn.unavailable_reason()
    if reason:
        pytest.skip(f"oneDNN path not available here: {reason}")


def _bf16(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_dot_matches_fp32_product(loaded, trans_a, trans_b):
    rng = np.random.default_rng(0)
    a, b = _bf16(rng, 37, 24), _bf16(rng, 24, 53)
    want = np.asarray(a, np.float32) @ np.asarray(b, np.float32)
    a_in = jnp.asarray(np.asarray(a).T) if trans_a else a
    b_in = jnp.asarray(np.asarray(b).T) if trans_b else b
    got = jax.jit(lambda x, y: onednn.dot(x, y, trans_a=trans_a, trans_b=trans_b))(a_in, b_in)
    assert got.dtype == jnp.float32 and got.shape == (37, 53)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)
    got16 = onednn.dot(a_in, b_in, trans_a=trans_a, trans_b=trans_b, out_dtype=jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16  # fp32 accumulation, rounded once: the bf16 rounding of the fp32 product
    np.testing.assert_array_equal(np.asarray(got16, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))


def test_dot_rejects_bad_operands(loaded):
    a = jnp.ones((4, 3), jnp.bfloat16)
    with pytest.raises(ValueError, match="contracting sizes differ"):
        onednn.dot(a, jnp.ones((4, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match="bf16 operands"):
        onednn.dot(a.astype(jnp.float32), jnp.ones((3, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match="out_dtype"):
        onednn.dot(a, jnp.ones((3, 5), jnp.bfloat16), out_dtype=jnp.float16)


def test_mm_through_onednn_matches_default(loaded, monkeypatch):
    """Value and both gradients of ``mm`` (bf16 activations, fp32 master weight) agree with XLA's path."""
    from emajax.models.matmul import mm

    rng = np.random.default_rng(1)
    x = _bf16(rng, 2, 9, 32)
    w = jnp.asarray(rng.standard_normal((32, 48)) / 6, jnp.float32)
    ct = _bf16(rng, 2, 9, 48)

    def value_and_grads():  # a new function per path: the switch is read when tracing
        def f(x, w):
            y, vjp = jax.vjp(mm, x, w)
            return (y, *vjp(ct))
        return jax.jit(f)

    monkeypatch.delenv("EMAJAX_CPU_MATMUL", raising=False)
    ref = value_and_grads()(x, w)
    monkeypatch.setenv("EMAJAX_CPU_MATMUL", "onednn")
    fn = value_and_grads()
    assert fn.lower(x, w).as_text().count("emajax_onednn_matmul") == 3  # forward, dx and dw all run by oneDNN
    got = fn(x, w)
    for g, r, name in zip(got, ref, ("y", "dx", "dw")):
        assert g.dtype == r.dtype and g.shape == r.shape, name
        # bf16 results may differ by one rounding step where the fp32 sums' order differs
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=1e-2, atol=1e-2,
                                   err_msg=name)


def test_missing_onednn_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_roots", lambda: [tmp_path])
    with pytest.raises(onednn.OnednnUnavailable, match="onednn-cpu-gomp onednn-devel-cpu-gomp"):
        onednn.build()
