"""Inference with a KV cache (prefill and single-token steps), on a copy of the weights laid out for it.

A decode step multiplies a handful of rows (one per sequence) by every weight of the model: it streams the
whole model from memory and is bound by bandwidth, not FLOPs. The layout here serves that stream:

* every kernel is stored transposed, [out, in], and contracted on its minor axis: XLA:CPU streams a
  weight in that order several times faster than one stored [in, out];
* q/k/v and gate/up are concatenated into one product each: a small product does not reach the memory
  bandwidth a larger one does;
* LoRA adapters are folded into the kernels (W + s A B in fp32, rounded once), once per layout, instead
  of costing two skinny products per projection per token;
* each layer owns its own cache buffer, written in place, then read (slicing one [L, ...] cache copies a
  layer's slice every step, and writing a step's keys into it converts the whole stack). On CPU the
  buffers are fp32 when the compute dtype is bf16, and attention reads them in fp32: XLA:CPU has no
  bf16 arithmetic, so updating a bf16 buffer converts it whole, every layer, every step. Elsewhere the
  buffers are in the compute dtype.

The layout (:func:`decode_weights`) is a copy of the weights. On CPU a :class:`DecodeLayoutCache` (held by
its caller, e.g. ``emajax.generate.Generator``) keeps it for the next call with the same model, weights and
adapter scale (rebuilding it is a pass over every weight), elsewhere it is built inside each call. :func:`forward_cached` runs T new
tokens per row (the prompt, then one token per step) and returns the last position's fp32 logits.

Semantics are the decoder's: the same RMSNorm, rope, attention mask and gated-MLP functions.
``tests/test_decode.py`` checks the logits against ``Decoder.__call__`` on the whole sequence.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emajax.models.attention import attend_cache
from emajax.models.config import DecoderConfig
from emajax.models.decoder import Decoder, apply_rope, attention_bias, gated_act, rms_norm, rope_tables
from emajax.models.lora import fold_lora
from emajax.models.matmul import mm_t


class DecodeLayer(NamedTuple):
    """One block's weights in the decode layout. Kernels are [out, in]; biases [out] or None."""

    in_norm_d: jax.Array
    qkv_t: jax.Array  # [Hq*Dh + 2*Hkv*Dh, D]: q, k and v rows stacked
    qkv_bias: jax.Array | None
    q_norm_h: jax.Array | None  # Qwen3 per-head norms
    k_norm_h: jax.Array | None
    o_t: jax.Array
    o_bias: jax.Array | None
    post_norm_d: jax.Array
    gate_up_t: jax.Array  # [2F, D]: gate rows, then up rows
    gate_up_bias: jax.Array | None
    down_t: jax.Array
    down_bias: jax.Array | None


class DecodeWeights(NamedTuple):
    layers: tuple[DecodeLayer, ...]
    embed_vd: jax.Array
    final_norm_d: jax.Array
    head_vd: jax.Array  # output projection [V, D] (the embedding itself when tied)
    steer_ld: jax.Array | None = None  # added to the residual stream after each block (as Decoder's steer_ld)


class DecodeCache(NamedTuple):
    """Per-layer key buffers [B, Hkv, Dh, S] (slots minor: the score product q K^T then runs over
    contiguous slots, faster on XLA:CPU than keys stored [B, Hkv, S, Dh]), value buffers
    [B, Hkv, S, Dh], and which slots hold real tokens [B, S]."""

    k_bkhs: tuple[jax.Array, ...]
    v_bksh: tuple[jax.Array, ...]
    valid_bs: jax.Array

    @staticmethod
    def init(cfg: DecoderConfig, batch: int, length: int) -> "DecodeCache":
        dt = cache_dtype(cfg)
        k_shape = (batch, cfg.num_kv_heads, cfg.head_dim, length)
        v_shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        zeros = lambda shape: tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))  # noqa: E731
        return DecodeCache(zeros(k_shape), zeros(v_shape), jnp.zeros((batch, length), bool))


def cache_dtype(cfg: DecoderConfig) -> Any:
    """fp32 on CPU for a bf16 model (see the module doc), else the compute dtype."""
    dt = jnp.dtype(cfg.dtype)
    return jnp.float32 if dt == jnp.bfloat16 and jax.default_backend() == "cpu" else dt


def _const(var: Any) -> jax.Array | None:
    """A parameter's value as a constant (decoding never differentiates the weights)."""
    return None if var is None else jax.lax.stop_gradient(var[...])


def _kernel(linear: Any, lora_scale: Any, dtype: Any) -> jax.Array:
    """The stacked [L, in, out] kernel with its adapter folded in, as [L, out, in] in ``dtype``."""
    w = _const(linear.kernel)
    if linear.lora_a is not None:
        w = fold_lora(w.astype(jnp.float32), _const(linear.lora_a), _const(linear.lora_b),
                      linear.lora_scaling * lora_scale)
    return jnp.swapaxes(w.astype(dtype), 1, 2)


def _bias(*linears: Any) -> jax.Array | None:
    if linears[0].bias is None:
        return None
    return jnp.concatenate([_const(l.bias) for l in linears], axis=-1)


def decode_weights(model: Decoder, lora_scale: Any = 1.0) -> DecodeWeights:
    """The model's weights in the decode layout (a copy; no gradient flows through it). Jittable.

    ``lora_scale`` multiplies the adapters as in ``Decoder.__call__`` (0 gives the base model)."""
    cfg = model.cfg
    dt = jnp.dtype(cfg.dtype)
    blk = model.blocks  # every parameter stacked on a leading [L] axis
    att, mlp = blk.attn, blk.mlp
    k = lambda lin: _kernel(lin, lora_scale, dt)  # noqa: E731
    qkv = jnp.concatenate([k(att.q), k(att.k), k(att.v)], axis=1)
    gate_up = jnp.concatenate([k(mlp.gate), k(mlp.up)], axis=1)
    o, down = k(att.o), k(mlp.down)
    qkv_b, o_b = _bias(att.q, att.k, att.v), _bias(att.o)
    gu_b, down_b = _bias(mlp.gate, mlp.up), _bias(mlp.down)
    scale = lambda n: None if n is None else _const(n.scale)  # noqa: E731
    in_norm, post_norm, q_norm, k_norm = (scale(n) for n in (blk.input_norm, blk.post_norm, att.q_norm, att.k_norm))
    at = lambda x, i: None if x is None else x[i]  # noqa: E731
    layers = tuple(
        DecodeLayer(in_norm[i], qkv[i], at(qkv_b, i), at(q_norm, i), at(k_norm, i), o[i], at(o_b, i), post_norm[i],
                    gate_up[i], at(gu_b, i), down[i], at(down_b, i))
        for i in range(cfg.num_layers))
    embed_vd = _const(model.embed)
    head_vd = embed_vd if model.lm_head is None else _const(model.lm_head).T
    return DecodeWeights(layers, embed_vd, _const(model.final_norm.scale), head_vd.astype(dt))


@functools.partial(jax.jit, static_argnames="graphdef")
def _decode_weights_jit(graphdef: Any, state: Any, lora_scale: jax.Array) -> DecodeWeights:
    return decode_weights(nnx.merge(graphdef, state), lora_scale)


class DecodeLayoutCache:
    """The decode layout of one model's current weights, kept between calls by whoever holds this (a
    ``Generator``): on CPU, :meth:`get` rebuilds it only when a parameter array was replaced (training,
    ``nnx.update``), the model changed or ``lora_scale`` changed; it holds weak references to the
    parameters, never the parameters themselves. Elsewhere :meth:`get` gives None: the caller builds the
    layout inside its own jitted program and frees it afterwards (a persistent copy would double the
    weights' accelerator memory)."""

    def __init__(self) -> None:
        self._key: tuple | None = None  # (weak ref to the model, weak refs to its arrays, lora_scale)
        self._layout: DecodeWeights | None = None

    def get(self, model: Decoder, lora_scale: float = 1.0) -> DecodeWeights | None:
        if jax.default_backend() != "cpu":
            return None
        graphdef, state = nnx.split(model)
        leaves = jax.tree.leaves(state)
        if self._key is not None:
            model_ref, refs, scale = self._key
            if (model_ref() is model and scale == lora_scale and len(refs) == len(leaves)
                    and all(r() is x for r, x in zip(refs, leaves))):
                return self._layout
        self._layout = _decode_weights_jit(graphdef, state, jnp.float32(lora_scale))
        self._key = (weakref.ref(model), [weakref.ref(x) for x in leaves], lora_scale)
        return self._layout


def _linear(x: jax.Array, w_t: jax.Array, bias: jax.Array | None) -> jax.Array:
    y = mm_t(x, w_t)
    return y if bias is None else y + bias.astype(y.dtype)


def forward_cached(cfg: DecoderConfig, w: DecodeWeights, tokens_bt: jax.Array, positions_bt: jax.Array,
                   mask_bt: jax.Array, slot: Any, cache: DecodeCache) -> tuple[jax.Array, DecodeCache]:
    """Run T new tokens per row (rope positions ``positions_bt``; ``mask_bt`` False for padding) whose
    keys/values go to cache slots ``slot .. slot + T - 1``. Returns the fp32 logits of the last position
    [B, V] and the updated cache. Each query attends the valid, causal slots (and the sliding window)."""
    b, t = tokens_bt.shape
    dt = jnp.dtype(cfg.dtype)
    hq, hk, dh = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    valid_bs = jax.lax.dynamic_update_slice(cache.valid_bs, mask_bt.astype(bool), (0, slot))
    bias_bts = attention_bias(cfg, slot + jnp.arange(t), valid_bs)
    cos, sin = rope_tables(cfg, positions_bt)
    h = jnp.take(w.embed_vd, tokens_bt, axis=0).astype(dt)  # [B, T, D]
    norm = lambda x, s: rms_norm(x, s, cfg.rms_norm_eps)  # noqa: E731
    ks, vs = list(cache.k_bkhs), list(cache.v_bksh)
    for i, lw in enumerate(w.layers):
        z = _linear(norm(h, lw.in_norm_d), lw.qkv_t, lw.qkv_bias)
        q = z[..., :hq].reshape(b, t, cfg.num_heads, dh)
        k = z[..., hq:hq + hk].reshape(b, t, cfg.num_kv_heads, dh)
        v = z[..., hq + hk:].reshape(b, t, cfg.num_kv_heads, dh)
        if lw.q_norm_h is not None:
            q, k = norm(q, lw.q_norm_h), norm(k, lw.k_norm_h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Write first, then attend over the buffer: reading the old buffer after an in-place write of
        # the new one made XLA copy every layer's cache each step.
        ks[i] = jax.lax.dynamic_update_slice(ks[i], k.transpose(0, 2, 3, 1).astype(ks[i].dtype), (0, 0, 0, slot))
        vs[i] = jax.lax.dynamic_update_slice(vs[i], v.transpose(0, 2, 1, 3).astype(vs[i].dtype), (0, 0, slot, 0))
        qg = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, dh).astype(ks[i].dtype)  # fp32 cache: fp32 scores
        a = attend_cache(qg, ks[i], vs[i], bias_bts, dh ** -0.5).astype(dt)
        h = h + _linear(a.reshape(b, t, hq), lw.o_t, lw.o_bias)
        gu = _linear(norm(h, lw.post_norm_d), lw.gate_up_t, lw.gate_up_bias)
        f = gu.shape[-1] // 2
        h = h + _linear(gated_act(gu[..., :f], gu[..., f:], cfg.hidden_act), lw.down_t, lw.down_bias)
        if w.steer_ld is not None:
            h = h + w.steer_ld[i].astype(dt)
    hidden_bd = norm(h[:, -1], w.final_norm_d)
    logits_bv = mm_t(hidden_bd.astype(w.head_vd.dtype), w.head_vd, jnp.float32)
    return logits_bv, DecodeCache(tuple(ks), tuple(vs), valid_bs)
