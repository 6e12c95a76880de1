"""The device mesh a run trains on, and multi-host start-up through ``jax.distributed``.

``distributed: auto`` initialises when the environment says this is one process of many
(a TPU pod slice, or the coordinator variables that launch/multi_gpu.sh exports); on one host
it does nothing, so the same config runs on a laptop CPU and a pod slice.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emajax.models.sharding import BATCH_AXES, make_mesh

_MULTI_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")
_initialized = {"done": False}  # jax.distributed.initialize may be called once per process


def maybe_initialize_distributed(mode: str) -> None:
    """``true``: always initialise; ``auto``: when coordinator env vars or a multi-host TPU are present."""
    if mode == "false" or _initialized["done"]:
        return
    multi = any(os.environ.get(k) for k in _MULTI_ENV) or int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if mode == "true" or multi or tpu_pod:
        kw = {}
        if os.environ.get("JAX_COORDINATOR_ADDRESS"):
            kw = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
        jax.distributed.initialize(**kw)
        _initialized["done"] = True


def build_mesh(mesh_cfg: Any) -> Mesh:
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def batch_rows(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[A, B, T] batches: micro-batch axis replicated, rows over (data, fsdp)."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full (the batcher is deterministic) as a global array."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
