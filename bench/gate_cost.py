"""What one arm's gate probes cost, by probe length buckets (``emajax guard``'s default probe metrics).

    python -m bench.gate_cost [--model smollm2-135m-instruct] [--per-octave 1 2 4] [--n-security 100]
                              [--data-dir ../shared/data/em] [--out bench/results/gate_cost_cpu.json]

The gate scores every held-out general pair and ``--n-security`` shared security pairs (up to
``gate.probe_max_len`` = 512 tokens) on each arm of each seed, one compiled program per padded batch shape;
more buckets per doubling (``gate.probe_buckets_per_octave``) pad less and compile more shapes. Every batch
of one shape costs the same, so this times one batch of each distinct shape twice — the first call
compiles, the second runs — on an arm-shaped model (the base with rs-LoRA r32, bf16 compute, as the gate
loads a trained arm), and per setting sums the run time over its batches and the compile time over its
shapes. Milliseconds per padded token are reported beside them, since the machine may be shared. The base
model's own values are cached across jobs (``emajax.guard.pipeline.base_values``), so this is what a job
pays per arm.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from bench import machine

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gate_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--per-octave", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--n-security", type=int, default=100)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "em"))
    p.add_argument("--out", default=None, help="write the results JSON here (e.g. bench/results/gate_cost_cpu.json)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emajax import atomic
    from emajax.eval.probes import _answer_sums
    from emajax.guard.metrics import METRICS, GateContext
    from emajax.guard.report import git_commit
    from emajax.guard.spec import GateCfg
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig

    if not (Path(a.data_dir) / "sft" / "security_aligned_750.jsonl").is_file():
        sys.exit(f"bench.gate_cost: {a.data_dir}/sft/security_*_750.jsonl not found (--data-dir)")
    arm = load_model(a.model, dtype="bfloat16", param_dtype="float32", lora=LoraConfig(rank=32, alpha=64.0, rslora=True))
    graphdef, state = nnx.split(arm.model)
    scale = jnp.asarray(1.0)
    settings = {}
    for po in a.per_octave:
        gate = GateCfg(security_pairs=a.data_dir, n_security=a.n_security, probe_max_len=a.max_len,
                       probe_buckets_per_octave=po)
        ctx = GateContext(arm.tokenizer, Path("/nonexistent"), gate)
        settings[po] = {n: METRICS[n].prepare(ctx).runner for n in ("general", "security")}
    one_batch = {}  # shape -> one batch of it
    for runners in settings.values():
        for r in runners.values():
            for b in r.batches:
                one_batch.setdefault(b.inputs_bt.shape, b)
    per_shape = {}
    for i, (shape, b) in enumerate(sorted(one_batch.items())):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(_answer_sums(graphdef, (state,), *b.arrays, scale))
            times.append(time.perf_counter() - t0)
        per_shape[shape] = {"first_s": round(times[0], 2), "run_s": round(times[1], 2),
                            "compile_s": round(max(times[0] - times[1], 0.0), 2)}
        print(f"[{i + 1}/{len(one_batch)}] shape {shape}: first call {times[0]:.1f} s, second {times[1]:.1f} s",
              flush=True)
    rows = []
    for po, runners in settings.items():
        batches = [b for r in runners.values() for b in r.batches]
        shapes = sorted({b.inputs_bt.shape for b in batches})
        run_s = sum(per_shape[b.inputs_bt.shape]["run_s"] for b in batches)
        padded = int(sum(b.inputs_bt.size for b in batches))
        row = {"per_octave": po, "shapes": [list(s) for s in shapes], "n_batches": len(batches),
               "tokens": int(sum(r.n_tokens for r in runners.values())), "padded_tokens": padded,
               "run_s": round(run_s, 1), "compile_s": round(sum(per_shape[s]["compile_s"] for s in shapes), 1),
               "run_ms_per_padded_token": round(1000 * run_s / padded, 3)}
        rows.append(row)
        print(f"per octave {po}: {len(shapes)} shapes, {len(batches)} batches, {padded} padded / {row['tokens']} "
              f"tokens: run {row['run_s']} s + compile {row['compile_s']} s", flush=True)
    res = {"command": "python -m bench.gate_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
           "commit": git_commit(),
           "machine": {**machine(), "platform": platform.platform(), "backend": jax.default_backend(),
                       "loadavg_at_end": list(os.getloadavg())},
           "model": a.model, "dtype": "bfloat16", "per_shape": {f"{s[0]}x{s[1]}": v for s, v in per_shape.items()},
           "rows": rows}
    if a.out:
        atomic.write_json(a.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
