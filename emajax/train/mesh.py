"""The device mesh a run trains on, and multi-host start-up through ``jax.distributed``.

``distributed: auto`` initialises when the environment says this is one process of many
(a TPU pod slice, or the coordinator variables that ``emajax launch`` and launch/multi_gpu.sh
export); on one host it does nothing, so the same config runs on a laptop CPU and a pod slice.
"""

from __future__ import annotations

import os
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emajax.models.sharding import BATCH_AXES, batch_rows, make_mesh  # noqa: F401  (batch_rows re-exported)

COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_initialized = {"done": False}  # jax.distributed.initialize may be called once per process


class DistributedConfigError(ValueError):
    """Coordinator environment variables that cannot start a multi-process run."""


def coordinator_env(env: Any = None) -> dict[str, Any] | None:
    """``jax.distributed.initialize`` arguments from the JAX_* variables, None when none is set.

    Partial or malformed sets are errors naming what is missing: a process that silently ran alone
    would train on its own while the others wait for it."""
    env = os.environ if env is None else env
    present = {k: env[k] for k in COORDINATOR_VARS if env.get(k)}
    if not present:
        return None
    missing = [k for k in COORDINATOR_VARS if k not in present]
    if missing:
        raise DistributedConfigError(
            f"{', '.join(sorted(present))} set but {', '.join(missing)} not: a multi-process run needs all of "
            f"{', '.join(COORDINATOR_VARS)} (`emajax launch` and launch/multi_gpu.sh export them)")
    addr = present["JAX_COORDINATOR_ADDRESS"]
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedConfigError(f"JAX_COORDINATOR_ADDRESS={addr!r}: expected HOST:PORT")
    try:
        n, i = int(present["JAX_NUM_PROCESSES"]), int(present["JAX_PROCESS_ID"])
    except ValueError:
        raise DistributedConfigError(f"JAX_NUM_PROCESSES={present['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                                     f"{present['JAX_PROCESS_ID']!r} must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise DistributedConfigError(f"JAX_PROCESS_ID={i} must be in 0..JAX_NUM_PROCESSES-1 "
                                     f"(JAX_NUM_PROCESSES={n})")
    return {"coordinator_address": addr, "num_processes": n, "process_id": i}


def maybe_initialize_distributed(mode: str) -> None:
    """``true``: always initialise; ``auto``: when coordinator env vars or a multi-host TPU are present.

    On CPU the cross-process collectives run over gloo."""
    if mode == "false" or _initialized["done"]:
        return
    kw = coordinator_env()
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if mode == "true" or kw is not None or tpu_pod:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except (AttributeError, ValueError):  # an install without the option: JAX's own default applies
            pass
        jax.distributed.initialize(**(kw or {}))
        _initialized["done"] = True


def distributed_started() -> bool:
    """Whether this process has joined a multi-process JAX system (:func:`maybe_initialize_distributed`)."""
    return _initialized["done"]


def build_mesh(mesh_cfg: Any) -> Mesh:
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, dcn_data=mesh_cfg.dcn_data,
                     dcn_fsdp=mesh_cfg.dcn_fsdp, allow_unused=mesh_cfg.allow_unused)


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """[A, B, T] batches: micro-batch axis replicated, rows over (data, fsdp)."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Place a host array that every process holds in full (the batcher is deterministic) as a global array."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
