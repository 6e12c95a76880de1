"""Parameter and batch shardings over the ('data', 'fsdp', 'tensor') mesh.

One rule table maps every decoder parameter to mesh axes, so the same config runs on one
CPU, a simulated 8-device CPU mesh, a multi-GPU host or a TPU pod slice: ``fsdp`` shards the
model dimension of each weight (ZeRO-3 style), ``tensor`` shards heads / MLP width / vocab
(Megatron style), ``data`` replicates parameters. An axis that does not divide a dimension
is dropped for that parameter (replicated) rather than failing.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both

# (module, param) -> logical spec for the trailing dims (a leading 'layers' dim gets None).
# "in"/"out" name the kernel's [in, out] dims.
_COLUMN = {"q", "k", "v", "gate", "up"}  # out dim is heads / MLP width -> tensor
_ROW = {"o", "down"}  # in dim is heads / MLP width -> tensor


def _logical(path: tuple[str, ...], ndim: int) -> tuple[Any, ...]:
    name = path[-1]
    mod = path[-2] if len(path) >= 2 else ""
    if path == ("embed",):
        return ("tensor", "fsdp")
    if path == ("lm_head",):
        return ("fsdp", "tensor")
    if name == "kernel" and mod in _COLUMN:
        spec = ("fsdp", "tensor")
    elif name == "kernel" and mod in _ROW:
        spec = ("tensor", "fsdp")
    elif name == "bias" and mod in _COLUMN:
        spec = ("tensor",)
    elif name == "lora_a" and mod in _COLUMN:
        spec = ("fsdp", None)
    elif name == "lora_b" and mod in _COLUMN:
        spec = (None, "tensor")
    elif name == "lora_a" and mod in _ROW:
        spec = ("tensor", None)
    elif name == "lora_b" and mod in _ROW:
        spec = (None, "fsdp")
    else:  # norms, o/down bias, anything small
        spec = ()
    spec = (None,) * (ndim - len(spec)) + tuple(spec)
    return spec


def _fit(spec: tuple[Any, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    out = []
    for ax, dim in zip(spec, shape):
        if ax is not None and dim % mesh.shape[ax] != 0:
            ax = None
        out.append(ax)
    return P(*out)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names  # nnx.Variable leaves end in .value


def param_specs(state: nnx.State, mesh: Mesh) -> Any:
    """PartitionSpec tree matching ``state`` (a model state, or its abstract ShapeDtypeStructs)."""

    def one(path: tuple[Any, ...], leaf: Any) -> P:
        shape = tuple(getattr(leaf, "shape", ()))
        return _fit(_logical(_path_names(path), len(shape)), shape, mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def param_shardings(state: nnx.State, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Any = None) -> Mesh:
    """A ('data','fsdp','tensor') mesh; use -1 for one axis to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = len(devices) // known
    n = int(np.prod(sizes))
    if n > len(devices) or n <= 0:
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {n} devices, "
                         f"{len(devices)} available")
    arr = np.asarray(devices[:n], dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
