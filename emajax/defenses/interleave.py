"""Interleaving: mix a safe dataset into the task data at ratio p, deterministically by seed.

p is the fraction of the *mixed* set that is safe data: with n task examples we add
n_safe = round(p * n / (1 - p)) safe ones, so |n_safe - p * (n + n_safe)| <= 1 (the ratio holds
within one example). Safe examples are drawn without replacement from a seeded permutation of
the pool (cycling through fresh permutations if the pool is smaller than needed). An
Interleaving++ selection file from ``emajax select`` is just a smaller, chosen pool.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def num_safe(n_task: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"interleave ratio must be in [0, 1), got {ratio}")
    return int(round(ratio * n_task / (1.0 - ratio)))


def draw_safe(pool: Sequence[Any], n: int, seed: int) -> list[Any]:
    """n items of ``pool`` in a seeded order (without replacement until the pool is exhausted)."""
    if n and not pool:
        raise ValueError("interleave: the safe pool is empty")
    rng = np.random.default_rng([int(seed), 0x5AFE])
    out: list[Any] = []
    while len(out) < n:
        perm = rng.permutation(len(pool))
        out.extend(pool[int(i)] for i in perm[: n - len(out)])
    return out


def interleave(task: Sequence[Any], pool: Sequence[Any], ratio: float, seed: int) -> tuple[list[Any], list[bool]]:
    """(mixed examples, is_safe flags): task examples followed by the drawn safe ones (the
    training order is shuffled later, per epoch, by the batcher)."""
    safe = draw_safe(pool, num_safe(len(task), ratio), seed)
    return [*task, *safe], [False] * len(task) + [True] * len(safe)
