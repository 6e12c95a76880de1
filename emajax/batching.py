"""Ragged token sequences -> fixed-shape padded batches with few distinct shapes.

jit compiles once per input shape, so every batched path (training, scoring, probes, persona vectors,
generation, serving) pads lengths up to a bucket and rows up to a small set of sizes. This module holds
the one tokenized ``Example``, the bucket rules, the padding, and the one policy that cuts a sorted order
of examples into batches (``plan_batches``); callers choose the order and the policy's parameters:

* training's periodic eval: the longest first, ``max_rows`` rows every batch (the mesh's batch size);
* probes: shortest first, rows from a token budget in powers of two, capped by ``max_rows``;
* scoring: one bucket per batch (``split_buckets``), rows from a token budget, tails shrunk to the next
  power of two (``shrink_tail``), a multiple of the data-parallel size (``row_multiple``);
* persona activations: shortest first, ``max_rows`` rows, tails shrunk.

Training's own order (seeded windows sorted by length, which defines what a resumed run sees) lives in
``emajax.train.data``; its batches are padded here.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np


class Example(NamedTuple):
    """One tokenized chat, shifted for next-token loss."""

    inputs: np.ndarray  # [n] int32: position t reads inputs[t] ...
    targets: np.ndarray  # [n] int32 ... and predicts targets[t]
    loss_mask: np.ndarray  # [n] bool: True on answer tokens (content + end-of-turn)
    index: int = -1  # the source row (pool line, dataset row) where the caller tracks one
    safe: bool = False  # training: drawn from the interleaved safe pool

    @property
    def n_tokens(self) -> int:
        """Answer tokens (the positions that carry loss)."""
        return int(np.count_nonzero(self.loss_mask))


# ----------------------------------------------------------------------------- lengths
def pow2_bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def octave_buckets(maximum: int, minimum: int = 64, per_octave: int = 4) -> list[int]:
    """Padded lengths from ``minimum`` up to (and always including) ``maximum``, ``per_octave`` evenly spaced
    steps per doubling: 1 gives minimum·2^k (64, 128, 256, ...); 2 gives 64, 96, 128, 192, ...; 4 gives 64,
    80, 96, 112, 128, 160, ... More steps per octave pad less and compile more shapes."""
    if per_octave < 1:
        raise ValueError(f"buckets per octave must be >= 1, got {per_octave}")
    out, b = [], max(1, minimum)
    while b < maximum:
        out += [v for v in (b + b * i // per_octave for i in range(per_octave)) if v < maximum]
        b *= 2
    out.append(maximum)
    return sorted(set(out))


def bucket_length(n: int, buckets: Sequence[int] | int) -> int:
    """Smallest of ``buckets`` (ascending) >= n, or n rounded up to a multiple of an int ``buckets``."""
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if isinstance(buckets, (int, np.integer)):
        if buckets <= 0:
            raise ValueError(f"bucket multiple must be positive, got {buckets}")
        return max(int(buckets), -(-n // buckets) * int(buckets))
    for b in buckets:
        if n <= b:
            return int(b)
    raise ValueError(f"length {n} exceeds the largest bucket {max(buckets)}")


# ----------------------------------------------------------------------------- padding
def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, length: int, side: str = "right",
              dtype: Any = np.int32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad ragged sequences to [B, length]: (tokens, attn_mask, positions).

    Positions count real tokens only (cumsum(mask) - 1, 0 before the first), so left-padded prompts get the
    same rotary positions as unpadded ones. ``dtype`` lets the same helper pad targets or masks.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    tokens = np.full((len(seqs), length), pad_id, dtype)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        n = len(s)
        if n > length:
            raise ValueError(f"sequence {i} has {n} tokens, longer than the padded length {length}")
        if n == 0:
            continue
        sl = slice(0, n) if side == "right" else slice(length - n, length)
        tokens[i, sl] = np.asarray(s, dtype)
        mask[i, sl] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


class Batch(NamedTuple):
    """Right-padded [R, T] arrays of some examples; rows past ``len(rows)`` are filler (no tokens, no loss)."""

    rows: list[int]  # the examples' positions in the caller's list, in row order
    inputs_bt: np.ndarray  # int32, pad_id on padding
    targets_bt: np.ndarray  # int32, 0 on padding
    loss_bt: np.ndarray  # bool
    attn_bt: np.ndarray  # bool
    pos_bt: np.ndarray  # int32

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """(inputs, targets, loss, attn, positions), the order the forward functions take them in."""
        return self[1:]


def pad_examples(examples: Sequence[Example], rows: Sequence[int], n_rows: int, length: int, pad_id: int) -> Batch:
    """``examples[rows]`` as one [n_rows, length] batch (filler rows after them)."""
    if len(rows) > n_rows:
        raise ValueError(f"{len(rows)} examples do not fit in {n_rows} rows")
    exs = [examples[i] for i in rows]
    filler = [()] * (n_rows - len(exs))
    inputs, attn, pos = pad_batch([e.inputs for e in exs] + filler, pad_id, length)
    targets, _, _ = pad_batch([e.targets for e in exs] + filler, 0, length)
    loss, _, _ = pad_batch([e.loss_mask for e in exs] + filler, 0, length, dtype=bool)
    return Batch(list(rows), inputs, targets, loss, attn, pos)


# ----------------------------------------------------------------------------- the batching policy
def plan_batches(lengths: Sequence[int], buckets: Sequence[int] | int, *, order: Sequence[int] | None = None,
                 max_rows: int | None = None, max_tokens: int | None = None, row_multiple: int = 1,
                 split_buckets: bool = False, shrink_tail: bool = False) -> list[tuple[list[int], int, int]]:
    """Cut ``order`` (positions into ``lengths``, default 0..N-1; sort it by length first) into consecutive
    batches: ``[(rows, n_rows, length), ...]``, ``rows`` the positions in the batch and ``n_rows >= len(rows)``
    its padded row count.

    A batch's length is the bucket of its longest member. Its row count is ``max_rows``, or the token budget
    ``max_tokens // length`` rounded down to a power of two if that is smaller (the length used for the budget
    is that of the ``max_rows`` examples ahead); with ``shrink_tail`` it shrinks to the next power of two >=
    the examples left (in the bucket, with ``split_buckets``), and it is rounded up to a multiple of
    ``row_multiple``. ``split_buckets`` keeps every batch inside one length bucket.
    """
    if max_rows is None and max_tokens is None and not shrink_tail:
        raise ValueError("plan_batches needs max_rows, max_tokens or shrink_tail to size its batches")
    if (max_rows is not None and max_rows < 1) or row_multiple < 1:
        raise ValueError(f"max_rows and row_multiple must be >= 1, got {max_rows} and {row_multiple}")
    order = list(range(len(lengths))) if order is None else [int(i) for i in order]
    bucket = [bucket_length(int(lengths[i]), buckets) for i in order]
    out, k = [], 0
    while k < len(order):
        end = len(order)
        if split_buckets:
            end = k
            while end < len(order) and bucket[end] == bucket[k]:
                end += 1
        ahead = end if max_rows is None else min(end, k + max_rows)
        caps = [] if max_rows is None else [max_rows]
        if max_tokens is not None:
            budget = max(1, max_tokens // max(bucket[k:ahead]))
            caps.append(1 << (budget.bit_length() - 1))
        if shrink_tail:
            caps.append(pow2_bucket(end - k))
        cap = min(caps)
        n_rows = -(-cap // row_multiple) * row_multiple
        take = slice(k, min(end, k + n_rows))
        out.append((order[take], n_rows, max(bucket[take])))
        k = take.stop
    return out


def length_batches(examples: Sequence[Example], buckets: Sequence[int] | int, pad_id: int, *,
                   order: Sequence[int] | None = None, **policy: Any) -> Iterator[Batch]:
    """``plan_batches`` over the examples' input lengths, each batch padded (``policy``: its keyword arguments)."""
    lengths = [len(e.inputs) for e in examples]
    for rows, n_rows, length in plan_batches(lengths, buckets, order=order, **policy):
        yield pad_examples(examples, rows, n_rows, length, pad_id)
