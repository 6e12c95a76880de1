"""LoRA adapter settings (the parameters themselves live in ``decoder.Linear``).

``LoraConfig`` is the one LoRA type: models are built with it and a training config's ``lora:`` section
is one (``enabled: false`` = full fine-tuning). Scaling is alpha / r, or alpha / sqrt(r) for
rank-stabilised LoRA (rs-LoRA), matching PEFT's ``use_rslora`` so exported adapters behave identically
there and in vLLM.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from emajax.models.lowp import stash, unstash
from emajax.models.matmul import row_major_t

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# emajax module name -> HF / PEFT module name
HF_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    rslora: bool = False
    targets: tuple[str, ...] = ALL_TARGETS  # emajax names (q, ..., down) or HF names (q_proj, ...)
    dtype: str | None = "float32"  # adapter parameter dtype; None = the model's param_dtype
    enabled: bool = True  # False: no adapters (a model built with it has none)

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora rank must be positive, got {self.rank}")
        bad = [t for t in self.targets if t not in ALL_TARGETS and t not in HF_MODULE_NAMES.values()]
        if bad:
            raise ValueError(f"unknown LoRA target module(s) {bad}; choose from {ALL_TARGETS}")
        # Accept HF names (q_proj, ...) as well as emajax's.
        inv = {v: k for k, v in HF_MODULE_NAMES.items()}
        object.__setattr__(self, "targets", tuple(inv.get(t, t) for t in self.targets))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# ----------------------------------------------------------------------------- the adapter's matmuls
def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _dot(a, b):
    """a @ b in a's dtype with fp32 accumulation (see emajax.models.matmul for why)."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


@jax.custom_vjp
def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``(x @ a) @ b`` in x's dtype (a, b are cast to it; the caller applies the scaling) with a
    hand-written backward; 16-bit residuals are kept as bits (``emajax.models.lowp``).

    Why: differentiating this inside the layer ``scan`` let XLA:CPU contract the B-gradient over the
    token axis by physically transposing the [tokens, out] cotangent, fused with the activation
    backward into one slow loop that dominated the LoRA step. The backward below transposes only [tokens, r]-sized arrays (r is 8-64) and keeps
    every large operand row-major, so each product is one XLA:CPU runs as a native bf16 dot.
    """
    return _dot(_dot(x, a.astype(x.dtype)), b.astype(x.dtype))


def _lora_fwd(x, a, b):
    xa = _dot(x, a.astype(x.dtype))
    return _dot(xa, b.astype(x.dtype)), (stash(x), a, b, stash(xa))


def _dot_t(a, b):
    """a @ b.T (a [M, K], b [N, K]) in a's dtype, fp32 accumulation, with no transpose op."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(a.dtype)


def _lora_bwd(res, g):
    x, a_orig, b_orig, xa = unstash(res[0]), res[1], res[2], unstash(res[3])
    a, b = a_orig.astype(x.dtype), b_orig.astype(x.dtype)
    g = g.astype(x.dtype)
    x2, xa2, g2 = _flat(x), _flat(xa), _flat(g)
    gb = _dot_t(g2, b)  # [N, r]: cotangent of x @ a
    dx = _dot_t(gb, a).reshape(x.shape)
    db = _dot(row_major_t(xa2), g2)  # [r, out]; row-major transposes keep these bf16 products native
    da = _dot(row_major_t(gb), x2).T  # [in, r]
    return dx, da.astype(a_orig.dtype), db.astype(b_orig.dtype)


lora_delta.defvjp(_lora_fwd, _lora_bwd)


# ----------------------------------------------------------------------------- folding a frozen adapter
def fold_lora(w, a, b, scaling):
    """W + scaling * A @ B (any leading axes, e.g. stacked layers) summed in fp32, rounded once to W's dtype."""
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scaling * delta).astype(w.dtype)


def merge_lora_kernels(base_state, lora_state, scaling: float = 1.0):
    """``base_state`` (an ``nnx.State`` of params) with every adapted kernel replaced by W + s * A @ B.

    Pure and jittable: the adapter stays an *input*, so one compiled program serves every adapter of an
    ensemble. The sum is formed in fp32 and rounded once to W's dtype. Why: for a frozen adapter scored over
    thousands of tokens, folding costs one [in, r] x [r, out] product per matrix per call, while the unmerged
    path runs two skinny matmuls per token that XLA:CPU executes slowly.
    """
    from flax import nnx

    lora = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(lora_state)}
    out = []
    for path, var in nnx.to_flat_state(base_state):
        key = tuple(map(str, path))
        if key[-1] == "kernel" and key[:-1] + ("lora_a",) in lora:
            a, b = lora[key[:-1] + ("lora_a",)][...], lora[key[:-1] + ("lora_b",)][...]
            var = var.replace(fold_lora(var[...], a, b, scaling))
        out.append((path, var))
    return nnx.from_flat_state(out)
