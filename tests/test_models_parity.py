"""Logits parity with HF transformers (torch fp32, test-only oracle) through emajax's checkpoint loader.

Each tiny architecture is saved with ``save_pretrained`` and loaded with ``load_model``; logits on a
right-padded batch must match to rel err <= 1e-4 with identical argmax on the valid positions.
"""

from __future__ import annotations

import numpy as np
import pytest

from tiny_hf import TOL, VARIANTS, ours, padded_batch, rel_err, save_tiny, torch_logits



@pytest.fixture(scope="module")
def tiny_dirs(torch, tmp_path_factory):
    out = {}
    for i, kind in enumerate(VARIANTS):
        d = tmp_path_factory.mktemp(kind)
        out[kind] = (d, save_tiny(kind, d, seed=i))
    return out


@pytest.mark.parametrize("kind", VARIANTS)
def test_tiny_logits_match_transformers(kind, tiny_dirs):
    from emajax.models.hub import load_model

    d, torch_model = tiny_dirs[kind]
    ids, mask = padded_batch()
    ref = torch_logits(torch_model, ids, mask)
    lm = load_model(str(d))
    got = ours(lm.model, ids, mask)
    err = rel_err(got, ref, mask)
    print(f"{kind}: rel err {err:.2e}")
    assert err <= TOL
    assert (got[mask].argmax(-1) == ref[mask].argmax(-1)).all()
    # The loader reads the architecture flags from config.json.
    cfg = lm.config
    assert cfg.tie_word_embeddings == kind.endswith("_tied")
    assert (lm.model.lm_head is None) == cfg.tie_word_embeddings
    assert cfg.num_kv_heads < cfg.num_heads
    assert cfg.qk_norm == (kind == "qwen3_untied")
    assert cfg.attention_bias == (kind == "qwen2_tied")
    if kind == "llama3_untied":
        assert cfg.rope_scaling_dict["rope_type"] == "llama3"


@pytest.mark.devices(8)
def test_mesh_load_gives_identical_logits(tiny_dirs):
    """Params streamed onto a simulated 2x2x2 mesh give the single-device logits."""
    from emajax.models.hub import load_model
    from emajax.models.sharding import make_mesh

    d, torch_model = tiny_dirs["llama3_untied"]
    ids, mask = padded_batch()
    single = ours(load_model(str(d)).model, ids, mask)
    mesh = make_mesh(2, 2, 2)
    lm = load_model(str(d), mesh=mesh)
    q = lm.model.blocks.attn.q.kernel[...]
    assert len(q.sharding.device_set) == 8 and not q.is_fully_replicated
    assert q.sharding.spec[1:] == ("fsdp", "tensor")
    sharded = ours(lm.model, ids, mask)
    diff = float(np.abs(sharded - single).max())
    print(f"mesh vs single-device max abs diff {diff:.2e}")
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    assert (sharded.argmax(-1) == single.argmax(-1)).all()


# ------------------------------------------------------------------ SmolLM2-135M (real weights)
SMOL_TEXTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]


def _smol_batch(tokenizer):
    enc = [tokenizer(t).input_ids for t in SMOL_TEXTS]
    t = max(map(len, enc))
    ids = np.full((len(enc), t), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(enc), t), bool)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = e
        mask[i, :len(e)] = True
    return ids, mask


@pytest.fixture(scope="module")
def smol_ours(smollm2):
    ids, mask = _smol_batch(smollm2.tokenizer)
    assert not mask.all()  # really padded
    return ids, mask, ours(smollm2.model, ids, mask)


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_converted_dir(smollm2_dir, smol_ours, torch):
    from transformers import AutoModelForCausalLM

    ids, mask, got = smol_ours
    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ref = torch_logits(hf, ids, mask)
    err = rel_err(got, ref, mask)
    print(f"SmolLM2 vs transformers(converted dir): rel err {err:.2e}")
    assert err <= TOL
    assert (got[mask].argmax(-1) == ref[mask].argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_logits_match_transformers_own_gguf_load(smol_ours, torch):
    """The conversion equals transformers' own GGUF import of the same file (dequant + un-permute)."""
    from transformers import AutoModelForCausalLM

    from emajax.models.hub import DEFAULT_MODEL, embedded_gguf

    ids, mask, got = smol_ours
    gguf = embedded_gguf(DEFAULT_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ref = torch_logits(hf, ids, mask)
    err = rel_err(got, ref, mask)
    print(f"SmolLM2 vs transformers(own GGUF load): rel err {err:.2e}")
    assert err <= TOL
    assert (got[mask].argmax(-1) == ref[mask].argmax(-1)).all()
