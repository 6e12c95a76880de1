"""The two pieces every compiled update shares (SFT's step, GRPO's inner updates): gradient accumulation
over micro-batches and the optimiser step on the state. Pure jax, used inside jit.

``accumulate(micro, like, xs)`` sums ``micro(x) -> (grads, metrics)`` over the leading (micro-batch) axis
of ``xs`` with ``lax.scan`` (one micro-batch: called directly), so memory holds one micro-batch's
activations; callers scale the sums (a global normalisation divides inside ``micro``, a per-micro-batch
mean divides the sum by the count). ``apply_gradients`` records the gradient norm and the learning rate
of the step, then ``tx.update`` + ``optax.apply_updates`` and one more on the step counter.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def accumulate(micro: Callable[[Any], tuple[Any, dict[str, jax.Array]]], like: Any,
               xs: Any) -> tuple[Any, dict[str, jax.Array]]:
    """(sum of grads, sum of metrics) of ``micro`` over the leading axis of ``xs``; ``like`` is a tree shaped
    as the gradients (the trainable parameters)."""
    n = jax.tree.leaves(xs)[0].shape[0]
    first = jax.tree.map(lambda x: x[0], xs)
    if n == 1:
        return micro(first)
    m_shape = jax.eval_shape(lambda: micro(first)[1])
    zeros = (jax.tree.map(jnp.zeros_like, like), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape))

    def body(carry, x):
        g, m = micro(x)
        return (jax.tree.map(jnp.add, carry[0], g), jax.tree.map(jnp.add, carry[1], m)), None

    return jax.lax.scan(body, zeros, xs)[0]


def apply_gradients(state: Any, grads: Any, metrics: dict[str, jax.Array], tx: optax.GradientTransformation,
                    schedule: Callable[[Any], Any]) -> tuple[Any, dict[str, jax.Array]]:
    """One optimiser step on ``state`` (a ``TrainState``): metrics gain ``grad_norm`` and ``lr`` (the
    schedule at the step taken), ``state.step`` counts it."""
    metrics = dict(metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    return state._replace(trainable=trainable, opt_state=opt_state, step=state.step + 1), metrics
