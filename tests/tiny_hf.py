"""Tiny random HF transformers models (torch, test-only oracle) saved as HF directories.

All variants share one set of dimensions (GQA: 4 query heads, 2 kv heads) so the emajax side
compiles few distinct shapes. Weights are re-drawn with larger scale than HF's init and norm
scales are perturbed, so a mis-mapped tensor changes the logits visibly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

DIMS = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)

VARIANTS = ("llama3_untied", "llama_tied", "mistral", "qwen2_tied", "qwen3_untied")


def hf_config(kind: str):
    import transformers as tf

    if kind == "llama3_untied":
        return tf.LlamaConfig(**DIMS, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if kind == "llama_tied":
        return tf.LlamaConfig(**DIMS, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0})
    if kind == "mistral":
        return tf.MistralConfig(**DIMS, tie_word_embeddings=False, sliding_window=None, head_dim=16)
    if kind == "qwen2_tied":
        return tf.Qwen2Config(**DIMS, tie_word_embeddings=True, use_sliding_window=False)
    if kind == "qwen3_untied":
        return tf.Qwen3Config(**DIMS, tie_word_embeddings=False, head_dim=16, use_sliding_window=False)
    raise KeyError(kind)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocab (t0 .. t95), enough for AutoTokenizer to load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(DIMS["vocab_size"])}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t3", pad_token="t0", bos_token="t1",
                                   eos_token="t2")


def randomize(model, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def save_tiny(kind: str, out_dir: Path, seed: int = 0):
    """Build, randomize and save_pretrained a tiny ``kind`` model (+ tokenizer); returns the torch model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32).eval()
    randomize(model, seed)
    model.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return model


def padded_batch(seed: int = 0, lengths=(12, 7, 3)) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token batch [B, T] (pad id 0) and its mask."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), bool)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(3, DIMS["vocab_size"], n)
        mask[i, :n] = True
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask.astype(np.int64)))
    return out.logits.float().numpy()


def rel_err(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """max |ours - ref| / max |ref| over valid positions."""
    a, b = ours[mask], ref[mask]
    return float(np.abs(a - b).max() / np.abs(b).max())


TOL = 1e-4  # relative logits error allowed against the HF torch oracle (issue 2)


@nnx.jit
def _logits(model, ids, mask):
    return model.logits(model(ids, attn_mask_bt=mask).hidden_btd)


def ours(model, ids, mask) -> np.ndarray:
    """emajax fp32 logits [B, T, V] of a padded batch (one compiled function shared by the io/parity tests)."""
    return np.asarray(_logits(model, ids, mask))
