"""KV-cache inference (emajax.models.decode) against the training forward pass on the whole sequence."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emajax.models.config import DecoderConfig
from emajax.models.decode import DecodeCache, DecodeLayoutCache, cache_dtype, decode_weights, forward_cached
from emajax.models.decoder import Decoder
from emajax.models.lora import LoraConfig

BASE = DecoderConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
VARIANTS = {
    "llama-lora-tied": (BASE.replace(tie_word_embeddings=True), True),
    "qwen2-bias": (BASE.replace(model_type="qwen2", attention_bias=True, mlp_bias=True, attention_out_bias=True), False),
    "qwen3-qknorm-window": (BASE.replace(model_type="qwen3", qk_norm=True, sliding_window=3), True),
}


def _model(cfg: DecoderConfig, lora: bool, seed: int = 0) -> Decoder:
    m = Decoder(cfg, rngs=nnx.Rngs(seed), lora=LoraConfig(rank=2, alpha=4.0) if lora else None)
    key = jax.random.key(seed + 1)
    for path, v in nnx.iter_graph(m):  # non-zero biases, norms and adapter B, so each one matters
        if isinstance(v, nnx.Variable) and (path[-1] in ("bias", "lora_b", "scale")):
            key, sub = jax.random.split(key)
            v[...] = v[...] + 0.1 * jax.random.normal(sub, v[...].shape, v[...].dtype)
    return m


@functools.partial(jax.jit, static_argnames="cfg")
def _step(cfg, w, toks, pos, mask, slot, cache):
    return forward_cached(cfg, w, toks, pos, mask, slot, cache)


@nnx.jit(static_argnames="lora_scale")
def _full_logits(m, toks, pos, mask, lora_scale=1.0):
    return m.logits(m(toks, positions_bt=pos, attn_mask_bt=mask, lora_scale=lora_scale).hidden_btd)


def _decode_logits(m: Decoder, toks_bt: np.ndarray, mask_bt: np.ndarray, prefill: int, lora_scale: float = 1.0):
    """Logits at positions prefill-1 .. T-1 via one prefill and single-token steps."""
    b, t = toks_bt.shape
    pos = np.maximum(np.cumsum(mask_bt, axis=1) - 1, 0)
    w = decode_weights(m, lora_scale)
    cache = DecodeCache.init(m.cfg, b, t + 3)  # spare slots: never attended
    logits, cache = _step(m.cfg, w, toks_bt[:, :prefill], pos[:, :prefill], mask_bt[:, :prefill], 0, cache)
    out = [logits]
    for i in range(prefill, t):
        logits, cache = _step(m.cfg, w, toks_bt[:, i:i + 1], pos[:, i:i + 1], mask_bt[:, i:i + 1], i, cache)
        out.append(logits)
    return np.stack([np.asarray(x, np.float32) for x in out], axis=1), pos


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_matches_full_forward(name):
    cfg, lora = VARIANTS[name]
    m = _model(cfg, lora)
    rng = np.random.RandomState(0)
    toks = rng.randint(0, cfg.vocab_size, (2, 8)).astype(np.int32)
    mask = np.ones((2, 8), bool)
    mask[1, :2] = False  # row 1 left-padded, as generate pads
    got, pos = _decode_logits(m, toks, mask, prefill=5)
    full = _full_logits(m, toks, pos, mask)
    np.testing.assert_allclose(got, np.asarray(full)[:, 4:], rtol=2e-5, atol=2e-5)
    if lora:  # the adapter is folded into the layout with the given scale; 0 is the base model
        got0, _ = _decode_logits(m, toks, mask, prefill=5, lora_scale=0.0)
        base = _full_logits(m, toks, pos, mask, lora_scale=0.0)
        np.testing.assert_allclose(got0, np.asarray(base)[:, 4:], rtol=2e-5, atol=2e-5)
        assert not np.allclose(got0, got, atol=1e-3)


def test_bf16_decoding_within_rounding_of_the_training_forward():
    cfg = BASE.replace(dtype="bfloat16", param_dtype="bfloat16")
    m = _model(cfg, lora=False, seed=3)
    toks = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 7)).astype(np.int32)
    mask = np.ones((2, 7), bool)
    got, pos = _decode_logits(m, toks, mask, prefill=4)
    full = np.asarray(_full_logits(m, toks, pos, mask), np.float32)[:, 3:]
    # The two paths round bf16 intermediates in different places: within a few bf16 steps at the largest
    # logit (measured: about one step, 0.4 % of it).
    err = np.abs(got - full).max()
    assert err <= 2.0**-6 * np.abs(full).max()
    # Every position's top-2 logit gap here exceeds twice that error, so greedy decoding must pick the
    # same token everywhere.
    top2 = np.sort(full, -1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 2 * err
    np.testing.assert_array_equal(np.argmax(got, -1), np.argmax(full, -1))
    want = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16  # in-place writes on XLA:CPU
    assert cache_dtype(cfg) == want and DecodeCache.init(cfg, 1, 4).k_bkhs[0].dtype == want


def test_layout_cache_follows_the_weights_and_the_adapter_scale():
    if jax.default_backend() != "cpu":
        pytest.skip("the layout is kept between calls only on CPU")
    m = _model(BASE, lora=True, seed=4)
    cache = DecodeLayoutCache()
    a = cache.get(m, 1.0)
    assert cache.get(m, 1.0) is a  # same weights, same scale: reused
    b = cache.get(m, 0.5)
    assert b is not a
    # Replacing a parameter array (what training or nnx.update does) rebuilds the layout.
    m.blocks.mlp.down.kernel[...] = m.blocks.mlp.down.kernel[...] * 2.0
    c = cache.get(m, 0.5)
    assert c is not b and not np.allclose(np.asarray(c.layers[0].down_t), np.asarray(b.layers[0].down_t))
    fresh = decode_weights(m, 0.5)
    for x, y in zip(jax.tree.leaves(c), jax.tree.leaves(fresh)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    # Another model (same shapes) is another layout; two caches never share an entry.
    other = _model(BASE, lora=True, seed=5)
    assert cache.get(other, 0.5) is not c and DecodeLayoutCache().get(m, 0.5) is not cache.get(other, 0.5)
