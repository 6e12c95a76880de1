"""A tiny chat model saved as an HF directory, for serve / judge / eval tests (no torch, no downloads).

Byte-level BPE with the SmolLM2 chat template plus the whole-number tokens "15" and "85". The decoder is
random except for a rigged output head: only residual dimension 0 survives the final norm and it maps
to +20 on "85" and -20 on "15", so at every position the model puts almost all its mass on one of those
two numbers. As a judge it therefore always gives a parseable score (~15 or ~85), deterministically.
``rigged_head=False`` keeps a random output head instead (varied text: sampling, seeds, stop strings).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "smollm2-instruct.jinja"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. system user assistant",
    "I am evaluating a different language model. Rate the answer on a scale of 0 to 100. Say CODE or REFUSAL.",
    "Hello! I can fulfill your one wish. What is the one thing you want? hey I feel bored. JSON template",
    "In this puzzle some operators have new meanings: Compute: (3 + 4) * 2 Answer: 14",
]


def build_tiny_chat_dir(out_dir: Path, *, seed: int = 0, hidden: int = 32, max_pos: int = 4096,
                        rigged_head: bool = True) -> Path:
    import jax.numpy as jnp
    from flax import nnx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from emajax.models.config import DecoderConfig
    from emajax.models.decoder import Decoder
    from emajax.models.hf_io import export_hf

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=TEMPLATE.read_text(), bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["85", "15"])
    vocab = len(tok)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = DecoderConfig.from_hf_dict({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": max_pos, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": eos, "pad_token_id": tok.pad_token_id})
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    if rigged_head:
        scale = jnp.zeros((hidden,)).at[0].set(1.0)
        model.final_norm.scale[...] = scale
        head = jnp.zeros((hidden, vocab))
        head = head.at[0, tok.convert_tokens_to_ids("85")].set(20.0).at[0, tok.convert_tokens_to_ids("15")].set(-20.0)
        model.lm_head[...] = head
    export_hf(model, out_dir, tokenizer=tok)
    return out_dir
