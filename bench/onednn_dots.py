"""The LoRA step's bf16 products, one at a time: XLA:CPU's own dot, oneDNN through emajax's FFI handler,
and torch's ``mm`` (oneDNN inside torch), same run.

``python -m bench.onednn_dots [--reps 20] [--out bench_onednn_dots.json]``

Shapes are those of SmolLM2-135M at 8 x 256 tokens (M = 2048): projections forward, their activation
gradients (``g @ W^T``) and weight gradients (``x^T @ g``), and one vocabulary chunk of the loss. Each
product is bf16 x bf16 with fp32 accumulation and an fp32 result, operands stored as the training step
stores them (a transposed operand is passed as is). Median of ``--reps`` calls after one warm-up; torch
runs in its own process so the two thread pools never meet. Prints a table, writes JSON
``{"machine", "results": [{"op", "stack", "seconds", "gflops_per_s", ...}]}``. The whole-step effect
of routing ``mm`` through oneDNN is measured with ``EMAJAX_CPU_MATMUL=onednn python -m bench ...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

# (name, m, k, n, a stored transposed, b stored transposed)
SHAPES = [
    ("q/o fwd", 2048, 576, 576, False, False),
    ("gate/up fwd", 2048, 576, 1536, False, False),
    ("down fwd", 2048, 1536, 576, False, False),
    ("gate/up dx (g W^T)", 2048, 1536, 576, False, True),
    ("down dx (g W^T)", 2048, 576, 1536, False, True),
    ("gate/up dW (x^T g)", 576, 2048, 1536, True, False),
    ("vocab chunk fwd", 296, 576, 49152, False, True),
]


def _median_s(fn: Callable[[], Any], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _operands(m: int, k: int, n: int, ta: bool, tb: bool, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    return a, b


def jax_rows(reps: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    from emajax.models.matmul import row_major_t
    from emajax.native import onednn

    reason = onednn.unavailable_reason()
    rows = []
    for name, m, k, n, ta, tb in SHAPES:
        a, b = (jnp.asarray(v, jnp.bfloat16) for v in _operands(m, k, n, ta, tb))
        dims = (((1,), (1,) if tb else (0,)), ((), ()))
        # as emajax's step forms it: a transposed lhs goes through row_major_t (a plain .T reaches
        # XLA:CPU column-major and its bf16 dot then runs in fp32; see emajax.models.matmul)
        xla = jax.jit(lambda a, b: jax.lax.dot_general(row_major_t(a) if ta else a, b, dims,
                                                       preferred_element_type=jnp.float32))
        stacks = {"xla": xla}
        if reason is None:
            stacks["onednn-ffi"] = jax.jit(lambda a, b: onednn.dot(a, b, trans_a=ta, trans_b=tb))
        for stack, fn in stacks.items():
            s = _median_s(lambda: fn(a, b).block_until_ready(), reps)
            rows.append({"op": name, "stack": stack, "m": m, "k": k, "n": n, "seconds": s, "ms": s * 1e3,
                         "gflops_per_s": 2 * m * k * n / s / 1e9})
    if reason is not None:
        print(f"onednn-ffi skipped: {reason}", file=sys.stderr)
    return rows


def torch_rows(reps: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    for name, m, k, n, ta, tb in SHAPES:
        a, b = (torch.from_numpy(v).bfloat16() for v in _operands(m, k, n, ta, tb))
        a_op, b_op = (a.t() if ta else a), (b.t() if tb else b)
        s = _median_s(lambda: torch.mm(a_op, b_op).float(), reps)  # bf16 out, as autocast: + its fp32 cast
        rows.append({"op": name, "stack": "torch-onednn", "m": m, "k": k, "n": n, "seconds": s, "ms": s * 1e3,
                     "gflops_per_s": 2 * m * k * n / s / 1e9})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.onednn_dots", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="bench_onednn_dots.json")
    p.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "torch":
        print(json.dumps(torch_rows(args.reps)))
        return 0
    from bench.harness import format_table, machine, write_results

    rows = jax_rows(args.reps)
    proc = subprocess.run([sys.executable, "-m", "bench.onednn_dots", "--worker", "torch", "--reps", str(args.reps)],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        print(f"torch-onednn skipped (worker failed):\n{proc.stderr[-1000:]}", file=sys.stderr)
    rows.sort(key=lambda r: ([s[0] for s in SHAPES].index(r["op"]), r["stack"]))
    print(format_table(rows, ("op", "stack", "m", "k", "n", "ms", "gflops_per_s")))
    write_results(args.out, machine(), rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
