"""The misaligned ensemble as inputs of one compiled forward: PEFT adapters padded to a common shape.

Swapping an adapter must not recompile, so every adapter is mapped onto ONE LoRA parameter layout:
rank = the largest rank in the ensemble, targets = the union of their target modules, scaling 1.
Each adapter's A is zero-padded on the rank axis and its B is multiplied by the adapter's own scaling
(alpha / r, or alpha / sqrt(r) with rsLoRA) and zero-padded; modules or layers an adapter does not
touch get zeros. The padded update ``x A' B'`` equals the adapter's ``s x A B`` exactly, so the same
jitted function scores every adapter with the adapter's arrays as plain inputs.

A misaligned model is named ``NAME=PATH`` (or just ``PATH``: the name is the directory name); PATH is a
PEFT adapter directory (adapter_config.json) applied to the aligned base, or a full model (any name
``emajax.models.hub.load_model`` accepts) whose weights replace the base's.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from emajax import atomic
from emajax.models.lora import HF_MODULE_NAMES, LoraConfig

_INV_NAMES = {v: k for k, v in HF_MODULE_NAMES.items()}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """A PEFT adapter directory emajax cannot score with (the message names file and field)."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One ensemble member: its name (for leave-one-out), where it lives, and ``adapter`` or ``full``."""

    name: str
    path: str
    kind: str


def parse_model_spec(text: str) -> ModelSpec:
    """``NAME=PATH`` or ``PATH``; an adapter when PATH/adapter_config.json exists, else a full model."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = "", text
    if not path:
        raise AdapterError(f"misaligned model {text!r}: empty path")
    p = Path(path).expanduser()
    name = name or p.name or path
    kind = "adapter" if (p / "adapter_config.json").is_file() else "full"
    return ModelSpec(name=name, path=str(p.resolve()) if p.exists() else path, kind=kind)


@dataclasses.dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read to host memory: A [r, in] and B [out, r] per (layer, module)."""

    path: Path
    rank: int
    scaling: float
    a: dict[tuple[int, str], np.ndarray]  # (layer, emajax module name) -> [r, in]
    b: dict[tuple[int, str], np.ndarray]  # -> [out, r]

    @property
    def targets(self) -> set[str]:
        return {m for _, m in self.a}


def read_peft_adapter(adapter_dir: str | Path) -> PeftAdapter:
    """Read adapter_config.json + adapter_model.safetensors; refuse options the padding cannot express."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    cfg_path = d / "adapter_config.json"
    ac = atomic.read_json(cfg_path, AdapterError)
    if not isinstance(ac, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    if ac.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: field 'peft_type' = {ac.get('peft_type')!r}; only LORA adapters are supported")
    for field, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(ac.get(field, ok)) != ok:
            raise AdapterError(f"{cfg_path}: field {field!r} = {ac.get(field)!r} is not supported")
    if ac.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: field 'bias' = {ac.get('bias')!r}; only 'none' is supported")
    for field in ("rank_pattern", "alpha_pattern"):
        if ac.get(field):
            raise AdapterError(f"{cfg_path}: field {field!r} (per-module ranks) is not supported")
    if ac.get("modules_to_save"):
        raise AdapterError(f"{cfg_path}: field 'modules_to_save' = {ac['modules_to_save']!r} is not supported")
    try:
        r, alpha = int(ac["r"]), float(ac["lora_alpha"])
    except KeyError as e:
        raise AdapterError(f"{cfg_path}: field {e.args[0]!r} is missing") from None
    if r <= 0:
        raise AdapterError(f"{cfg_path}: field 'r' must be positive, got {r}")
    scaling = alpha / (math.sqrt(r) if ac.get("use_rslora", False) else r)
    st = d / "adapter_model.safetensors"
    if not st.is_file():
        raise AdapterError(f"{st}: file not found")
    a: dict[tuple[int, str], np.ndarray] = {}
    b: dict[tuple[int, str], np.ndarray] = {}
    with safe_open(str(st), framework="numpy") as f:
        for key in f.keys():
            m = _KEY.search(key)
            if m is None:
                raise AdapterError(f"{st}: tensor {key!r} is not a LoRA A/B weight of a decoder layer projection")
            layer, module, which = int(m.group(1)), m.group(2), m.group(3)
            if module not in _INV_NAMES:
                raise AdapterError(f"{st}: tensor {key!r} targets {module!r}; supported: {sorted(_INV_NAMES)}")
            x = np.asarray(f.get_tensor(key), np.float32)
            want_axis = 0 if which == "A" else 1
            if x.ndim != 2 or x.shape[want_axis] != r:
                raise AdapterError(f"{st}: tensor {key!r} has shape {list(x.shape)}; expected rank {r} on axis "
                                   f"{want_axis}")
            (a if which == "A" else b)[(layer, _INV_NAMES[module])] = x
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[0]
        raise AdapterError(f"{st}: layer {missing[0]} module {missing[1]!r} has only one of lora_A / lora_B")
    if not a:
        raise AdapterError(f"{st}: no LoRA tensors")
    return PeftAdapter(path=d, rank=r, scaling=scaling, a=a, b=b)


def ensemble_lora_config(adapters: Sequence[PeftAdapter]) -> LoraConfig:
    """The one padded layout: max rank, union of targets, scaling 1 (alpha = rank, no rsLoRA)."""
    rank = max(ad.rank for ad in adapters)
    targets = tuple(t for t in HF_MODULE_NAMES if any(t in ad.targets for ad in adapters))
    return LoraConfig(rank=rank, alpha=float(rank), rslora=False, targets=targets, dtype="float32")


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return names[:-1] if names and names[-1] == "value" else names


def padded_lora_state(adapter: PeftAdapter, lora_abstract: nnx.State, shardings: Any = None) -> nnx.State:
    """``adapter`` as arrays shaped like ``lora_abstract`` (the ensemble layout), B pre-scaled.

    ``shardings`` (a matching tree of shardings, or None for the default device) places the arrays.
    """

    def build(path: tuple[Any, ...], leaf: Any) -> np.ndarray:
        names = _path_names(path)
        module, which = names[-2], names[-1]
        n_layers, din_or_r, r_or_dout = leaf.shape
        out = np.zeros(leaf.shape, np.float32)
        for layer in range(n_layers):
            key = (layer, module)
            if key not in adapter.a:
                continue
            if which == "lora_a":  # [in, R] <- A^T [in, r]
                at = adapter.a[key].T
                if at.shape[0] != din_or_r:
                    raise AdapterError(f"{adapter.path}: layer {layer} {module!r} lora_A has input size "
                                       f"{at.shape[0]}, the model expects {din_or_r}")
                out[layer, :, : at.shape[1]] = at
            else:  # [R, out] <- s B^T [r, out]
                bt = adapter.scaling * adapter.b[key].T
                if bt.shape[1] != r_or_dout:
                    raise AdapterError(f"{adapter.path}: layer {layer} {module!r} lora_B has output size "
                                       f"{bt.shape[1]}, the model expects {r_or_dout}")
                out[layer, : bt.shape[0], :] = bt
        if max((l for l, _ in adapter.a), default=-1) >= leaf.shape[0]:
            raise AdapterError(f"{adapter.path}: adapter has layers beyond the model's {leaf.shape[0]}")
        return out.astype(leaf.dtype)

    host = jax.tree_util.tree_map_with_path(build, lora_abstract)
    if shardings is None:
        return jax.tree.map(jax.numpy.asarray, host)
    return jax.tree.map(jax.device_put, host, shardings)
