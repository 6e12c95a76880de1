"""Pool -> tokenized examples -> a deterministic plan of shards (batches: ``emajax.batching``).

The shard plan depends only on the pool, the tokenizer, ``max_len``, the length buckets and
``shard_size``: examples are sorted by (padded length bucket, pool index) and cut into shards of
``shard_size``. Sorting first means a shard holds one or two length buckets, so its batches carry little
padding and few partial batches. Batches are cut inside a shard at run time (rows per batch follow
``batch_tokens`` and the mesh), so the same output directory can be resumed on a different device count.

The scorer's buckets split each octave into ``per_octave`` steps (``emajax.batching.octave_buckets``):
quarter-octaves (64, 80, 96, 112, 128, 160, ...) pad any sequence by at most 1.25x, for about twice the
compiled shapes of half-octaves; each shape compiles once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from emajax.batching import Example, bucket_length
from emajax.chat import encode_chat


class PoolError(ValueError):
    """A pool file or row that cannot be scored; the message names the file, line and field."""


class PoolRow(NamedTuple):
    index: int  # 0-based line number in the JSONL (row number in a dataset)
    messages: list[dict[str, str]]
    row: dict  # the original record (extra fields are kept by ``emajax select``)


def read_pool(source: str | Path) -> list[PoolRow]:
    """Rows of a chat JSONL (``{"messages": [...]}`` per line) or ``hf:NAME[@SPLIT]``."""
    source = str(source)
    if source.startswith("hf:"):
        from emajax.train.sources import read_conversations  # datasets is heavy: imported only here

        return [PoolRow(i, m, {"messages": m}) for i, m in enumerate(read_conversations(source))]
    from emajax.train.sources import chat_rows

    out = [PoolRow(lineno - 1, msgs, row) for lineno, row, msgs in chat_rows(source, PoolError)]
    if not out:
        raise PoolError(f"{source}: no conversations")
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_pool(tokenizer: Any, rows: Sequence[PoolRow], max_len: int) -> list[Example]:
    """Answer-masked, shifted examples; chats longer than ``max_len`` keep their first max_len tokens."""
    out = []
    for r in rows:
        ct = encode_chat(tokenizer, r.messages, max_len=max_len)
        ids = np.asarray(ct.ids, np.int32)
        mask = np.asarray(ct.answer_mask, bool)
        if ids.size < 2:  # nothing to predict: scored as n_tokens = 0
            ids, mask = np.zeros(2, np.int32), np.zeros(2, bool)
        out.append(Example(ids[:-1], ids[1:], mask[1:], index=r.index))
    return out


def plan_shards(examples: Sequence[Example], buckets: Sequence[int], shard_size: int) -> list[list[int]]:
    """Shards as lists of positions into ``examples``, in (bucket, pool index) order."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    order = sorted(range(len(examples)),
                   key=lambda i: (bucket_length(len(examples[i].inputs), buckets), examples[i].index))
    return [order[s: s + shard_size] for s in range(0, len(order), shard_size)]


def plan_hash(examples: Sequence[Example], shards: Sequence[Sequence[int]]) -> str:
    """Fingerprint of the token content and shard layout: a resumed run must see the same plan."""
    h = hashlib.sha256()
    for shard in shards:
        h.update(b"|shard")
        for i in shard:
            e = examples[i]
            h.update(np.int64(e.index).tobytes())
            h.update(e.inputs.tobytes())
            h.update(e.targets[-1:].tobytes())
            h.update(np.packbits(e.loss_mask).tobytes())
    return h.hexdigest()
