"""The Interleaving++ score of one example from its NLLs (pure numpy: select uses it without jax).

    s = (mean_k NLL_mis_k - NLL_aligned) / (NLL_aligned + epsilon)

Dividing by the aligned NLL (+ epsilon, which keeps near-zero NLLs from exploding) makes the gap
relative: a long, generally unlikely answer does not win merely by being unlikely under every model.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DEFAULT_EPSILON = 1.0


def ensemble_score(nll_aligned_n: Any, nll_misaligned_nk: Any, *, epsilon: float = DEFAULT_EPSILON,
                   names: Sequence[str] | None = None, leave_out: Sequence[str] = ()) -> np.ndarray:
    """s = (mean_k NLL_mis_k - NLL_aligned) / (NLL_aligned + epsilon), over the models not left out.

    ``leave_out`` names ensemble members to drop (e.g. the domain being trained on); NaN NLLs (chats with
    no answer token) give NaN scores.
    """
    a = np.asarray(nll_aligned_n, np.float64)
    m = np.asarray(nll_misaligned_nk, np.float64).reshape(a.shape[0], -1)
    keep = np.ones(m.shape[1], bool)
    if leave_out:
        if names is None or len(names) != m.shape[1]:
            raise ValueError(f"leave_out needs one name per misaligned model ({m.shape[1]}), got {names}")
        unknown = [n for n in leave_out if n not in names]
        if unknown:
            raise ValueError(f"leave-out model(s) {unknown} not in the ensemble {list(names)}")
        keep = np.array([n not in leave_out for n in names])
    if not keep.any():
        raise ValueError("leave_out removes every misaligned model")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return (m[:, keep].mean(axis=1) - a) / (a + epsilon)
