"""One config-driven Flax NNX decoder for Llama / Mistral / Qwen2 / Qwen3.

Layers are created stacked (a leading ``layers`` axis on every block parameter) and
applied with ``jax.lax.scan``, optionally under ``jax.checkpoint``: one compiled block
body regardless of depth, and remat halves activation memory. Everything the EM
defenses need from the forward pass is an explicit argument, never a global hook:

* ``capture_layers`` returns the residual stream after chosen blocks (LDIFS, persona
  vectors). The scan is split into segments at those layers so only the requested
  features are materialised, not one [L, B, T, D] stack.
* ``steer_ld`` adds a vector to the residual stream after every block (zeros where no
  steering is wanted): preventative steering in the training forward pass only.
* ``lora_scale`` multiplies every LoRA update; 0 gives the frozen base model, which is
  how the KL/LDIFS reference shares the weights with the trained model.

Incremental decoding with a KV cache is ``emajax.models.decode`` (its own weight layout).

Residual index convention (as HF ``hidden_states``): index 0 is the embedding output,
index l (1..L) is the residual stream after block l (before the final norm).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emajax.models.attention import attend_causal
from emajax.models.config import DecoderConfig, rope_inv_freq
from emajax.models.lora import LoraConfig, lora_delta
from emajax.models.lowp import recompute_vjp, stash, unstash
from emajax.models.matmul import mm
from emajax.losses.rows import constrain_rows


def _dtype(name: str) -> Any:
    return jnp.dtype(name)


class ForwardOut(NamedTuple):
    hidden_btd: jax.Array  # final-normed hidden states (multiply by lm_head for logits)
    features: tuple[jax.Array, ...]  # residual stream at each of capture_layers, [B, T, D]


class Linear(nnx.Module):
    """y = x W (+ b) (+ s · (x A) B). Kernel is [in, out]; LoRA A [in, r], B [r, out]."""

    def __init__(self, din: int, dout: int, *, bias: bool, lora: LoraConfig | None, cfg: DecoderConfig,
                 rngs: nnx.Rngs):
        pdt = _dtype(cfg.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (din, dout), pdt))
        self.bias = nnx.Param(jnp.zeros((dout,), pdt)) if bias else None
        self.dtype = _dtype(cfg.dtype)
        if lora is not None:
            ldt = _dtype(lora.dtype or cfg.param_dtype)
            # Kaiming-uniform A and zero B, as PEFT initialises them: the adapter starts as a no-op.
            bound = 1.0 / np.sqrt(din)
            self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (din, lora.rank), ldt, -bound, bound))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, dout), ldt))
            self.lora_scaling = lora.scaling
        else:
            self.lora_a = self.lora_b = None
            self.lora_scaling = 0.0

    def __call__(self, x: jax.Array, lora_scale: Any = 1.0) -> jax.Array:
        dt = self.dtype
        y = mm(x.astype(dt), self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        # A static scale of 0 (the KL/LDIFS reference pass) skips the adapter matmuls entirely.
        if self.lora_a is not None and not (isinstance(lora_scale, (int, float)) and lora_scale == 0):
            delta = lora_delta(x.astype(dt), self.lora_a[...], self.lora_b[...])
            y = y + (self.lora_scaling * lora_scale) * delta
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, cfg: DecoderConfig):
        self.scale = nnx.Param(jnp.ones((dim,), _dtype(cfg.param_dtype)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        fn = functools.partial(rms_norm, eps=self.eps)
        return (fn if x.dtype == jnp.float32 else recompute_vjp(fn))(x, self.scale[...])


def rms_norm(x: jax.Array, scale_d: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale, normalised in fp32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale_d.astype(x.dtype) * x32.astype(x.dtype)


def gated_act(g: jax.Array, u: jax.Array, act: str) -> jax.Array:
    """act(g) * u (SwiGLU / GeGLU), computed in fp32, result in g's dtype."""
    g32 = g.astype(jnp.float32)
    a = jax.nn.silu(g32) if act == "silu" else jax.nn.gelu(g32, approximate=act != "gelu")
    return (a * u.astype(jnp.float32)).astype(g.dtype)


def _rotate(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    half = x_bthd.shape[-1] // 2
    x = x_bthd.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos_btd[:, :, None, :half], sin_btd[:, :, None, :half]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x_bthd.dtype)


@jax.custom_vjp
def apply_rope(x_bthd: jax.Array, cos_btd: jax.Array, sin_btd: jax.Array) -> jax.Array:
    """Rotate-half rope (the HF convention: first and second halves of head_dim pair up), in fp32.

    Rope is a rotation, so its backward is the inverse rotation (sin negated): written out, because
    autodiff of the concatenate/negate form made XLA:CPU emit a slow transpose-pad-slice fusion per
    layer in bf16. The tables are constants: no gradient flows to them."""
    return _rotate(x_bthd, cos_btd, sin_btd)


def _rope_fwd(x_bthd, cos_btd, sin_btd):
    return _rotate(x_bthd, cos_btd, sin_btd), (cos_btd, sin_btd)


def _rope_bwd(res, g_bthd):
    cos_btd, sin_btd = res
    return _rotate(g_bthd, cos_btd, -sin_btd), jnp.zeros_like(cos_btd), jnp.zeros_like(sin_btd)


apply_rope.defvjp(_rope_fwd, _rope_bwd)


def rope_tables(cfg: DecoderConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv = jnp.asarray(rope_inv_freq(cfg))
    ang = positions_bt.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def attention_bias(cfg: DecoderConfig, q_slot_t: jax.Array, kv_valid_bs: jax.Array) -> jax.Array:
    """[B, T, S] additive attention mask shared by every layer: 0 where query t (at cache slot
    ``q_slot_t[t]``) may attend key slot s (causal, valid, inside the sliding window), else the most
    negative float32 (a fully masked row, e.g. a padding query, softmaxes to uniform and is ignored)."""
    slots = jnp.arange(kv_valid_bs.shape[1])
    allowed_ts = slots[None, :] <= q_slot_t[:, None]
    if cfg.sliding_window:
        allowed_ts &= slots[None, :] > q_slot_t[:, None] - cfg.sliding_window
    allowed_bts = allowed_ts[None] & kv_valid_bs[:, None, :]
    return jnp.where(allowed_bts, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def _lora_for(lora: LoraConfig | None, name: str) -> LoraConfig | None:
    return lora if lora is not None and name in lora.targets else None


class Attention(nnx.Module):
    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
        d, hq, hk = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        mk = lambda i, o, b, n: Linear(i, o, bias=b, lora=_lora_for(lora, n), cfg=cfg, rngs=rngs)
        self.q = mk(d, hq, cfg.attention_bias, "q")
        self.k = mk(d, hk, cfg.attention_bias, "k")
        self.v = mk(d, hk, cfg.attention_bias, "v")
        self.o = mk(hq, d, cfg.attention_out_bias, "o")
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg)
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x_btd, cos, sin, mask_bias_bts, lora_scale):
        cfg = self.cfg
        b, t, _ = x_btd.shape
        q = self.q(x_btd, lora_scale).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k(x_btd, lora_scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(x_btd, lora_scale).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        qg = q.reshape(b, t, cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)
        out = attend_causal(qg, k, v, mask_bias_bts, cfg.head_dim ** -0.5)
        out = out.reshape(b, t, cfg.num_heads * cfg.head_dim)
        return self.o(out, lora_scale)


class MLP(nnx.Module):
    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
        d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate = Linear(d, f, bias=bias, lora=_lora_for(lora, "gate"), cfg=cfg, rngs=rngs)
        self.up = Linear(d, f, bias=bias, lora=_lora_for(lora, "up"), cfg=cfg, rngs=rngs)
        self.down = Linear(f, d, bias=bias, lora=_lora_for(lora, "down"), cfg=cfg, rngs=rngs)
        self.act = cfg.hidden_act

    def __call__(self, x, lora_scale):
        g, u = self.gate(x, lora_scale), self.up(x, lora_scale)
        fn = functools.partial(gated_act, act=self.act)
        return self.down((fn if g.dtype == jnp.float32 else recompute_vjp(fn))(g, u), lora_scale)


class Block(nnx.Module):
    def __init__(self, cfg: DecoderConfig, lora: LoraConfig | None, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.attn = Attention(cfg, lora, rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        self.mlp = MLP(cfg, lora, rngs)

    def __call__(self, h, cos, sin, mask_bias_bts, lora_scale):
        h = h + self.attn(self.input_norm(h), cos, sin, mask_bias_bts, lora_scale)
        return h + self.mlp(self.post_norm(h), lora_scale)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Causal LM. ``Decoder(cfg, rngs=nnx.Rngs(0), lora=LoraConfig(...))``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs, lora: LoraConfig | None = None):
        lora = lora if lora is not None and lora.enabled else None
        self.cfg = cfg
        self.lora_config = lora
        pdt = _dtype(cfg.param_dtype)
        self.embed = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r: nnx.Rngs) -> Block:
            return Block(cfg, lora, r)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt))

    # ------------------------------------------------------------------ heads
    def lm_head_dv(self) -> jax.Array:
        """Output projection [D, V] in compute dtype (the transposed embedding when tied)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(_dtype(self.cfg.dtype))

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        return jnp.dot(hidden_btd, self.lm_head_dv(), preferred_element_type=jnp.float32)

    # ---------------------------------------------------------------- forward
    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        attn_mask_bt: jax.Array | None = None,
        capture_layers: Sequence[int] = (),
        steer_ld: jax.Array | None = None,
        lora_scale: Any = 1.0,
        const_weights: bool = False,
    ) -> ForwardOut:
        """``const_weights=True`` treats the block weights as constants (no gradient flows to them:
        scoring, probes). bf16 weight stacks then enter the layer scan as uint16 bits, because XLA:CPU
        would otherwise convert every stack to fp32 once and slice and convert each layer's weights
        back to bf16 at every step (``emajax.models.lowp`` has the measurements)."""
        cfg = self.cfg
        b, t = tokens_bt.shape
        dt = _dtype(cfg.dtype)
        if attn_mask_bt is None:
            attn_mask_bt = jnp.ones((b, t), bool)
        attn_mask_bt = attn_mask_bt.astype(bool)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask_bias_bts = attention_bias(cfg, jnp.arange(t), attn_mask_bt)
        cos, sin = rope_tables(cfg, positions_bt)
        h = constrain_rows(jnp.take(self.embed[...], tokens_bt, axis=0).astype(dt))

        layers = sorted(set(int(l) for l in capture_layers))
        for l in layers:
            if not 0 <= l <= cfg.num_layers:
                raise ValueError(f"capture layer {l} outside 0..{cfg.num_layers}")
        if steer_ld is None:
            steer_ld = jnp.zeros((cfg.num_layers, cfg.hidden_size), dt)
        steer_ld = steer_ld.astype(dt)

        gdef, bstate = nnx.split(self.blocks)

        def body(h_btd, xs):
            layer_state, steer_d = xs
            if const_weights:
                layer_state = jax.tree.map(unstash, layer_state)
            block = nnx.merge(gdef, layer_state)
            return constrain_rows(block(h_btd, cos, sin, mask_bias_bts, lora_scale) + steer_d), None

        if cfg.remat in _REMAT_POLICIES:
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        elif cfg.remat != "none":
            raise ValueError(f"remat must be one of none|full|dots, got {cfg.remat!r}")

        features: dict[int, jax.Array] = {}
        bounds = [l for l in layers if 0 < l < cfg.num_layers] + [cfg.num_layers]
        start = 0
        if 0 in layers:
            features[0] = h
        for end in bounds:
            seg_state = jax.tree.map(lambda x, a=start, e=end: x[a:e], bstate)
            if const_weights:
                seg_state = jax.tree.map(lambda w: stash(jax.lax.stop_gradient(w)), seg_state)
            h, _ = jax.lax.scan(body, h, (seg_state, steer_ld[start:end]))
            features[end] = h
            start = end
        return ForwardOut(self.final_norm(h), tuple(features[l] for l in layers))


def steering_array(cfg: DecoderConfig, vectors: dict[int, Any], coef: float = 1.0) -> jax.Array:
    """[L, D] additive steering: ``vectors[l]`` (residual index l, 1..L) scaled by coef, zero elsewhere."""
    out = np.zeros((cfg.num_layers, cfg.hidden_size), np.float32)
    for l, v in vectors.items():
        if not 1 <= l <= cfg.num_layers:
            raise ValueError(f"steering layer {l} outside 1..{cfg.num_layers}")
        out[l - 1] += coef * np.asarray(v, np.float32)
    return jnp.asarray(out)


def abstract_decoder(cfg: DecoderConfig, lora: LoraConfig | None = None) -> Decoder:
    """Shapes-only model (no memory allocated) for planning shardings and streaming weights in."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), lora=lora))
