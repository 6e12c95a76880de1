"""GGUF import and ``emajax convert``.

A tiny random Llama is written as a GGUF exactly as llama.cpp does (q/k rows permuted for its rope,
byte-level BPE vocab in metadata), so conversion is checked against both the original torch model
and transformers' own GGUF import, in seconds. The real SmolLM2 GGUF is covered by the slow tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from tiny_hf import DIMS, padded_batch, randomize, rel_err, torch_logits

TOL = 1e-4
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@nnx.jit
def _logits(model, ids, mask):
    return model.logits(model(ids, attn_mask_bt=mask).hidden_btd)


def _tokens() -> tuple[list[str], list[str], list[int]]:
    from emajax.models.gguf import _bytes_to_unicode

    spell = _bytes_to_unicode()
    chars = [spell[b] for b in range(32, 32 + DIMS["vocab_size"] - 3 - 4)]  # 'Ġ' (space) .. letters
    merged = ["he", "ll", "Ġw", "Ġwo"]
    tokens = ["<unk>", "<s>", "</s>"] + chars + merged
    merges = ["h e", "l l", "Ġ w", "Ġw o"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    assert len(tokens) == DIMS["vocab_size"]
    return tokens, merges, types


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, torch_model) -> None:
    import gguf

    cfg = torch_model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    tokens, merges, types = _tokens()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in torch_model.state_dict().items():
        x = p.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue  # llama.cpp writes no output.weight for tied embeddings
            g = "output.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            mod, leaf = rest.rsplit(".", 1)
            g = f"blk.{i}.{names[mod]}.{leaf}"
            if mod == "self_attn.q_proj":
                x = llama_cpp_permute(x, cfg.num_attention_heads)
            elif mod == "self_attn.k_proj":
                x = llama_cpp_permute(x, cfg.num_key_value_heads)
        w.add_tensor(g, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(torch, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tiny_hf import hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config("llama_tied"), dtype=torch.float32).eval()
    randomize(model, seed=5)
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_gguf(path, model)
    return path, model


def test_unpermute_inverts_llama_cpp_permute():
    from emajax.models.gguf import unpermute_rope_rows

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)


def test_cli_convert_gguf_matches_torch_and_transformers_gguf_load(tiny_gguf, torch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emajax.cli import main
    from emajax.models.hub import load_model

    path, torch_model = tiny_gguf
    out = tmp_path / "hf"
    assert main(["convert", "--model", str(path), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] and cfg["num_key_value_heads"] == 2
    lm = load_model(str(out))
    ids, mask = padded_batch()
    got = np.asarray(_logits(lm.model, ids, mask))
    err_torch = rel_err(got, torch_logits(torch_model, ids, mask), mask)
    hf_gguf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ref = torch_logits(hf_gguf.eval(), ids, mask)
    err_gguf = rel_err(got, ref, mask)
    print(f"tiny GGUF: rel err vs original torch {err_torch:.2e}, vs transformers GGUF load {err_gguf:.2e}")
    assert err_torch <= TOL and err_gguf <= TOL
    assert (got[mask].argmax(-1) == ref[mask].argmax(-1)).all()
    # Tokenizer: the one rebuilt from metadata tokenizes like transformers' GGUF tokenizer.
    ours_tok = AutoTokenizer.from_pretrained(str(out))
    ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "well, hello!"}]
    texts = ["hello world", "Hell's bells 42", "<s>user\nhi</s>", ours_tok.apply_chat_template(msgs, tokenize=False)]
    assert texts[-1] == ref_tok.apply_chat_template(msgs, tokenize=False)
    for t in texts:
        assert ours_tok(t).input_ids == ref_tok(t).input_ids, t
    assert ours_tok("hello world").input_ids[:2] == [92, 93]  # "he" "ll" merges applied
    assert (ours_tok.bos_token, ours_tok.eos_token, ours_tok.pad_token) == ("<s>", "</s>", "</s>")


def test_cli_convert_hf_dir_with_dtype_and_bad_input(tiny_gguf, tmp_path, capsys):
    import ml_dtypes
    from safetensors.numpy import load_file

    from emajax.cli import main
    from emajax.models.gguf import convert_gguf

    path, _ = tiny_gguf
    src = convert_gguf(path, tmp_path / "src")
    out = tmp_path / "bf16"
    assert main(["convert", "--model", str(src), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    t = load_file(str(out / "model.safetensors"))
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Bad input: one line naming the file.
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert main(["convert", "--model", str(junk), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "junk.gguf: not a valid GGUF file" in err and err.count("\n") == 1
    assert main(["convert", "--model", str(tmp_path / "none.gguf"), "--out", str(tmp_path / "x")]) == 2
    assert "none.gguf: file not found" in capsys.readouterr().err
    home = tmp_path / "precious"
    home.mkdir()
    (home / "notes.txt").write_text("keep me")
    assert main(["convert", "--model", str(src), "--out", str(home)]) == 2
    assert (home / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "x").exists()


def test_gguf_path_is_converted_once_into_cache_keyed_by_hash(tiny_gguf, tmp_path, monkeypatch):
    from emajax.models.hub import resolve_model_dir

    monkeypatch.setenv("EMAJAX_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    d = resolve_model_dir(str(path))
    assert d.parent == tmp_path / "cache" / "models" and d.name.startswith("tiny-llama-")
    stamp = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(path)) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in d.parent.iterdir()] == [d.name]  # no temp dirs left behind
    # A conversion from an older emajax version is redone in place.
    src = json.loads((d / "emajax_source.json").read_text())
    (d / "emajax_source.json").write_text(json.dumps({**src, "convert_version": 0}))
    assert resolve_model_dir(str(path)) == d
    assert json.loads((d / "emajax_source.json").read_text())["convert_version"] == src["convert_version"]
    assert [p.name for p in d.parent.iterdir()] == [d.name]


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_tokenizer(smollm2_dir, torch):
    """The converted default's tokenizer equals transformers' own GGUF tokenizer, chat template included
    (transformers' GGUF reader, the oracle here, needs torch)."""
    from transformers import AutoTokenizer

    from emajax.models.hub import DEFAULT_MODEL, embedded_gguf

    gguf = embedded_gguf(DEFAULT_MODEL)
    ours_tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42 — obviously."}]
    chat = ours_tok.apply_chat_template(msgs, tokenize=False)
    assert chat == ref_tok.apply_chat_template(msgs, tokenize=False)
    gen = ours_tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert gen == ref_tok.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    texts = ["What is the capital of France?", "  two  spaces, tabs\tand\nnewlines\n\n", "Year 2024: 3.14159 ≈ π",
             "héllo wörld 日本語 🙂", "don't I'LL we've <|im_end|><|endoftext|>", "def f(x):\n    return x**2", chat, gen]
    for t in texts:
        assert ours_tok(t).input_ids == ref_tok(t).input_ids, t
        assert ours_tok.decode(ours_tok(t).input_ids) == t
    assert ours_tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert (ours_tok.eos_token, ours_tok.pad_token, ours_tok.bos_token) == ("<|im_end|>", "<|im_end|>", "<|im_start|>")
