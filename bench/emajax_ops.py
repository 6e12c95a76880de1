"""The emajax side of ``python -m bench``: one op, timed in this (worker) process.

Training ops use the library's own public pieces (``emajax.train.state.create_state``,
``emajax.train.step.compile_train_step``, ``emajax.train.optim.make_optimizer``), i.e. exactly the step
``emajax train`` runs: jit with explicit shardings on a one-device mesh, state donated. Compilation is
done ahead of time (``lower().compile()``) and reported separately as ``compile_s``.

Stacks: ``emajax-fp32`` (fp32 params and compute) and ``emajax-bf16`` (bf16 compute; fp32 master
params when training, bf16 params for score/generate, i.e. inference weights in bf16).
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any, Callable

from bench.harness import (KL_WEIGHT, LDIFS_WEIGHT, STEER_COEF, Spec, current_rss_mb, steering_layer,
                           steering_vector, synthetic_batch, synthetic_prompts, time_calls)


def _check_device(spec: Spec) -> None:
    import jax

    want = "gpu" if spec.device == "cuda" else "cpu"
    if jax.default_backend() != want:
        raise SystemExit(f"bench: --device {spec.device} but jax's default backend is {jax.default_backend()!r}")


def _device_extras() -> dict[str, Any]:
    """On an accelerator: its name and peak bytes in use (host RSS is reported for every stack anyway)."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return {}
    stats = dev.memory_stats() or {}
    return {"device_name": getattr(dev, "device_kind", str(dev)),
            "device_peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20}


def _program_facts(compiled: Any) -> dict[str, Any]:
    """What tells two compiled variants apart: a hash of the optimised HLO text (not the machine code)
    and its custom-call targets."""
    try:
        text = compiled.as_text()
    except Exception:  # a backend that cannot print its program: nothing to report
        return {}
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
    return {"program_sha1": hashlib.sha1(text.encode()).hexdigest()[:12], "custom_calls": targets}


def _load(spec: Spec, *, lora: Any, param_dtype: str, remat: str) -> Any:
    from emajax.models.hub import load_model

    _check_device(spec)
    return load_model(spec.model_dir, dtype=spec.dtype, param_dtype=param_dtype, lora=lora, remat=remat,
                      seed=spec.seed)


def prepare_train(spec: Spec, compiler_options: dict[str, Any] | None = None
                  ) -> tuple[Callable[[], float], dict[str, Any]]:
    """The compiled training step of ``spec`` on its state and a fixed batch: a call that runs one step
    (state donated and carried over) and returns its loss, and the compile time / RSS after loading.
    ``compiler_options``: XLA options for this compilation only (e.g. ``xla_cpu_...`` flags)."""
    import jax
    import numpy as np

    from emajax.losses import ldifs_layers
    from emajax.models.decoder import steering_array
    from emajax.models.lora import LoraConfig
    from emajax.models.sharding import make_mesh
    from emajax.train.config import OptimCfg
    from emajax.train.mesh import accum_batch_sharding
    from emajax.train.optim import make_optimizer
    from emajax.train.state import create_state
    from emajax.train.step import BATCH_FIELDS, StepSpec, compile_train_step

    lora = None if spec.op == "full" else LoraConfig(rank=spec.rank, alpha=2.0 * spec.rank)
    loaded = _load(spec, lora=lora, param_dtype="float32", remat=spec.remat)
    cfg = loaded.config
    rss_loaded = current_rss_mb()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sspec = StepSpec(
        lora=lora is not None,
        kl_weight=KL_WEIGHT if spec.op == "lora_kl" else 0.0,
        ldifs_weight=LDIFS_WEIGHT if spec.op == "lora_ldifs" else 0.0,
        ldifs_layers=ldifs_layers(cfg.num_layers, min(5, cfg.num_layers)) if spec.op == "lora_ldifs" else (),
    )
    steer = None
    if spec.op == "lora_steer":
        steer = steering_array(cfg, {steering_layer(cfg.num_layers): steering_vector(cfg.hidden_size, spec.seed)},
                               STEER_COEF)
    tx, schedule = make_optimizer(OptimCfg(), total_steps=1000)
    graphdef, state = create_state(loaded.model, lora=lora is not None, tx=tx, mesh=mesh, need_ref=sspec.need_ref,
                                   steer_ld=steer, seed=spec.seed)
    del loaded
    sh = accum_batch_sharding(mesh)
    host = synthetic_batch(cfg.vocab_size, spec.batch, spec.seq, spec.seed)
    batch = {k: jax.device_put(np.asarray(host[k])[None], sh) for k in BATCH_FIELDS}
    step_fn = compile_train_step(graphdef, sspec, tx, schedule, state, mesh)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile(compiler_options)
    compile_s = time.perf_counter() - t0
    box: dict[str, Any] = {"state": state}

    def once() -> float:
        box["state"], m = compiled(box["state"], batch)
        jax.block_until_ready((box["state"], m))
        return float(m["loss"])

    return once, {"compile_s": compile_s, "rss_after_load_mb": rss_loaded, "remat": spec.remat,
                  **_program_facts(compiled)}


def train_op(spec: Spec) -> dict[str, Any]:
    once, info = prepare_train(spec)
    losses: list[float] = []
    t = time_calls(lambda: losses.append(once()), warmup=spec.warmup, runs=spec.runs)
    return {**t, **info, "loss_first": losses[0], **_device_extras()}


def prepare_score(spec: Spec, compiler_options: dict[str, Any] | None = None
                  ) -> tuple[Callable[[], float], dict[str, Any]]:
    """The compiled scoring forward (per-example answer-token NLL sums, as Interleaving++ / eval run it)
    on a fixed batch: a call that runs it and returns the mean NLL, and the compile time / RSS
    (``compiler_options`` as for :func:`prepare_train`)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emajax.losses import token_nll

    loaded = _load(spec, lora=None, param_dtype=spec.dtype, remat="none")
    rss_loaded = current_rss_mb()
    vocab = loaded.config.vocab_size
    graphdef, params = nnx.split(loaded.model)
    del loaded

    @jax.jit
    def score(params, b):
        model = nnx.merge(graphdef, params)
        out = model(b["inputs"], positions_bt=b["positions"], attn_mask_bt=b["attn_mask"], const_weights=True)
        nll = token_nll(out.hidden_btd, model.lm_head_dv(), b["targets"])
        w = b["loss_mask"].astype(jnp.float32)
        return jnp.sum(nll * w, axis=1), jnp.sum(w, axis=1)

    host = synthetic_batch(vocab, spec.batch, spec.seq, spec.seed)
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    t0 = time.perf_counter()
    compiled = score.lower(params, batch).compile(compiler_options)
    compile_s = time.perf_counter() - t0

    def once() -> float:
        s, n = (jax.device_get(x) for x in jax.block_until_ready(compiled(params, batch)))
        return float(s.sum() / n.sum())

    return once, {"compile_s": compile_s, "rss_after_load_mb": rss_loaded, **_program_facts(compiled)}


def score_op(spec: Spec) -> dict[str, Any]:
    once, info = prepare_score(spec)
    nll: list[float] = []
    t = time_calls(lambda: nll.append(once()), warmup=spec.warmup, runs=spec.runs)
    return {**t, **info, "mean_nll": nll[-1], **_device_extras()}


def generate_op(spec: Spec) -> dict[str, Any]:
    """Greedy decoding of ``new_tokens`` per row (EOS off) with emajax.generate (KV cache, one jit)."""
    from emajax.generate import generate

    loaded = _load(spec, lora=None, param_dtype=spec.dtype, remat="none")
    rss_loaded = current_rss_mb()
    prompts = synthetic_prompts(loaded.config.vocab_size, spec.batch, spec.prompt_len, spec.seed)
    box: dict[str, Any] = {}

    def once() -> None:
        box["out"] = generate(loaded.model, None, prompts, max_new_tokens=spec.new_tokens, eos_ids=[])

    t0 = time.perf_counter()
    once()
    first = time.perf_counter() - t0
    t = time_calls(once, warmup=max(spec.warmup - 1, 0), runs=spec.runs)
    return {**t, "compile_s": max(first - t["seconds"], 0.0), "first_s": first, "tokens": box["out"],
            "rss_after_load_mb": rss_loaded, **_device_extras()}


def run(spec: Spec) -> dict[str, Any]:
    if spec.op == "grpo":
        from bench.grpo import emajax_step

        return {**emajax_step(spec), **_device_extras()}
    if spec.op == "score":
        return score_op(spec)
    if spec.op == "generate":
        return generate_op(spec)
    return train_op(spec)


def matmul_peak_gflops(reps: int = 20) -> dict[str, Any]:
    """XLA's fp32 and bf16 dot rate on this model's MLP shapes (the anchors' 2048x576x1536): best of ``reps``."""
    import jax
    import jax.numpy as jnp

    out: dict[str, Any] = {}
    for name, dt in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (2048, 576), dt)
        b = jax.random.normal(jax.random.key(1), (576, 1536), dt)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=dt))
        jax.block_until_ready(f(a, b))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a, b))
            best = min(best, time.perf_counter() - t0)
        out[f"xla_{name}_matmul_gflops"] = 2 * 2048 * 576 * 1536 / best / 1e9
    return out
