"""Tiny model + byte-level ChatML tokenizer for the training tests (no downloads, compiles in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from flax import nnx

from emajax.models.config import DecoderConfig
from emajax.models.decoder import Decoder
from emajax.models.lora import LoraConfig

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TINY = DecoderConfig(model_type="llama", vocab_size=272, hidden_size=32, intermediate_size=64, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, eos_token_ids=(257,),
                     pad_token_id=257, tie_word_embeddings=False)


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])  # ids 256, 257
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   chat_template=CHATML)


def tiny_model(lora: LoraConfig | None = LoraConfig(rank=4, alpha=8.0), seed: int = 0) -> Decoder:
    return Decoder(TINY, rngs=nnx.Rngs(seed), lora=lora)


def export_tiny_model(directory: Path) -> Path:
    """The tiny full-weights model (seed 1) with its tokenizer as an HF directory ``directory/tiny-model``, the
    ``model.name`` of the tests' tiny training configs."""
    from emajax.models.hf_io import export_hf

    return export_hf(tiny_model(lora=None, seed=1), Path(directory) / "tiny-model", tiny_tokenizer())


def write_chats(path: Path, n: int, seed: int = 0, prefix: str = "q") -> Path:
    import random

    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rnd.choice(words) for _ in range(rnd.randint(2, 6)))
            a = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{prefix}{i} {q}"},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path
