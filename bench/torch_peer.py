"""The PyTorch peer of ``python -m bench``: what a user of the paper's stack would run (transformers + PEFT).

* LoRA ops: ``peft.get_peft_model`` (r, alpha = 2r, no dropout, all seven projections), AdamW, grad
  clipping 1.0 — the same optimiser recipe emajax's step applies.
* ``lora_kl``: reference logits from the same model with ``model.disable_adapter()`` under ``no_grad``
  (as the paper's code does), KL(p_theta || p_ref) over the full vocabulary, answer-masked.
* ``lora_ldifs``: residual stream after 5 evenly spaced blocks captured with forward hooks, reference
  features with adapters off under ``no_grad``; the distance keeps its gradient through the trained
  features (emajax's definition, not the paper's detached one — the cost is what is measured here).
* ``lora_steer``: a forward hook on one decoder layer adds coef x vector to its output.
* ``full``: every parameter trained, plain CE.
* ``score``: per-example answer NLL from a forward under ``inference_mode``.
* ``generate``: ``model.generate`` greedy with KV cache, EOS disabled.

Stacks: ``torch-fp32``; ``torch-bf16`` = ``torch.autocast("cpu", torch.bfloat16)`` around forward and loss
(fp32 master weights) for training and scoring, and bf16 weights for ``generate`` (autocast re-casts
every weight at every decoding step, bf16 weights are what a user would pick there) and for ``grpo`` (TRL
loads bf16 weights and adds its autocast: ``bench.grpo``).
torch is imported only here, never by emajax.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bench.harness import (KL_WEIGHT, LDIFS_WEIGHT, STEER_COEF, Spec, current_rss_mb, steering_layer,
                           steering_vector, synthetic_batch, synthetic_prompts, time_calls)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(spec: Spec, dtype: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=dtype or torch.float32)
    model.config.use_cache = False
    return model.to(spec.device)


def _autocast(spec: Spec) -> Any:
    import torch

    if spec.dtype == "bfloat16":
        return torch.autocast(spec.device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync(spec: Spec) -> None:
    if spec.device == "cuda":
        import torch

        torch.cuda.synchronize()


def _device_extras(spec: Spec) -> dict[str, Any]:
    """Threads (CPU) or the GPU's name and peak allocated memory (CUDA)."""
    import torch

    if spec.device == "cuda":
        return {"device_name": torch.cuda.get_device_name(), "device_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    return {"torch_threads": torch.get_num_threads()}


def _ldifs_layers(num_layers: int, n: int = 5) -> list[int]:
    """Residual indices 1..L of n evenly spaced blocks (same rule as emajax.losses.ldifs_layers)."""
    import numpy as np

    return [int(i) + 1 for i in np.floor(np.linspace(0.0, num_layers - 1, min(n, num_layers))).astype(int)]


def _decoder_layers(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers


def _normalised_flat(f: Any, mask: Any) -> Any:
    f = (f.float() * mask[..., None]).reshape(f.shape[0], -1)
    return f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def train_op(spec: Spec) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    model = _load(spec)
    cfg = model.config
    if spec.op != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    rss_loaded = current_rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    host = synthetic_batch(cfg.vocab_size, spec.batch, spec.seq, spec.seed)
    dev = spec.device
    ids = torch.from_numpy(host["inputs"]).long().to(dev)
    tgt = torch.from_numpy(host["targets"]).long().to(dev)
    attn = torch.from_numpy(host["attn_mask"]).long().to(dev)
    mask = torch.from_numpy(host["loss_mask"]).float().to(dev)
    layers = _decoder_layers(model)

    feats: dict[int, Any] = {}
    if spec.op == "lora_ldifs":
        for l in _ldifs_layers(cfg.num_hidden_layers):
            layers[l - 1].register_forward_hook(lambda _m, _i, out, l=l: feats.__setitem__(l, out))
    if spec.op == "lora_steer":
        vec = torch.from_numpy(steering_vector(cfg.hidden_size, spec.seed)).to(spec.device) * STEER_COEF
        layers[steering_layer(cfg.num_hidden_layers) - 1].register_forward_hook(lambda _m, _i, out: out + vec.to(out.dtype))

    def masked_mean(x_bt: Any) -> Any:
        return (x_bt * mask).sum() / mask.sum().clamp_min(1.0)

    def loss_fn() -> Any:
        with _autocast(spec):
            ref_logits = ref_feats = None
            if spec.op in ("lora_kl", "lora_ldifs"):
                with torch.no_grad(), model.disable_adapter():
                    ref_logits = model(input_ids=ids, attention_mask=attn).logits
                    ref_feats = dict(feats)
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            logp = F.log_softmax(logits, dim=-1)
            loss = masked_mean(-logp.gather(-1, tgt[..., None])[..., 0])
            if spec.op == "lora_kl":
                ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
                kl = (logp.exp() * (logp - ref_logp)).sum(-1)
                loss = loss + KL_WEIGHT * masked_mean(kl)
            if spec.op == "lora_ldifs":
                am = attn.float()
                d = sum(((_normalised_flat(feats[l], am) - _normalised_flat(ref_feats[l], am)) ** 2).sum(-1)
                        for l in feats)
                loss = loss + LDIFS_WEIGHT * d.mean()
        return loss

    losses: list[float] = []

    def once() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    t = time_calls(once, warmup=max(spec.warmup - 1, 0), runs=spec.runs)
    return {**t, "compile_s": None, "first_s": first, "loss_first": losses[0], "rss_after_load_mb": rss_loaded,
            **_device_extras(spec)}


def score_op(spec: Spec) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    model = _load(spec).eval()
    rss_loaded = current_rss_mb()
    host = synthetic_batch(model.config.vocab_size, spec.batch, spec.seq, spec.seed)
    ids = torch.from_numpy(host["inputs"]).long().to(spec.device)
    tgt = torch.from_numpy(host["targets"]).long().to(spec.device)
    attn = torch.from_numpy(host["attn_mask"]).long().to(spec.device)
    mask = torch.from_numpy(host["loss_mask"]).float().to(spec.device)
    box: dict[str, Any] = {}

    def once() -> None:
        with torch.inference_mode(), _autocast(spec):
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
            box["out"] = ((nll * mask).sum(1), mask.sum(1))
        _sync(spec)

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    t = time_calls(once, warmup=max(spec.warmup - 1, 0), runs=spec.runs)
    s, n = box["out"]
    return {**t, "compile_s": None, "first_s": first, "mean_nll": float(s.sum() / n.sum()),
            "rss_after_load_mb": rss_loaded, **_device_extras(spec)}


def generate_op(spec: Spec) -> dict[str, Any]:
    import torch

    model = _load(spec, torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32).eval()
    model.generation_config.eos_token_id = None  # exactly new_tokens per row, as the emajax worker
    rss_loaded = current_rss_mb()
    prompts = synthetic_prompts(model.config.vocab_size, spec.batch, spec.prompt_len, spec.seed)
    ids = torch.tensor(prompts).to(spec.device)
    attn = torch.ones_like(ids)
    box: dict[str, Any] = {}

    def once() -> None:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=attn, max_new_tokens=spec.new_tokens,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        box["out"] = out[:, ids.shape[1]:].tolist()

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    t = time_calls(once, warmup=max(spec.warmup - 1, 0), runs=spec.runs)
    return {**t, "compile_s": None, "first_s": first, "tokens": box["out"], "rss_after_load_mb": rss_loaded,
            **_device_extras(spec), "mode": "bf16 weights" if spec.dtype == "bfloat16" else "fp32"}


def run(spec: Spec) -> dict[str, Any]:
    if spec.op == "grpo":  # TRL's GRPOTrainer on transformers + PEFT
        from bench.grpo import trl_step

        return trl_step(spec)
    if spec.op == "score":
        return score_op(spec)
    if spec.op == "generate":
        return generate_op(spec)
    return train_op(spec)
