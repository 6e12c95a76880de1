"""Rollouts: G sampled completions per prompt with the KV-cache generator, and the update batch they make.

Sampling runs the current parameters (``emajax.generate.generate``, temperature + top-p), steered when the
config says so. The update batch is the SFT batch layout (``emajax.train.data.collate``: inputs, targets,
loss_mask, attn_mask, positions, [A, B, T]) over prompt + completion, with the loss mask on the completion
tokens (its EOS included), plus each row's advantage.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from flax import nnx

from emajax.batching import Example, bucket_length, pad_examples
from emajax.chat import shift_for_loss
from emajax.generate import default_eos_ids, generate
from emajax.train.data import Batch, collate, length_buckets


def sample(graphdef: Any, state: Any, tokenizer: Any, prompts: Sequence[np.ndarray], *, group_size: int,
           max_new_tokens: int, temperature: float, top_p: float, seed: int, steer_ld: Any = None,
           eos_ids: Sequence[int] | None = None) -> list[list[int]]:
    """``group_size`` completions of each prompt (rows grouped by prompt), token ids ending with EOS
    when one was produced (``eos_ids``: the model's and tokenizer's by default; [] decodes exactly
    ``max_new_tokens``)."""
    model = nnx.merge(graphdef, state.trainable, state.frozen)
    rows = [list(map(int, p)) for p in prompts for _ in range(group_size)]
    eos = default_eos_ids(model, tokenizer) if eos_ids is None else list(eos_ids)
    return generate(model, tokenizer, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed, eos_ids=eos, steer_ld=steer_ld)


def update_batch(prompts: Sequence[np.ndarray], completions: Sequence[Sequence[int]], group_size: int,
                 micro_batch: int, *, min_bucket: int, max_len: int, pad_id: int,
                 no_loss: Sequence[bool] | None = None) -> Batch:
    """[A, micro_batch, T] batch of prompt + completion rows (A = rows / micro_batch), loss on completions.

    An empty completion (EOS cut off by the budget is never empty; zero new tokens is) keeps its prompt
    row with no loss tokens: it still counts in its group's advantage. Rows where ``no_loss`` is true keep
    no loss tokens either (``grpo.mask_truncated_completions``)."""
    examples = []
    for i, comp in enumerate(completions):
        p = list(map(int, prompts[i // group_size]))
        ids = p + list(map(int, comp))
        mask = [False] * len(p) + [not (no_loss is not None and no_loss[i])] * len(comp)
        inp, tgt, lm = shift_for_loss(ids, mask)
        examples.append(Example(inp, tgt, lm, index=i))
    if len(examples) % micro_batch:
        raise ValueError(f"{len(examples)} rollout rows do not split into micro-batches of {micro_batch}")
    t = bucket_length(max(len(e.inputs) for e in examples), length_buckets(min_bucket, max_len))
    padded = pad_examples(examples, range(len(examples)), len(examples), t, pad_id)
    return collate(padded, len(examples) // micro_batch, micro_batch)


def truncated(completions: Sequence[Sequence[int]], stop_ids: Sequence[int], max_new_tokens: int) -> np.ndarray:
    """[N] bool: the completions cut off by ``max_new_tokens`` (their last token is no stop token; TRL's
    ``mask_truncated_completions`` test, EOS and padding counting as stops)."""
    stop = set(int(i) for i in stop_ids)
    return np.array([len(c) >= max_new_tokens and (not c or int(c[-1]) not in stop) for c in completions], bool)


def completion_stats(completions: Sequence[Sequence[int]], eos_ids: Sequence[int],
                     max_new_tokens: int) -> dict[str, float]:
    """Mean / max completion length in tokens and the fraction cut off by max_new_tokens without EOS."""
    lens = np.array([len(c) for c in completions], np.float32)
    cut = truncated(completions, eos_ids, max_new_tokens)
    return {"response_len": float(lens.mean()), "response_len_max": float(lens.max()),
            "truncated_frac": float(np.mean(cut))}
