"""Loss terms for fine-tuning with in-training defenses; depends only on jax, optax and numpy.

* ``token_nll`` / ``masked_ce`` / ``masked_nll_sums`` (forward-only, masked positions only) — token cross-entropy from final hidden states and the output
  projection, logits computed in sequence chunks (never a full [B, T, V] tensor, forward or backward).
* ``token_kl`` — masked per-token KL(p_theta || p_ref) (or the reverse), chunked the same way;
  ``ce_and_kl`` — both at once, computing the trained logits once; ``ce_plus_kl`` — their weighted sum
  as one differentiable value (one product back through the output matrix per chunk, not two).
* ``ldifs`` / ``ldifs_layers`` — L2 distance between normalised intermediate features, with gradients
  through the trained features.
* ``compose`` — weighted total plus every term as a metric.

Formulas are in each function's docstring and in docs/losses.md.
"""

from emajax.losses.ce import default_seq_chunk, masked_ce, masked_nll_sums, token_nll
from emajax.losses.compose import compose
from emajax.losses.kl import ce_and_kl, ce_plus_kl, token_kl
from emajax.losses.ldifs import ldifs, ldifs_layers

__all__ = [
    "ce_and_kl",
    "ce_plus_kl",
    "compose",
    "default_seq_chunk",
    "ldifs",
    "ldifs_layers",
    "masked_ce",
    "masked_nll_sums",
    "token_kl",
    "token_nll",
]
