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
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emajax.losses.rows import BATCH_AXES, activation_mesh, batch_rows, constrain_rows  # noqa: F401  (re-exported)

MESH_AXES = ("data", "fsdp", "tensor")

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
    # LoRA factors: the dimension shared with the kernel follows it; the rank dimension takes fsdp where
    # the other one is tensor's, so adapters and their optimiser moments are not replicated over fsdp.
    elif name == "lora_a" and mod in _COLUMN:
        spec = ("fsdp", None)
    elif name == "lora_b" and mod in _COLUMN:
        spec = ("fsdp", "tensor")
    elif name == "lora_a" and mod in _ROW:
        spec = ("tensor", "fsdp")
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


def param_specs(state: Any, mesh: Mesh) -> Any:
    """PartitionSpec tree matching ``state`` (an ``nnx.State``, or its abstract ShapeDtypeStructs)."""

    def one(path: tuple[Any, ...], leaf: Any) -> P:
        shape = tuple(getattr(leaf, "shape", ()))
        return _fit(_logical(_path_names(path), len(shape)), shape, mesh)

    return jax.tree_util.tree_map_with_path(one, state)


def param_shardings(state: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(state, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Any = None, *, dcn_data: int = 1,
              dcn_fsdp: int = 1, allow_unused: bool = False) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: every device of every process).

    One of ``data``/``fsdp``/``tensor`` may be -1: the devices left per slice. Device order comes from
    ``jax.make_mesh`` (the accelerator's topology: rings on TPU, NVLink islands on GPU). ``dcn_data`` /
    ``dcn_fsdp`` > 1 build a hybrid mesh for multi-slice TPUs (or hosts joined by a slower network,
    where each process is a slice): the inner sizes are per slice, the mesh axes are their products
    (``jax.experimental.mesh_utils.create_hybrid_device_mesh``). A mesh smaller than ``devices`` is an
    error unless ``allow_unused``: silently training on a fraction of the hardware is never wanted."""
    from jax.experimental import mesh_utils

    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    dcn = [dcn_data, dcn_fsdp, 1]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh data={data} fsdp={fsdp} tensor={tensor}: sizes must be positive, and at most "
                         f"one may be -1 (the remaining devices)")
    if dcn_data < 1 or dcn_fsdp < 1:
        raise ValueError(f"mesh dcn_data={dcn_data} dcn_fsdp={dcn_fsdp}: must be >= 1")
    n_dcn = dcn_data * dcn_fsdp
    per_slice = len(devices) // n_dcn
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = max(per_slice // known, 1)
    n = int(np.prod(sizes)) * n_dcn
    what = f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}" + (
        f" x dcn data={dcn_data} fsdp={dcn_fsdp}" if n_dcn > 1 else "")
    if n > len(devices):
        raise ValueError(f"{what} needs {n} devices, {len(devices)} available")
    if n < len(devices) and not allow_unused:
        raise ValueError(f"{what} uses {n} of the {len(devices)} devices; use them all (e.g. mesh.fsdp=-1) "
                         f"or set mesh.allow_unused=true")
    idle = sorted({d.process_index for d in devices} - {d.process_index for d in devices[:n]})
    if idle and n_dcn == 1:
        raise ValueError(f"{what} uses {n} of the {len(devices)} devices and none of process(es) "
                         f"{', '.join(map(str, idle))}: in a multi-process run every process must hold part of the "
                         f"mesh (e.g. mesh.fsdp=-1)")
    auto = (jax.sharding.AxisType.Auto,) * 3
    if n_dcn > 1:
        # Multi-slice TPUs name their slices; elsewhere (GPU hosts, CPU processes) each process is one.
        by_process = len({getattr(d, "slice_index", 0) for d in devices}) == 1
        arr = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices, process_is_granule=by_process)
        return Mesh(arr, MESH_AXES, axis_types=auto)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices[:n])
