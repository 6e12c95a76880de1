"""Which process of a multi-process run (a pod slice, a multi-GPU host, `emajax launch`) does the work that
is not SPMD, and where the others wait for it.

Programs that train over the whole mesh and also do single-device work around it (the guard's screen, gate
and decision; the grid's selection and evaluation) let process 0 do that work and write its files once,
while the other processes wait at a barrier and then read what it wrote (the run directory is shared:
one filesystem seen by every host). With one process every function here is a no-op or True.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def start(mode: str = "auto") -> None:
    """``jax.distributed.initialize`` when the environment names a multi-process run (``emajax.train.mesh``);
    call it before any JAX computation: asking for the process index first would fix a one-process JAX."""
    from emajax.train.mesh import maybe_initialize_distributed

    maybe_initialize_distributed(mode)


def is_main() -> bool:
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` (anything ``json`` writes) on every process; the others pass anything (None)."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    raw = json.dumps(value).encode() if is_main() else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(raw))))
    buf = np.frombuffer(raw, np.uint8) if is_main() else np.zeros(n, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


def main_first(name: str, fn: Callable[[], T], then: Callable[[], T] | None = None) -> T:
    """Process 0 runs ``fn``; the others wait for it at barrier ``name`` and then run ``then`` (default:
    ``fn`` again, for a resumable step that finds its result on disk and only reads it)."""
    import jax

    if jax.process_count() == 1:
        return fn()
    out = fn() if is_main() else None
    barrier(name)
    return out if is_main() else (then or fn)()  # type: ignore[return-value]


__all__ = ["barrier", "broadcast", "is_main", "main_first", "start"]
