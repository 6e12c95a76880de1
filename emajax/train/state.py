"""The training state: one pytree the compiled step consumes and returns (donated).

``trainable`` holds what the optimiser updates (``nnx.LoRAParam`` with LoRA, every
``nnx.Param`` for full fine-tuning); ``frozen`` the rest of the weights. The reference model
for KL / LDIFS is, with LoRA, the same weights run with ``lora_scale=0`` (no copy: ``ref`` is
None); with full fine-tuning, ``ref`` is a frozen copy of the initial params sharded like them
(only built when a reference term is on). ``steer_ld`` is the preventative-steering array,
used by the training forward pass only. The graphdef stays outside: it is static.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from emajax.models.sharding import param_shardings
from emajax.train.mesh import replicated


class TrainState(NamedTuple):
    trainable: Any
    frozen: Any
    ref: Any  # None unless full fine-tuning with a reference term
    steer_ld: Any  # [L, D] or None
    opt_state: Any
    step: jax.Array  # int32 scalar: optimiser steps taken
    rng: jax.Array  # uint32[2] key, split every step


def split_model(model: nnx.Module, lora: bool) -> tuple[Any, Any, Any]:
    """(graphdef, trainable, frozen)."""
    if lora:
        return nnx.split(model, nnx.LoRAParam, ...)
    return nnx.split(model, nnx.Param, ...)


def opt_state_shardings(tx: optax.GradientTransformation, trainable: Any, trainable_sh: Any, mesh: Mesh) -> Any:
    """Moments sharded like their params; counters replicated."""
    abstract = jax.eval_shape(tx.init, trainable)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, trainable_sh,
                                 transform_non_params=lambda _: replicated(mesh))


def state_shardings(state: TrainState) -> Any:
    return jax.tree.map(lambda x: x.sharding, state)


def create_state(model: nnx.Module, *, lora: bool, tx: optax.GradientTransformation, mesh: Mesh,
                 need_ref: bool, steer_ld: Any = None, seed: int = 0) -> tuple[Any, TrainState]:
    """Split, shard and initialise: (graphdef, state) with every leaf placed on ``mesh``."""
    graphdef, trainable, frozen = split_model(model, lora)
    tr_sh = param_shardings(trainable, mesh)
    trainable = jax.device_put(trainable, tr_sh)
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    ref = None
    if need_ref and not lora:
        ref = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=tr_sh)(trainable)  # a real copy
    opt_sh = opt_state_shardings(tx, trainable, tr_sh, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    rep = replicated(mesh)
    if steer_ld is not None:
        steer_ld = jax.device_put(jnp.asarray(steer_ld), rep)
    step = jax.device_put(jnp.zeros((), jnp.int32), rep)
    rng = jax.device_put(jax.random.PRNGKey(seed), rep)
    return graphdef, TrainState(trainable, frozen, ref, steer_ld, opt_state, step, rng)
