"""Decoder configuration: one dataclass covers Llama, Mistral, Qwen2 and Qwen3.

Built from a Hugging Face ``config.json`` so that checkpoints round-trip without a
per-architecture model class; the fields that differ between families (qkv bias,
q/k norm, rope scaling, tied embeddings, explicit head_dim) are flags here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from emajax.atomic import read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ConfigError(ValueError):
    """A config.json that emajax cannot build a decoder from."""



@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict of the HF rope_scaling
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2 always; Llama optional)
    attention_out_bias: bool = False  # o_proj bias (Llama attention_bias covers it too)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 per-head RMSNorm on q and k before rope
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Compute settings (not part of the checkpoint).
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # none | full | dots  (policy inside the layer scan)

    # ---------------------------------------------------------------- helpers
    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **kw: Any) -> "DecoderConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_layers
        qd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * qd + 2 * d * kd + qd * d + 3 * d * f + 2 * d
        return l * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    # ------------------------------------------------------------- HF in/out
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> "DecoderConfig":
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if "text_config" in hf and "hidden_size" not in hf:
            hf = {**hf["text_config"], "model_type": mt}

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: field {key!r} is missing")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "gelu", "gelu_pytorch_tanh"):
            raise ConfigError(f"{source}: field 'hidden_act' = {act!r} is not supported")
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or hidden // num_heads
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_scaling = hf.get("rope_scaling") or None
        # transformers v5 moved rope settings into rope_parameters.
        rope_params = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if rtype not in ("default", "llama3", "linear"):
                raise ConfigError(f"{source}: rope_scaling type {rtype!r} is not supported")
            rope_scaling = tuple(sorted((k, _freeze(v)) for k, v in {**rope_scaling, "rope_type": rtype}.items()))
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = None
        if mt == "mistral":
            sliding = hf.get("sliding_window")
        elif mt in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            sliding = hf.get("sliding_window")
        return cls(
            model_type=mt,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", mt == "llama" and False)),
            attention_bias=(mt == "qwen2") or (mt in ("llama", "mistral", "qwen3") and attention_bias),
            attention_out_bias=(mt in ("llama", "qwen3") and attention_bias),
            mlp_bias=bool(hf.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=(mt == "qwen3"),
            sliding_window=int(sliding) if sliding else None,
            hidden_act=act,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "DecoderConfig":
        path = Path(path)
        return cls.from_hf_dict(read_json(path, ConfigError), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                             else (self.eos_token_ids[0] if self.eos_token_ids else None)),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type in ("llama", "qwen3"):
            out["attention_bias"] = self.attention_out_bias
        if self.model_type == "llama":
            out["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        return out


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    """Inverse rotary frequencies [head_dim/2], with Llama-3 / linear scaling applied (as HF computes them)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    rs = cfg.rope_scaling_dict
    if not rs or rs.get("rope_type") == "default":
        return inv.astype(np.float32)
    if rs["rope_type"] == "linear":
        return (inv / float(rs["factor"])).astype(np.float32)
    # llama3
    factor = float(rs["factor"])
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
