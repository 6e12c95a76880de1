"""Matrix products in the compute dtype, accumulated in fp32.

``mm(x, w)`` is ``x @ w`` whose result has x's dtype. In bf16 it multiplies bf16 operands into an
fp32 accumulator and rounds once at the end, forward and backward (``jax.custom_vjp``): that is the
numerically sound way to do bf16, and on CPUs it is also the form XLA hands to a native bf16
kernel: XLA:CPU runs bf16 x bf16 -> fp32 dots in its native (YNNPACK) fusions, several times faster
than fp32 dots on CPUs with bf16 units, while a bf16-output dot, or one whose operands mix fp32 and bf16
(what plain autodiff of a ``preferred_element_type=fp32`` dot produces in the backward), falls back to
slow generic code. In fp32 ``mm`` is ``jnp.dot`` with ordinary autodiff.

The backward keeps x as uint16 bits (``emajax.models.lowp``) and w as given (an fp32 master weight
is a slice of the scanned parameters, which the scan does not copy; its bf16 cast would be stacked
anew every step), casting again where it is used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emajax.models.lowp import stash, unstash


def _f32dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N]`` in x's dtype (w is cast to it); fp32 accumulation."""
    if x.dtype == jnp.float32:
        return jnp.dot(x, w.astype(x.dtype))
    return _mm_low(x, w)


@jax.custom_vjp
def _mm_low(x, w):
    return _f32dot(x, w.astype(x.dtype)).astype(x.dtype)


def _fwd(x, w):
    return _mm_low(x, w), (stash(x), w)


def row_major_t(x: jax.Array) -> jax.Array:
    """``x.T`` of a 2-D array, materialised row-major.

    A plain ``x.T`` reaches XLA as a column-major layout of the same buffer; a bf16 product fed by it is
    one XLA:CPU's YNNPACK path refuses, so XLA upcasts the whole product to fp32 (full fine-tuning's
    weight gradients and the LoRA backward ran that way). Going through a reshape pins a row-major
    result: XLA copies the operand once and the product stays a native bf16 dot."""
    n, m = x.shape
    return x.reshape(n, m, 1).transpose(1, 0, 2).reshape(m, n)


def _bwd(res, g):
    x, w_orig = unstash(res[0]), res[1]
    w = w_orig.astype(x.dtype)
    g = g.astype(x.dtype)
    dx = _f32dot(g, w.T).astype(x.dtype)  # XLA folds this transpose into the product's dimensions
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = _f32dot(row_major_t(x2), g2).astype(w_orig.dtype)  # dropped (and never computed) for frozen weights
    return dx, dw


_mm_low.defvjp(_fwd, _bwd)


def mm_t(x: jax.Array, w_t: jax.Array, out_dtype=None) -> jax.Array:
    """``x [..., K] @ w_t.T`` for a weight stored transposed, ``w_t [N, K]``; fp32 accumulation, result in
    ``out_dtype`` (default x's dtype; w_t is cast to x's dtype).

    For decoding (a handful of rows, weights constant): the product is formed as ``w_t x^T``, which
    XLA:CPU computes by streaming ``w_t`` in its row-major order. No custom gradient: not for training."""
    lead, k = x.shape[:-1], x.shape[-1]
    z_nm = jax.lax.dot_general(w_t.astype(x.dtype), x.reshape(-1, k), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)
    return z_nm.T.reshape(*lead, w_t.shape[0]).astype(out_dtype or x.dtype)
