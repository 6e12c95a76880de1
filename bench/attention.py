"""``python -m bench.attention``: attention forward+backward alone, emajax's ``attend`` vs the fused kernels.

Decides whether a fused attention kernel is worth wiring into the decoder on an accelerator: times
emajax's ``attend`` (plain XLA; backward recomputes the probabilities), ``jax.nn.dot_product_attention``
with ``implementation="cudnn"`` (causal, right padding by lengths; GPU only) and torch's
``scaled_dot_product_attention``, fwd + bwd, median of several runs, and checks the outputs agree.

    python -m bench.attention --device cuda --batch 8 --seq 1024 --heads 12 --kv-heads 2 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable


def _time(fn: Callable[[], Any], sync: Callable[[Any], Any], runs: int = 10) -> float:
    sync(fn())
    sync(fn())
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from emajax.models.attention import attend

    b, t, n, kvh, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    g = n // kvh
    dt = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dt)
    k = jnp.asarray(rng.standard_normal((b, t, kvh, h)), dt)
    v = jnp.asarray(rng.standard_normal((b, t, kvh, h)), dt)
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), dt)
    causal = np.tril(np.ones((t, t), bool))
    bias = jnp.asarray(np.where(causal, 0.0, np.finfo(np.float32).min)[None].repeat(b, 0), jnp.float32)
    scale = h ** -0.5
    # FLOPs of causal attention fwd + bwd, counting the full T x T products both implementations do
    flops = 4 * b * n * t * t * h * 3.5
    rows = []

    def emajax_loss(q, k, v):
        o = attend(q.reshape(b, t, kvh, g, h), k, v, bias, scale).reshape(b, t, n, h)
        return jnp.sum((o * w).astype(jnp.float32)), o

    variants = {"emajax-attend": emajax_loss}
    if jax.default_backend() == "gpu":
        lengths = jnp.full((b,), t, jnp.int32)

        def cudnn_loss(q, k, v):
            o = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                             key_value_seq_lengths=lengths, implementation="cudnn")
            return jnp.sum((o * w).astype(jnp.float32)), o

        variants["jax-cudnn"] = cudnn_loss
    outs = {}
    for name, fn in variants.items():
        step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2), has_aux=True))
        try:
            sec = _time(lambda: step(q, k, v), jax.block_until_ready, args.runs)
            outs[name] = np.asarray(step(q, k, v)[0][1], np.float32)
            rows.append({"impl": name, "seconds": sec, "tflops_per_s": flops / sec / 1e12})
        except Exception as e:  # noqa: BLE001 - a kernel that does not build here is a result, not a crash
            rows.append({"impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    if "jax-cudnn" in outs and "emajax-attend" in outs:
        ref = outs["emajax-attend"]
        rows[-1]["max_rel_diff_vs_emajax"] = float(np.abs(outs["jax-cudnn"] - ref).max() / np.abs(ref).max())
    try:
        import torch
        import torch.nn.functional as F

        dev = "cuda" if args.device == "cuda" else "cpu"
        tdt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        tq, tk, tv, tw = (torch.tensor(np.asarray(x, np.float32), device=dev, dtype=tdt).transpose(1, 2)
                          .requires_grad_(x is not w) for x in (q, k, v, w))

        def torch_step() -> Any:
            o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=scale, enable_gqa=True)
            (o.float() * tw.float()).sum().backward()
            return o

        sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
        sec = _time(torch_step, sync, args.runs)
        rows.append({"impl": f"torch-sdpa-{dev}", "seconds": sec, "tflops_per_s": flops / sec / 1e12})
    except Exception as e:  # noqa: BLE001
        rows.append({"impl": "torch-sdpa", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--out", help="JSON output path")
    args = p.parse_args(argv)
    rows = run(args)
    for r in rows:
        print(json.dumps(r))
    if args.out:
        from emajax.atomic import write_json

        write_json(args.out, {"args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
