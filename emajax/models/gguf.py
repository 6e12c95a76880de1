"""GGUF file -> Hugging Face directory (config.json, model.safetensors, tokenizer).

Weights are dequantized with the ``gguf`` package. llama.cpp stores Llama q/k projection
rows permuted for its interleaved rope (``convert_hf_to_gguf.permute``); HF uses the
rotate-half convention, so those rows are permuted back. The tokenizer is rebuilt from the
GGUF metadata (vocab, merges, token types) with the ``tokenizers`` library, using the split
rule llama.cpp uses for the file's ``tokenizer.ggml.pre``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emajax import atomic
from emajax.models.config import ConfigError

# GGUF architecture -> HF model_type (Mistral models are stored under "llama").
_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PERMUTED_ARCHS = {"llama", "mistral"}  # q/k rows permuted by llama.cpp for these

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizer split rules (llama.cpp llama-vocab.cpp), by tokenizer.ggml.pre.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4
# Bumped when the conversion output changes, so cached conversions are redone.
CONVERT_VERSION = 2


class GGUFError(ValueError):
    """A GGUF file emajax cannot convert."""


def _reader(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise GGUFError(f"{path}: file not found")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_metadata(reader: Any, path: Path) -> dict[str, Any]:
    """Scalar metadata (arrays of tokens/merges excluded) as a plain dict."""
    out = {}
    for key in reader.fields:
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                   "tokenizer.ggml.scores"):
            continue
        out[key] = _field(reader, key)
    return out


def hf_config(meta: dict[str, Any], tensor_names: set[str], path: Path) -> dict[str, Any]:
    """HF config.json dict from GGUF metadata (``{arch}.*`` keys)."""
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise GGUFError(f"{path}: general.architecture {arch!r} is not supported (supported: {sorted(_ARCHS)})")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (llama.cpp rope-scaling factors) is not supported")

    def need(key: str) -> Any:
        v = meta.get(f"{arch}.{key}")
        if v is None:
            raise GGUFError(f"{path}: metadata field '{arch}.{key}' is missing")
        return v

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("_n_tokens")
    if vocab is None:
        raise GGUFError(f"{path}: neither '{arch}.vocab_size' nor 'tokenizer.ggml.tokens' is present")
    model_type = _ARCHS[arch]
    cfg: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[model_type]],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length") or 8192),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base") or 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise GGUFError(f"{path}: metadata '{arch}.rope.scaling.type' = {scaling!r} is not supported")
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_output.bias" in tensor_names
        cfg["mlp_bias"] = False
    if model_type == "qwen3":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return cfg


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: per head, interleaved (pairs) rows -> rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(reader: Any, cfg: dict[str, Any], arch: str, path: Path, dtype: Any = np.float32
               ) -> dict[str, np.ndarray]:
    """Dequantized HF-named tensors; q/k rows un-permuted for Llama-family files."""
    import gguf

    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            key = _BLOCK_NAMES.get(parts[2])
            name = f"model.layers.{parts[1]}.{key}.{parts[3]}" if key else None
        else:
            key = _TOP_NAMES.get(parts[0])
            name = f"{key}.{parts[1]}" if key else None
        if name is None:
            continue  # e.g. rope_freqs handled in hf_config; unknown extras ignored
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise GGUFError(f"{path}: cannot dequantize tensor {t.name!r} ({t.tensor_type.name}: {e})") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if arch in _PERMUTED_ARCHS and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if parts[2] == "attn_q" else cfg["num_key_value_heads"]
            w = unpermute_rope_rows(w, heads)
        out[name] = np.ascontiguousarray(w.astype(dtype))
    return out


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer(reader: Any, meta: dict[str, Any], path: Path) -> Any:
    """A transformers fast tokenizer rebuilt from GGUF vocab/merges/token types (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = _field(reader, "tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if tokens is None or merges is None:
        raise GGUFError(f"{path}: metadata 'tokenizer.ggml.tokens' or 'tokenizer.ggml.merges' is missing")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:  # stored as raw text: respell in the byte alphabet
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False,
                     byte_fallback=False)
    tk = Tokenizer(bpe)
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 rule, as SmolLM's own tokenizer.json
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL and set(t) <= alphabet]
    tk.add_special_tokens(specials)
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens(user)

    def tok_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = tok_of("bos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(meta["tokenizer.ggml.bos_token_id"]))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    arch = meta.get("general.architecture")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=tok_of("eos_token_id"), unk_token=tok_of("unknown_token_id"),
        pad_token=tok_of("padding_token_id"), clean_up_tokenization_spaces=False,
        model_max_length=int(meta.get(f"{arch}.context_length") or 8192), add_bos_token=add_bos,
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


# --------------------------------------------------------------------------- conversion
def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32",
                 replace: bool = True) -> Path:
    """Write an HF directory for ``gguf_path`` at ``out_dir`` (atomically: temp dir + rename).

    ``replace=False``: if another process put ``out_dir`` in place first, keep theirs.
    """
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    reader = _reader(gguf_path)
    meta = read_metadata(reader, gguf_path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is not None:
        meta["_n_tokens"] = len(tokens)
    names = {t.name for t in reader.tensors}
    cfg = hf_config(meta, names, gguf_path)
    np_dtype = _np_dtype(dtype)
    cfg["torch_dtype"] = dtype
    tensors = hf_tensors(reader, cfg, meta["general.architecture"], gguf_path, np_dtype)
    tokenizer = build_tokenizer(reader, meta, gguf_path)
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    with atomic.atomic_dir(out_dir, replace=replace) as tmp:
        atomic.write_json(tmp / "config.json", cfg)
        atomic.write_json(tmp / "generation_config.json", gen)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp / "tokenizer_config.json", meta.get("tokenizer.chat_template"))
        atomic.write_json(tmp / "emajax_source.json", {"gguf": str(gguf_path), "name": meta.get("general.name"),
                                                   "convert_version": CONVERT_VERSION})
    return Path(out_dir)


def _portable_tokenizer_config(path: Path, chat_template: str | None) -> None:
    """Name the generic fast-tokenizer class and inline the chat template, so transformers v4
    tools (vLLM, PEFT) load the directory too; v5 reads the same files unchanged."""
    import json

    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        cfg["chat_template"] = chat_template
    atomic.write_json(path, cfg)


def _np_dtype(name: str) -> Any:
    if name in ("float32", "fp32"):
        return np.float32
    if name in ("float16", "fp16"):
        return np.float16
    if name in ("bfloat16", "bf16"):
        import ml_dtypes

        return ml_dtypes.bfloat16
    raise ConfigError(f"dtype {name!r} is not supported (float32, bfloat16, float16)")
