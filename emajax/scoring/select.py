"""Choose the safe chats to interleave: top by score (Interleaving+ / ++), or at random (plain Interleaving).

The paper's three recipes over one general pool (the released code's ``filter_adapter_metric.py``):
plain Interleaving draws at random with no filter; Interleaving+ takes the top by the perplexity-gap
score; Interleaving++ does the same after removing refusals. Filters run before ranking, in this order:
chats with no scored answer token (NaN score) are dropped, then refusals (an assistant answer whose
first 10 words contain sorry / apologize / cannot / can't / I'm unable / I am unable — refusals would
teach refusing, not aligned behaviour), then length bounds, then duplicates (same conversation text up
to case and whitespace; the best-scored copy, or the first in pool order, is kept). By default the
refusal filter and dedupe are on when ranking by score and off for a random draw (``refusal_filter`` /
``dedupe`` set them explicitly). ``top_fraction`` is a fraction of the chats that pass the filters.

The output is chat JSONL — each pool record unchanged plus a ``selection`` object (index, score, rank,
method) — which the training config's ``defenses.interleave.data`` reads as its safe pool.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from emajax import atomic
from emajax.scoring.formula import ensemble_score

REFUSAL_WORDS = ("sorry", "apologize", "cannot", "can't", "i'm unable", "i am unable")
REFUSAL_PREFIX_WORDS = 10


class SelectError(ValueError):
    """Inconsistent selection options or inputs."""


def is_refusal(answer: str, n_words: int = REFUSAL_PREFIX_WORDS) -> bool:
    """True when the first ``n_words`` words contain a refusal phrase (case-insensitive, ’ read as ')."""
    head = " ".join(answer.replace("\u2019", "'").lower().split()[:n_words])
    return any(w in head for w in REFUSAL_WORDS)


def answers(messages: Sequence[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


def dedupe_key(messages: Sequence[dict]) -> str:
    return "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].lower().split())}" for m in messages)


@dataclasses.dataclass
class SelectOptions:
    top_k: int | None = None
    top_fraction: float | None = None
    random: bool = False  # pick the count at random (plain Interleaving) instead of by score
    seed: int = 0
    refusal_filter: bool | None = None  # None: on when ranking by score (Interleaving++), off at random
    dedupe: bool | None = None  # None: on when ranking by score, off at random (a plain draw)
    min_words: int | None = None  # bounds on the answer words (all assistant turns)
    max_words: int | None = None
    min_tokens: int | None = None  # bounds on the scored answer tokens (needs scores)
    max_tokens: int | None = None
    leave_out: tuple[str, ...] = ()  # recompute the score without these ensemble members
    epsilon: float | None = None  # recompute the score with this epsilon (default: the run's)

    def filters(self) -> dict[str, bool]:
        """The filters that apply: ``refusal_filter`` and ``dedupe`` as given, else on by score, off at random."""
        return {"refusal_filter": not self.random if self.refusal_filter is None else self.refusal_filter,
                "dedupe": not self.random if self.dedupe is None else self.dedupe}

    def validate(self, have_scores: bool) -> None:
        if (self.top_k is None) == (self.top_fraction is None):
            raise SelectError("give exactly one of top_k (--top-k) and top_fraction (--top-fraction)")
        if self.top_k is not None and self.top_k < 0:
            raise SelectError(f"--top-k must be >= 0, got {self.top_k}")
        if self.top_fraction is not None and not 0.0 <= self.top_fraction <= 1.0:
            raise SelectError(f"--top-fraction must be in [0, 1], got {self.top_fraction}")
        if not have_scores and not self.random:
            raise SelectError("selection by score needs a scores directory (--scores); use --random without one")
        if not have_scores and (self.min_tokens is not None or self.max_tokens is not None or self.leave_out):
            raise SelectError("--min-tokens/--max-tokens/--leave-out need a scores directory (--scores)")


@dataclasses.dataclass
class Selected:
    row: dict  # the pool record
    index: int
    score: float | None
    rank: int


def select(pool: Sequence[Any], scores: dict[str, list] | None, manifest: dict | None,
           opts: SelectOptions) -> tuple[list[Selected], dict[str, Any]]:
    """Selected rows (best first, or in random order) and counts of what each filter removed.

    ``pool`` holds ``emajax.scoring.plan.PoolRow``s; ``scores`` the columns of ``read_scores``.
    """
    opts.validate(scores is not None)
    filters = opts.filters()
    score_of: dict[int, float] = {}
    tokens_of: dict[int, int] = {}
    if scores is not None:
        s = np.asarray(scores["score"], np.float64)
        if opts.leave_out or opts.epsilon is not None:
            names = [m["name"] for m in (manifest or {}).get("misaligned", [])]
            eps = opts.epsilon if opts.epsilon is not None else float((manifest or {}).get("epsilon", 1.0))
            try:
                s = ensemble_score(scores["nll_aligned"], scores["nll_misaligned"], epsilon=eps, names=names,
                                   leave_out=opts.leave_out)
            except ValueError as e:
                raise SelectError(str(e)) from None
        score_of = dict(zip(map(int, scores["index"]), s.tolist()))
        tokens_of = dict(zip(map(int, scores["index"]), map(int, scores["n_tokens"])))
        missing = [r.index for r in pool if r.index not in score_of]
        if missing:
            raise SelectError(f"pool line {missing[0]} (0-based) has no score: the scores belong to another pool")
    stats = {"pool": len(pool), "no_answer": 0, "refusal": 0, "length": 0, "duplicate": 0}
    cands = []
    for r in pool:
        sc = score_of.get(r.index) if scores is not None else None
        if sc is not None and math.isnan(sc):
            stats["no_answer"] += 1
            continue
        ans = answers(r.messages)
        if filters["refusal_filter"] and any(is_refusal(a) for a in ans):
            stats["refusal"] += 1
            continue
        words = sum(len(a.split()) for a in ans)
        toks = tokens_of.get(r.index)
        if ((opts.min_words is not None and words < opts.min_words)
                or (opts.max_words is not None and words > opts.max_words)
                or (opts.min_tokens is not None and toks < opts.min_tokens)
                or (opts.max_tokens is not None and toks > opts.max_tokens)):
            stats["length"] += 1
            continue
        cands.append((r, sc))
    if scores is not None and not opts.random:
        cands.sort(key=lambda c: (-c[1], c[0].index))  # best first; ties by pool order
    if filters["dedupe"]:
        seen, kept = set(), []
        for c in cands:
            key = dedupe_key(c[0].messages)
            if key in seen:
                stats["duplicate"] += 1
                continue
            seen.add(key)
            kept.append(c)
        cands = kept
    stats["eligible"] = len(cands)
    k = opts.top_k if opts.top_k is not None else int(round(opts.top_fraction * len(cands)))
    k = min(k, len(cands))
    if opts.random:
        rng = np.random.default_rng(opts.seed)
        cands = [cands[int(i)] for i in rng.permutation(len(cands))[:k]]
    else:
        cands = cands[:k]
    out = [Selected(r.row, r.index, sc, rank) for rank, (r, sc) in enumerate(cands)]
    stats["selected"] = len(out)
    if out and scores is not None:
        vals = [o.score for o in out]
        stats["score_min"], stats["score_max"] = float(min(vals)), float(max(vals))
    return out, stats


def write_selection(path: str | Path, selected: Sequence[Selected], method: str) -> Path:
    """Chat JSONL for ``defenses.interleave.data``: the pool records plus a ``selection`` object."""
    return atomic.write_jsonl(path, ({**s.row, "selection": {"index": s.index, "score": s.score, "rank": s.rank,
                                                            "method": method}} for s in selected))

