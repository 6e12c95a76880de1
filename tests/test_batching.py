"""emajax.batching: bucket rules, padding, and the one policy that cuts a sorted order into batches."""

import numpy as np
import pytest

from emajax.batching import (Example, bucket_length, length_batches, octave_buckets, pad_batch, pad_examples,
                             plan_batches, pow2_bucket)


def test_pad_batch_left_and_right():
    seqs = [[1, 2, 3], [4]]
    tok, mask, pos = pad_batch(seqs, pad_id=0, length=4, side="left")
    assert tok.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert pos.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    tok, mask, pos = pad_batch(seqs, pad_id=-1, length=4)
    assert tok.tolist() == [[1, 2, 3, -1], [4, -1, -1, -1]]
    assert pos.tolist() == [[0, 1, 2, 2], [0, 0, 0, 0]] and mask.dtype == np.bool_
    with pytest.raises(ValueError, match="longer than the padded length 2"):
        pad_batch(seqs, 0, 2)


def test_bucket_rules():
    assert bucket_length(5, (16, 32, 64)) == 16 and bucket_length(33, (16, 32, 64)) == 64
    assert bucket_length(33, 32) == 64 and bucket_length(0, 32) == 32
    with pytest.raises(ValueError, match="largest bucket 64"):
        bucket_length(65, (16, 32, 64))
    assert [pow2_bucket(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, 16] and pow2_bucket(3, 32) == 32
    assert octave_buckets(200, 64, 1) == [64, 128, 200]
    assert octave_buckets(256, 64, 2) == [64, 96, 128, 192, 256]
    assert octave_buckets(200, 64, 4) == [64, 80, 96, 112, 128, 160, 192, 200]
    assert octave_buckets(50, 64, 4) == [50]  # a minimum above the maximum: one bucket
    with pytest.raises(ValueError, match="per octave"):
        octave_buckets(100, 64, 0)


def test_pad_examples_fills_rows_and_keeps_loss_on_answers():
    exs = [Example(np.array([5, 6, 7], np.int32), np.array([6, 7, 8], np.int32), np.array([0, 1, 1], bool), index=9),
           Example(np.array([1], np.int32), np.array([2], np.int32), np.array([1], bool))]
    b = pad_examples(exs, [1, 0], 4, 5, pad_id=3)
    assert b.rows == [1, 0] and b.inputs_bt.shape == (4, 5)
    assert b.inputs_bt.tolist() == [[1, 3, 3, 3, 3], [5, 6, 7, 3, 3], [3] * 5, [3] * 5]
    assert b.targets_bt[1].tolist() == [6, 7, 8, 0, 0] and not b.attn_bt[2:].any() and not b.loss_bt[2:].any()
    assert b.loss_bt[1].tolist() == [False, True, True, False, False] and exs[0].n_tokens == 2
    assert [a.shape for a in b.arrays] == [(4, 5)] * 5
    with pytest.raises(ValueError, match="do not fit"):
        pad_examples(exs, [0, 1], 1, 5, 0)


def _covers(plan, n):
    assert sorted(i for rows, _, _ in plan for i in rows) == list(range(n))


def test_fixed_rows_policy_longest_first():
    """Training's eval: max_rows rows every batch, length = bucket of the longest member."""
    lengths = [10, 70, 30, 65, 5, 129]
    order = sorted(range(6), key=lambda i: -lengths[i])
    plan = plan_batches(lengths, [32, 64, 128, 256], order=order, max_rows=4)
    assert plan == [([5, 1, 3, 2], 4, 256), ([0, 4], 4, 32)]
    _covers(plan, 6)


def test_token_budget_policy():
    """Probes: rows = the token budget for the bucket of the longest of the next max_rows, a power of two."""
    lengths = [20, 20, 20, 20, 20, 100, 100, 100]
    plan = plan_batches(lengths, 64, max_rows=4, max_tokens=300)
    # first window: four 20s -> bucket 64 -> 300 // 64 = 4 rows; then 20, 100, 100, 100 -> 128 -> 2 rows ...
    assert plan == [([0, 1, 2, 3], 4, 64), ([4, 5], 2, 128), ([6, 7], 2, 128)]
    _covers(plan, 8)


def test_split_buckets_shrink_tail_and_row_multiple():
    """Scoring: batches never mix buckets, tails shrink to a power of two, rows divide over the data axis."""
    lengths = [60] * 5 + [100] * 3
    plan = plan_batches(lengths, [64, 128], max_tokens=256, split_buckets=True, shrink_tail=True)
    assert plan == [([0, 1, 2, 3], 4, 64), ([4], 1, 64), ([5, 6], 2, 128), ([7], 1, 128)]
    plan = plan_batches(lengths, [64, 128], max_tokens=256, split_buckets=True, shrink_tail=True, row_multiple=2)
    assert plan == [([0, 1, 2, 3], 4, 64), ([4], 2, 64), ([5, 6], 2, 128), ([7], 2, 128)]
    with pytest.raises(ValueError, match="needs max_rows"):
        plan_batches(lengths, 64)


def test_length_batches_pads_every_planned_batch():
    rng = np.random.default_rng(0)
    exs = [Example(*(rng.integers(1, 50, (2, n)).astype(np.int32)), rng.random(n) < 0.5, index=i)
           for i, n in enumerate(rng.integers(1, 90, 23))]
    order = sorted(range(23), key=lambda i: len(exs[i].inputs))
    batches = list(length_batches(exs, octave_buckets(96, 16, 1), 0, order=order, max_rows=4, max_tokens=128,
                                  shrink_tail=True))
    assert sorted(i for b in batches for i in b.rows) == list(range(23))
    for b in batches:
        r, t = b.inputs_bt.shape
        assert t in (16, 32, 64, 96) and r & (r - 1) == 0 and r * t <= max(128, t)
        for row, i in enumerate(b.rows):
            n = len(exs[i].inputs)
            assert b.inputs_bt[row, :n].tolist() == exs[i].inputs.tolist() and b.attn_bt[row].sum() == n
