"""Activations that keep their batch rows split over the mesh.

Lives in ``emajax.losses`` (jax only) because the loss scans need it as much as the decoder does;
``emajax.models.sharding`` re-exports it with the rest of the mesh vocabulary.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over


def batch_rows(mesh: Any) -> int:
    """How many ways ``mesh`` (concrete or abstract; None: no mesh) splits the batch dimension: the product
    of its :data:`BATCH_AXES` sizes. Batches are padded to a multiple of it."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def constrain_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """Keep an activation's batch dimension ``axis`` split over ('data', 'fsdp') when traced under a
    mesh context (:func:`activation_mesh`); a no-op otherwise (one device, generation, no mesh) or when
    the dimension does not divide.

    Without it XLA may follow the weights' ``fsdp``-sharded model dimension into the activations
    (the embedding lookup's output inherits it) and run every layer, and the vocabulary products of
    the loss, on the whole batch with partial sums: per-device memory then does not shrink with the
    mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    rows = batch_rows(mesh)
    if rows == 1 or x.shape[axis] % rows:
        return x
    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, P(*spec))


def activation_mesh(mesh: Any) -> Any:
    """Context for tracing a forward/step on ``mesh`` (a ``jax.sharding.Mesh`` or None): enables
    :func:`constrain_rows` (usable inside jit)."""
    return contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
