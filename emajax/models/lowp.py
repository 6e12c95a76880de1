"""How bf16 activations are kept for the backward pass of the layer ``scan``.

Why this exists: under ``lax.scan`` every residual the backward needs is written into a
[layers, ...] stack with a dynamic-update-slice per layer. XLA:CPU has no bf16 arithmetic and
"normalises" a bf16 dynamic-update-slice by converting the *whole stack* to fp32 and back, every
layer, which can take a large share of a bf16 training step (the fp32 step has no such cost). Storing the
bits as uint16 (``stash``) makes the update an integer copy in place; ``unstash`` restores them in
the backward. Nothing is rounded: the round trip is exact.

Residuals that plain autodiff would save in bf16 (the gated activation, RMSNorm) go through
``recompute_vjp``: the backward recomputes the op in fp32 from its stashed inputs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def stash(x: jax.Array) -> jax.Array:
    """bf16 -> its uint16 bit pattern (other dtypes unchanged); inverse: :func:`unstash`."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def unstash(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def recompute_vjp(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``fn`` (array args only) whose backward saves just its (stashed) inputs and recomputes ``fn``
    in fp32 to differentiate it; cotangents are returned in each input's dtype.

    Use it for cheap elementwise or normalisation ops run in bf16, whose autodiff residuals would
    otherwise be bf16 intermediates (see the module doc). In fp32 call ``fn`` directly."""

    def f32(*args):
        return fn(*(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in args))

    @jax.custom_vjp
    def op(*args):
        return fn(*args)

    def fwd(*args):
        return fn(*args), tuple(stash(a) for a in args)

    def bwd(res, g):
        args = tuple(unstash(a) for a in res)
        _, vjp = jax.vjp(f32, *args)
        grads = vjp(g.astype(jnp.float32))
        return tuple(d.astype(a.dtype) for d, a in zip(grads, args))

    op.defvjp(fwd, bwd)
    return op
