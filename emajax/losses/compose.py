"""Total loss from named, weighted terms, with every term reported as a metric."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def compose(terms: Mapping[str, tuple[float, jax.Array]]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """total = sum_name weight_name * value_name;  metrics = {name: value_name (unweighted), "loss": total}.

    Weights may be Python numbers or arrays (e.g. a schedule). A term whose weight is the Python number
    0 is reported but left out of the total, so a disabled term can never inject NaN/inf (0 * inf).
    Values must be scalars; the total is fp32. "loss" is reserved for the total.
    """
    if not terms:
        raise ValueError("emajax.losses.compose: terms is empty (need at least one (weight, value) term)")
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}
    for name, term in terms.items():
        if not isinstance(name, str) or name == "loss":
            raise ValueError(f"emajax.losses.compose: term name {name!r} is invalid ('loss' is the total)")
        if not isinstance(term, tuple) or len(term) != 2:
            raise ValueError(f"emajax.losses.compose: term {name!r} must be a (weight, value) tuple, got {term!r}")
        weight, value = term
        value = jnp.asarray(value)
        if value.ndim != 0:
            raise ValueError(f"emajax.losses.compose: term {name!r} must be a scalar, got shape {value.shape}")
        if jnp.ndim(weight) != 0:
            raise ValueError(f"emajax.losses.compose: weight of term {name!r} must be a scalar, got {weight!r}")
        value = value.astype(jnp.float32)
        metrics[name] = value
        if isinstance(weight, (int, float)) and weight == 0:
            continue
        total = total + jnp.asarray(weight, jnp.float32) * value
    metrics["loss"] = total
    return total, metrics
