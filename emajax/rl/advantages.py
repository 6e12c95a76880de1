"""Group-normalised advantages of GRPO: each completion's reward against its prompt's group.

Rows come grouped: the G completions of prompt p are rows p*G .. p*G + G - 1. With r_i a row's reward
and mu_g, sigma_g its group's mean and standard deviation,

    A_i = (r_i - mu_g) / (sigma + eps)       scale = "group": sigma = sigma_g (Shao et al. 2024, GRPO)
                                             scale = "batch": sigma = the whole batch's std
    A_i =  r_i - mu_g                        scale = "none"  (Liu et al. 2025, Dr. GRPO)

The standard deviation is the unbiased one (N - 1 in the denominator) and eps = 1e-4, as TRL's
GRPOTrainer computes them, so the two implementations see the same advantages. Pure jax (works on
NumPy inputs too).
"""

from __future__ import annotations

import jax.numpy as jnp

from emajax.train.choices import ScaleRewards

EPS = 1e-4


def _unbiased_std(x: jnp.ndarray, axis=None) -> jnp.ndarray:
    n = x.size if axis is None else x.shape[axis]
    mean = jnp.mean(x, axis=axis, keepdims=True)
    return jnp.sqrt(jnp.sum((x - mean) ** 2, axis=axis) / max(n - 1, 1))


def group_advantages(rewards_n: jnp.ndarray, group_size: int, scale: str = "group",
                     eps: float = EPS) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(advantages [N], per-group reward std [N // G]) for rewards [N] in groups of ``group_size``."""
    scale = ScaleRewards(scale)
    r = jnp.asarray(rewards_n, jnp.float32)
    if r.ndim != 1 or group_size < 2 or r.shape[0] % group_size:
        raise ValueError(f"need rewards [N] with N a multiple of a group size >= 2, got shape {r.shape}, "
                         f"group size {group_size}")
    r_pg = r.reshape(-1, group_size)
    centred_pg = r_pg - jnp.mean(r_pg, axis=1, keepdims=True)
    std_p = _unbiased_std(r_pg, axis=1)
    if scale is ScaleRewards.group:
        adv_pg = centred_pg / (std_p[:, None] + eps)
    elif scale is ScaleRewards.batch:
        adv_pg = centred_pg / (_unbiased_std(r) + eps)
    else:
        adv_pg = centred_pg
    return adv_pg.reshape(-1), std_p
