"""Decoder semantics that the defenses rely on: captures, steering, LoRA switch, KV cache, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emajax.models.config import ConfigError, DecoderConfig
from emajax.models.decoder import Decoder, steering_array
from emajax.models.lora import LoraConfig
from emajax.models.sharding import make_mesh, param_specs

CFG = DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model() -> Decoder:
    m = Decoder(CFG, rngs=nnx.Rngs(0), lora=LoraConfig(rank=2, alpha=4.0))
    # Non-zero B so the adapters change the output.
    for _, v in nnx.iter_graph(m):
        if isinstance(v, nnx.Module) and getattr(v, "lora_b", None) is not None:
            v.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(1), v.lora_b[...].shape)
    return m


def _tokens(b=2, t=6):
    return jnp.asarray(np.random.RandomState(0).randint(0, CFG.vocab_size, (b, t)))


def test_capture_matches_layer_by_layer_residual(model):
    toks = _tokens()
    full = model(toks, capture_layers=(0, 1, 2, 3, 4))
    again = model(toks, capture_layers=(2,))
    np.testing.assert_allclose(full.features[2], again.features[0], rtol=1e-6)
    # Capturing must not change the output.
    np.testing.assert_allclose(full.hidden_btd, model(toks).hidden_btd, rtol=1e-6)
    assert not np.allclose(full.features[1], full.features[2])
    with pytest.raises(ValueError, match="outside 0..4"):
        model(toks, capture_layers=(5,))


def test_steering_adds_to_chosen_layer_only(model):
    toks = _tokens()
    base = model(toks, capture_layers=(1, 2, 3))
    vec = np.ones(CFG.hidden_size, np.float32)
    steer = steering_array(CFG, {2: vec}, coef=3.0)
    st = model(toks, capture_layers=(1, 2, 3), steer_ld=steer)
    np.testing.assert_allclose(st.features[0], base.features[0], rtol=1e-6)  # before layer 2: unchanged
    np.testing.assert_allclose(st.features[1], base.features[1] + 3.0, rtol=1e-5, atol=1e-5)
    assert not np.allclose(st.features[2], base.features[2] + 3.0, atol=1e-3)  # propagates non-trivially


def test_lora_scale_zero_is_base_model(model):
    toks = _tokens()
    base = Decoder(CFG, rngs=nnx.Rngs(5))  # no adapters; give it the LoRA model's base weights
    _, _, lora_base_params = nnx.split(model, nnx.LoRAParam, nnx.Param)  # LoRAParam subclasses Param
    nnx.update(base, lora_base_params)
    off = model(toks, lora_scale=0.0).hidden_btd
    np.testing.assert_allclose(off, base(toks).hidden_btd, rtol=1e-6)
    assert not np.allclose(off, model(toks).hidden_btd, atol=1e-4)


def test_const_weights_bf16_is_bit_identical_and_stops_weight_gradients():
    """const_weights (bf16 stacks as uint16 bits through the scan) leaves a forward pass bit-identical,
    and no gradient reaches the weights, by contract."""
    m = Decoder(CFG.replace(dtype="bfloat16", param_dtype="bfloat16"), rngs=nnx.Rngs(5))
    toks = _tokens(2, 8)
    a = m(toks).hidden_btd
    b = m(toks, const_weights=True).hidden_btd
    assert a.dtype == jnp.bfloat16 and bool(jnp.all(a == b))
    g = nnx.grad(lambda mm: jnp.sum(mm(toks, const_weights=True).hidden_btd.astype(jnp.float32)))(m)
    assert float(jnp.abs(g.blocks.mlp.down.kernel[...].astype(jnp.float32)).max()) == 0.0
    assert float(jnp.abs(g.embed[...].astype(jnp.float32)).max()) > 0.0  # the embedding is outside the scan


def test_remat_gives_same_values_and_grads():
    toks = _tokens()
    m1 = Decoder(CFG, rngs=nnx.Rngs(3))
    m2 = Decoder(CFG.replace(remat="full"), rngs=nnx.Rngs(3))

    def loss(m):
        return jnp.mean(m.logits(m(toks).hidden_btd) ** 2)

    g1 = nnx.grad(loss)(m1)
    g2 = nnx.grad(loss)(m2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.devices(8)
def test_sharding_rules_cover_every_param_and_drop_nondividing_axes():
    mesh = make_mesh(2, 2, 2)
    _, state = nnx.split(nnx.eval_shape(lambda: Decoder(CFG, rngs=nnx.Rngs(0), lora=LoraConfig(rank=2))))
    specs = param_specs(state, mesh)
    flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]}
    q = next(s for k, s in flat.items() if "'q'" in k and "kernel" in k)
    o = next(s for k, s in flat.items() if "'o'" in k and "kernel" in k)
    assert tuple(q) == (None, "fsdp", "tensor") and tuple(o) == (None, "tensor", "fsdp")
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(4, 2, 2)
    odd = CFG.replace(vocab_size=63)
    _, st2 = nnx.split(nnx.eval_shape(lambda: Decoder(odd, rngs=nnx.Rngs(0))))
    emb = [s for p, s in jax.tree_util.tree_flatten_with_path(param_specs(st2, mesh))[0]
           if "embed" in jax.tree_util.keystr(p)][0]
    assert tuple(emb) == (None, "fsdp")  # 63 rows do not split over tensor=2


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported"):
        DecoderConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match="field 'num_attention_heads' is missing"):
        DecoderConfig.from_hf_dict({"model_type": "llama", "vocab_size": 3})
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "llama",\n "vocab_size": }')
    with pytest.raises(ConfigError, match="line 2"):
        DecoderConfig.from_hf_file(bad)
