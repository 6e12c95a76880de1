"""LDIFS: squared L2 distance between trained and reference intermediate features.

Mukhoti et al. 2023 ("Fine-tuning can cripple your foundation model; preserving features may be the
solution") regularise fine-tuning with the distance between the fine-tuned and the original model's
intermediate features; Kaczér et al. (ICML 2026) apply it against emergent misalignment with 5 evenly
spaced decoder layers, each layer's features flattened and L2-normalised.

The point of the regulariser is its gradient *through the trained model's features*: here only the
reference features are stop_gradient'ed. (The paper's released PyTorch code extracts both feature sets
under no_grad/detach, so the term is a constant and training is plain SFT; see docs/losses.md.)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_EPS = 1e-12  # floor on the squared norm: an all-padding example normalises to 0, with finite grads


def ldifs_layers(num_layers: int, n: int = 5) -> tuple[int, ...]:
    """Residual indices (1..L, HF ``hidden_states`` convention) of n evenly spaced decoder blocks.

        blocks = floor(linspace(0, L - 1, n)) (0-based block index, as torch.linspace(...).long()
        in the released code);  residual index = block + 1 (the stream after that block).

    First and last block always included, e.g. L=30, n=5 -> (1, 8, 15, 22, 30).
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
        raise ValueError(f"emajax.losses.ldifs_layers: num_layers must be a positive int, got {num_layers!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= num_layers:
        raise ValueError(f"emajax.losses.ldifs_layers: n must be an int in [1, num_layers={num_layers}], got {n!r}")
    blocks = np.floor(np.linspace(0.0, num_layers - 1, int(n))).astype(np.int64)
    return tuple(int(i) + 1 for i in blocks)


def _normalised_flat(f_btd: jax.Array, m_bt: jax.Array | None) -> jax.Array:
    """Per example: zero padded positions, flatten (T, D), divide by the L2 norm -> [B, T*D] fp32."""
    f = f_btd.astype(jnp.float32)
    if m_bt is not None:
        f = f * m_bt[..., None]
    flat = f.reshape(f.shape[0], -1)
    sq = jnp.sum(flat * flat, axis=-1, keepdims=True)
    return flat * jax.lax.rsqrt(jnp.maximum(sq, _EPS))


def ldifs(
    features: Sequence[jax.Array],
    ref_features: Sequence[jax.Array],
    mask_bt: jax.Array | None = None,
    *,
    layer_reduction: str = "sum",
    denom: jax.Array | float | None = None,
) -> jax.Array:
    """LDIFS feature distance, fp32 scalar.

    For each layer l with trained features F_l [B, T, D] and reference features R_l (stop_gradient),
    and per-example mask m [B, T] (1 on real tokens; padding rows zeroed before normalising):

        f_l[b] = vec(m[b] * F_l[b]) / ||vec(m[b] * F_l[b])||_2          (flattened over T and D)
        r_l[b] = vec(m[b] * R_l[b]) / ||vec(m[b] * R_l[b])||_2
        d[b]   = sum_l ||f_l[b] - r_l[b]||_2^2                          (layer_reduction="sum")
               = ||concat_l f_l[b] - concat_l r_l[b]||_2^2              (the paper's concatenated features)
        ldifs  = sum of d[b] over examples b with at least one unmasked token / max(N, 1)
                 N = denom, default the number of such examples (a mean over them)

    Each layer term lies in [0, 4]. "sum" (default) is the squared distance of the concatenated,
    per-layer-normalised feature vectors as the LDIFS papers define it, so their weights (e.g. 1.0)
    keep their meaning; "mean" divides by the number of layers, making the scale independent of how
    many layers are used. Gradients flow into ``features`` (and whatever produced them), not into
    ``ref_features``. ``denom`` (no gradient) is the example count of a larger batch this one is part of
    (gradient accumulation): the micro-batches' values then sum to the mean over all its examples.
    """
    features = tuple(features)
    ref_features = tuple(ref_features)
    if not features:
        raise ValueError("emajax.losses.ldifs: features is empty (need at least one [B, T, D] layer)")
    if len(features) != len(ref_features):
        raise ValueError(
            f"emajax.losses.ldifs: got {len(features)} trained layers but {len(ref_features)} reference layers"
        )
    if layer_reduction not in ("sum", "mean"):
        raise ValueError(f"emajax.losses.ldifs: layer_reduction must be 'sum' or 'mean', got {layer_reduction!r}")
    b = features[0].shape[0]
    for i, (f, r) in enumerate(zip(features, ref_features)):
        if f.ndim != 3 or f.shape != r.shape or f.shape[0] != b:
            raise ValueError(
                f"emajax.losses.ldifs: layer {i}: features {f.shape} and ref_features {r.shape} must be the "
                f"same [B, T, D] with B={b}"
            )
    m = None
    if mask_bt is not None:
        if tuple(mask_bt.shape) != tuple(features[0].shape[:2]):
            raise ValueError(
                f"emajax.losses.ldifs: mask_bt must be [B, T] = {tuple(features[0].shape[:2])}, got {mask_bt.shape}"
            )
        m = jax.lax.stop_gradient(mask_bt).astype(jnp.float32)

    d_b = jnp.zeros((b,), jnp.float32)
    for f, r in zip(features, ref_features):
        diff = _normalised_flat(f, m) - _normalised_flat(jax.lax.stop_gradient(r), m)
        d_b = d_b + jnp.sum(diff * diff, axis=-1)
    if layer_reduction == "mean":
        d_b = d_b / len(features)
    valid_b = jnp.ones((b,), jnp.float32) if m is None else (jnp.sum(m, axis=-1) > 0).astype(jnp.float32)
    n = jnp.sum(valid_b) if denom is None else jax.lax.stop_gradient(jnp.asarray(denom, jnp.float32))
    return jnp.sum(d_b * valid_b) / jnp.maximum(n, 1.0)
