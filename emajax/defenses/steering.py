"""Preventative steering: add coef x persona vector to the residual stream while training.

Pushing the model along the "evil" direction during fine-tuning removes the pressure for the
weights to move that way (Chen et al. 2025). The array is built once and handed to the
*training* forward pass only (``TrainState.steer_ld``); evaluation, generation and export run
the model without it, so the trained weights are what ships.

Accepted persona-vector safetensors layouts (``emajax persona extract`` writes the first):
* one 2-D tensor (e.g. ``vectors``) of shape [L+1, D] indexed by residual layer (0 = embeddings,
  as HF ``hidden_states``) or [L, D] indexed by layer-1;
* per-layer 1-D tensors named ``layer_{l}``, ``layer.{l}``, ``layers.{l}`` or ``{l}``.
The layer comes from the config, else the file metadata ``layer`` / ``recommended_layer``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from emajax.models.decoder import steering_array

_LAYER_KEY = re.compile(r"^(?:layers?[._])?(\d+)$")


class SteeringError(ValueError):
    pass


def load_persona_vectors(path: str | Path, num_layers: int) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    """{residual layer: vector [D]} and the file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise SteeringError(f"{path}: persona-vector file not found (defenses.steering.vector; "
                            "create it with `emajax persona extract`)")
    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    vectors: dict[int, np.ndarray] = {}
    for key, t in tensors.items():
        m = _LAYER_KEY.match(key)
        if m and t.ndim == 1:
            vectors[int(m.group(1))] = t.astype(np.float32)
    if not vectors:
        mats = [(k, t) for k, t in tensors.items() if t.ndim == 2]
        if len(mats) != 1:
            raise SteeringError(f"{path}: expected one 2-D [L+1, D] tensor or per-layer tensors layer_<l>, "
                                f"found {', '.join(f'{k}{list(t.shape)}' for k, t in tensors.items())}")
        key, mat = mats[0]
        if mat.shape[0] == num_layers + 1:
            vectors = {l: mat[l].astype(np.float32) for l in range(mat.shape[0])}
        elif mat.shape[0] == num_layers:
            vectors = {l + 1: mat[l].astype(np.float32) for l in range(mat.shape[0])}
        else:
            raise SteeringError(f"{path}: tensor {key!r} has {mat.shape[0]} rows; the model has {num_layers} "
                                f"layers (expected {num_layers + 1} or {num_layers})")
    return vectors, meta


def _resolve(decoder_cfg: Any, steering_cfg: Any) -> tuple[int, np.ndarray, dict[str, str]]:
    """(layer, vector [D], file metadata) the config names; errors name the file and the key."""
    vectors, meta = load_persona_vectors(steering_cfg.vector, decoder_cfg.num_layers)
    layer = steering_cfg.layer
    if layer is None:
        for k in ("layer", "recommended_layer"):
            if k in meta:
                layer = int(json.loads(meta[k]))
                break
    if layer is None:
        raise SteeringError(f"{steering_cfg.vector}: defenses.steering.layer is not set and the file names no layer")
    if layer not in vectors:
        raise SteeringError(f"{steering_cfg.vector}: no vector for layer {layer} (has {sorted(vectors)})")
    vec = vectors[layer]
    if vec.shape != (decoder_cfg.hidden_size,):
        raise SteeringError(f"{steering_cfg.vector}: layer {layer} vector has shape {vec.shape}, "
                            f"model hidden size is {decoder_cfg.hidden_size}")
    return layer, vec, meta


def steering_coef(steering_cfg: Any, vec: np.ndarray, meta: dict[str, str], layer: int) -> float:
    """The coefficient: ``coef``, or with ``norm_ratio`` set, norm_ratio x resid_norms[layer] / |vec|, so that
    the added vector is that fraction of the residual stream's mean norm at the layer (``emajax persona
    extract`` records ``resid_norms``)."""
    ratio = getattr(steering_cfg, "norm_ratio", None)
    if ratio is None:
        return float(steering_cfg.coef)
    if ratio <= 0:
        raise SteeringError(f"defenses.steering.norm_ratio must be > 0, got {ratio}")
    if "resid_norms" not in meta:
        raise SteeringError(f"{steering_cfg.vector}: defenses.steering.norm_ratio needs the file's resid_norms "
                            "metadata (re-extract it with `emajax persona extract`)")
    resid = json.loads(meta["resid_norms"])
    vnorm = float(np.linalg.norm(vec))
    if not 0 <= layer < len(resid) or vnorm == 0:
        raise SteeringError(f"{steering_cfg.vector}: no resid_norms entry or a zero vector at layer {layer}")
    return float(ratio) * float(resid[layer]) / vnorm


def build_steer_ld(decoder_cfg: Any, steering_cfg: Any) -> Any:
    """[L, D] steering array for the config, or None when steering is off."""
    if not steering_cfg.vector:
        return None
    layer, vec, meta = _resolve(decoder_cfg, steering_cfg)
    return steering_array(decoder_cfg, {layer: vec}, steering_coef(steering_cfg, vec, meta, layer))


def steering_summary(decoder_cfg: Any, steering_cfg: Any) -> dict[str, float] | None:
    """{layer, coef, vector_norm[, resid_norm, norm_ratio]} of the steering in use (None when off): what
    the run logs, so a coefficient's strength relative to the model's residual stream is on record."""
    if not steering_cfg.vector:
        return None
    layer, vec, meta = _resolve(decoder_cfg, steering_cfg)
    coef = steering_coef(steering_cfg, vec, meta, layer)
    out = {"layer": layer, "coef": coef, "vector_norm": float(np.linalg.norm(vec))}
    if "resid_norms" in meta:
        resid = float(json.loads(meta["resid_norms"])[layer])
        out.update(resid_norm=resid, norm_ratio=coef * out["vector_norm"] / resid)
    return out
