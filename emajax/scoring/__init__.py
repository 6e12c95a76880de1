"""Interleaving++ scoring: perplexity gap between an aligned model and misaligned ones, and selection.

* ``score`` — ``Scorer`` (one base + LoRA ensemble, jitted per-example answer NLL) and ``score_pool``
  (resumable, sharded, length-bucketed bulk scoring); ``adapters`` — PEFT adapters padded to one layout;
  ``plan`` — pool reading, tokenization, shard/batch plan.
* ``formula`` — ``ensemble_score``; ``shards`` — the manifest + shard files of an output directory.
* ``select`` — top-k / top-fraction / random selection with the refusal filter, dedupe, length bounds.

Only the numpy-level pieces are imported here, so ``emajax select`` does not load jax.
"""

from emajax.scoring.formula import DEFAULT_EPSILON, ensemble_score
from emajax.scoring.shards import read_manifest, read_scores

__all__ = ["DEFAULT_EPSILON", "ensemble_score", "read_manifest", "read_scores"]
