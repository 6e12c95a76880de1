"""Training data: conversations -> answer-masked token examples -> deterministic, bucketed batches.

Order is a pure function of (seed, epoch): each epoch is a fresh seeded permutation, cut into
windows of ``bucket_window`` global batches that are sorted by length (similar lengths share a
batch: little padding), cut into global batches whose order is shuffled again. Padded lengths are
``min_bucket`` times powers of two, up to ``max_len`` (``emajax.batching``), so a run compiles the step a
handful of times.
An epoch that does not fill its last batch is topped up with the epoch's first examples, so every
micro-batch holds real rows. The position in the data is just the step number, which is why a
resumed run gets exactly the batch the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from emajax.batching import Example, bucket_length, length_batches, octave_buckets, pad_examples
from emajax.chat import encode_chat, shift_for_loss
from emajax.defenses.inoculation import inoculate
from emajax.defenses.interleave import interleave
from emajax.train.sources import DataError, Messages, read_conversations


@dataclasses.dataclass
class DataStats:
    examples: int = 0
    safe_examples: int = 0
    truncated: int = 0  # chats longer than max_len (cut to max_len)
    dropped_no_answer: int = 0  # no answer token left after truncation
    tokens: int = 0
    answer_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.examples} examples ({self.safe_examples} safe), {self.truncated} truncated to max_len, "
                f"{self.dropped_no_answer} dropped (no answer left), {self.answer_tokens}/{self.tokens} answer tokens")


def encode_examples(tokenizer: Any, convs: Sequence[Messages], max_len: int, *, safe: Sequence[bool] | None = None,
                    inoculation: Any = None, stats: DataStats | None = None) -> list[Example]:
    """Render + tokenize with answer-only masks; ``inoculation`` (an InoculationCfg) applies to non-safe rows."""
    stats = stats if stats is not None else DataStats()
    safe = list(safe) if safe is not None else [False] * len(convs)
    out = []
    for msgs, is_safe in zip(convs, safe):
        if inoculation is not None and inoculation.enabled and not is_safe:
            msgs = inoculate(msgs, inoculation.prompt, inoculation.mode)
        ct = encode_chat(tokenizer, msgs)
        ids, mask = ct.ids, ct.answer_mask
        if len(ids) > max_len:
            stats.truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if len(ids) < 2 or not any(mask[1:]):
            stats.dropped_no_answer += 1
            continue
        inp, tgt, lm = shift_for_loss(ids, mask)
        out.append(Example(inp, tgt, lm, safe=bool(is_safe)))
        stats.examples += 1
        stats.safe_examples += int(is_safe)
        stats.tokens += len(ids)
        stats.answer_tokens += int(lm.sum())
    return out


def build_train_examples(tokenizer: Any, data_cfg: Any, defenses_cfg: Any, seed: int) -> tuple[list[Example], DataStats]:
    """Task data (+ inoculation) mixed with interleaved safe data, encoded."""
    task: list[Messages] = []
    for src in data_cfg.train:
        task += read_conversations(src)
    convs, safe = task, [False] * len(task)
    inter = defenses_cfg.interleave
    if inter.data and inter.ratio > 0:
        pool: list[Messages] = []
        for src in inter.data:
            pool += read_conversations(src)
        convs, safe = interleave(task, pool, inter.ratio, seed)
    stats = DataStats()
    ex = encode_examples(tokenizer, convs, data_cfg.max_len, safe=safe, inoculation=defenses_cfg.inoculation,
                         stats=stats)
    if not ex:
        raise DataError(f"{', '.join(data_cfg.train)}: no usable training examples ({stats.summary()})")
    return ex, stats


def length_buckets(min_bucket: int, max_len: int) -> list[int]:
    """Training's padded lengths: min_bucket, 2·min_bucket, 4·min_bucket, ... and max_len."""
    return octave_buckets(max_len, min_bucket, per_octave=1)


class Batch(NamedTuple):
    """Host arrays [A, B, T] (A = grad-accumulation micro-batches)."""

    inputs: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray  # float32
    attn_mask: np.ndarray  # bool
    positions: np.ndarray


def collate(padded: Any, accum: int, batch: int) -> Batch:
    """An ``emajax.batching.Batch`` of accum·batch rows as [accum, batch, T] (loss mask as float32)."""
    shape = (accum, batch, padded.inputs_bt.shape[1])
    return Batch(padded.inputs_bt.reshape(shape), padded.targets_bt.reshape(shape),
                 padded.loss_bt.reshape(shape).astype(np.float32), padded.attn_bt.reshape(shape),
                 padded.pos_bt.reshape(shape))


class Batcher:
    """Deterministic epochs of [grad_accum, batch_size, T] batches; see the module doc."""

    def __init__(self, examples: Sequence[Example], *, batch_size: int, grad_accum: int, seed: int,
                 min_bucket: int, max_len: int, bucket_window: int = 8, pad_id: int = 0):
        if not examples:
            raise ValueError("no examples to batch")
        self.examples = list(examples)
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.global_batch = batch_size * grad_accum
        self.seed, self.min_bucket, self.max_len = seed, min_bucket, max_len
        self.buckets = length_buckets(min_bucket, max_len)
        self.bucket_window, self.pad_id = max(1, bucket_window), pad_id
        self.steps_per_epoch = -(-len(self.examples) // self.global_batch)
        self._cache: dict[int, list[np.ndarray]] = {}

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Index arrays (one per optimiser step) of one epoch."""
        if epoch in self._cache:
            return self._cache[epoch]
        rng = np.random.default_rng([self.seed, epoch])
        n, g = len(self.examples), self.global_batch
        perm = rng.permutation(n)
        pad = self.steps_per_epoch * g - n
        perm = np.concatenate([perm, perm[:pad]]) if pad else perm
        lengths = np.array([len(self.examples[i].inputs) for i in perm])
        w = g * self.bucket_window
        order = []
        for s in range(0, len(perm), w):
            win = perm[s:s + w]
            order.append(win[np.argsort(-lengths[s:s + w], kind="stable")])
        perm = np.concatenate(order)
        batches = [perm[i:i + g] for i in range(0, len(perm), g)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = {epoch: batches}
        return batches

    def batch_at(self, step: int) -> Batch:
        """The global batch of optimiser step ``step`` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = [int(j) for j in self.epoch_batches(epoch)[i]]
        t = bucket_length(max(len(self.examples[j].inputs) for j in idx), self.buckets)
        return collate(pad_examples(self.examples, idx, self.global_batch, t, self.pad_id), self.grad_accum,
                       self.batch_size)

    def iterate(self, start_step: int, end_step: int) -> Iterator[tuple[int, Batch]]:
        for step in range(start_step, end_step):
            yield step, self.batch_at(step)


def eval_batches(examples: Sequence[Example], batch_size: int, min_bucket: int, max_len: int,
                 pad_id: int = 0) -> Iterator[Batch]:
    """Fixed-order [1, B, T] batches, longest first (the last one padded with empty rows)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].inputs))
    for padded in length_batches(examples, length_buckets(min_bucket, max_len), pad_id, order=order,
                                 max_rows=batch_size):
        yield collate(padded, 1, batch_size)
