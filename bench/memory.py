"""Memory of the compiled train step as the mesh grows: does sharding over fsdp = N divide it by N?

``python -m bench.memory [--model smollm2-135m-instruct] [--fsdp 1 2 4 8] [--modes lora full]
[--batch 8 --seq 512] [--steps 1] [--out bench/results/memory_fsdp.json]``

For each (mode, fsdp) a worker process with exactly fsdp simulated CPU devices loads the model onto a
(1, fsdp, 1) mesh as ``emajax train`` does, compiles the step at one fixed *global* batch and reports
XLA's ``memory_analysis()`` per device — arguments (the state: params, optimiser moments), outputs
(the new state: donated, so aliased to the arguments), temporaries (activations saved for the
backward, gathered weights, gradients) — then runs ``--steps`` steps and reports the process's peak
RSS (all simulated devices share it; ``--steps 0`` skips running). Per device, the goal is

    device_bytes(N) <= 1.25 x (device_bytes(1) / N + gathered)

where device_bytes = arguments + temporaries (outputs alias the donated arguments) and ``gathered``
is the largest weight one step all-gathers whole: one layer's block weights or the embedding.
``step_memory`` does the same on abstract shapes only (no weights, no run): the suite's test uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

MODES = ("lora", "full")
GOAL_RATIO = 1.25


def step_memory(cfg: Any, *, lora: bool, fsdp: int, batch: int, seq: int, rank: int = 32,
                kl_weight: float = 0.0, devices: Any = None) -> dict[str, int]:
    """Per-device bytes of the compiled train step on a (1, fsdp, 1) mesh, from abstract shapes
    (nothing is allocated): arguments, outputs, aliased, temporaries and ``device_bytes``."""
    import jax
    import jax.numpy as jnp

    from emajax.models.decoder import abstract_decoder
    from emajax.models.lora import LoraConfig
    from emajax.models.sharding import make_mesh, param_shardings
    from emajax.train.config import OptimCfg
    from emajax.train.mesh import accum_batch_sharding, replicated
    from emajax.train.optim import make_optimizer
    from emajax.train.state import TrainState, opt_state_shardings, split_model
    from emajax.train.step import BATCH_FIELDS, StepSpec, compile_train_step

    devices = list(jax.devices() if devices is None else devices)[:fsdp]
    mesh = make_mesh(1, fsdp, 1, devices=devices)
    lc = LoraConfig(rank=rank, alpha=2.0 * rank) if lora else None
    graphdef, trainable, frozen = split_model(abstract_decoder(cfg, lc), lora)

    def placed(tree: Any, shardings: Any) -> Any:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    tr_sh = param_shardings(trainable, mesh)
    tx, schedule = make_optimizer(OptimCfg(), total_steps=100)
    opt = placed(jax.eval_shape(tx.init, trainable), opt_state_shardings(tx, trainable, tr_sh, mesh))
    spec = StepSpec(lora=lora, kl_weight=kl_weight)
    rep = replicated(mesh)
    state = TrainState(placed(trainable, tr_sh), placed(frozen, param_shardings(frozen, mesh)),
                       placed(trainable, tr_sh) if spec.need_ref and not lora else None, None, opt,
                       jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                       jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
    bsh = accum_batch_sharding(mesh)
    dt = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "loss_mask": jnp.bool_,
          "attn_mask": jnp.bool_}
    batch_abs = {k: jax.ShapeDtypeStruct((1, batch, seq), dt[k], sharding=bsh) for k in BATCH_FIELDS}
    step = compile_train_step(graphdef, spec, tx, schedule, state, mesh)
    return memory_of(step.lower(state, batch_abs).compile())


def memory_of(compiled: Any) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = {"argument_bytes": int(ma.argument_size_in_bytes), "output_bytes": int(ma.output_size_in_bytes),
           "alias_bytes": int(ma.alias_size_in_bytes), "temp_bytes": int(ma.temp_size_in_bytes)}
    out["device_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def gathered_bytes(cfg: Any) -> int:
    """The largest weight a step gathers whole per device: one layer's block weights, or the embedding
    (the output matrix too when tied), in the param dtype."""
    import numpy as np

    item = np.dtype(cfg.param_dtype).itemsize
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = d * q * 2 + d * kv * 2 + 3 * d * f
    return int(max(layer, cfg.vocab_size * d) * item)


def ideal_bytes(one_device: int, n: int, gathered: int) -> float:
    """device_bytes(1) / N, plus the gathered weight once the weights are sharded (N > 1)."""
    return one_device / n + (gathered if n > 1 else 0)


def scaling_ratio(one_device: int, n_device: int, n: int, gathered: int) -> float:
    """device_bytes(N) / ideal_bytes: the goal is <= 1.25."""
    return n_device / ideal_bytes(one_device, n, gathered)


# ----------------------------------------------------------------------------- worker (one mode x fsdp)
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import numpy as np

    from bench.harness import current_rss_mb, peak_rss_mb, synthetic_batch
    from emajax.models.hub import load_model
    from emajax.models.lora import LoraConfig
    from emajax.models.sharding import make_mesh
    from emajax.train.config import OptimCfg
    from emajax.train.mesh import accum_batch_sharding, put_global
    from emajax.train.optim import make_optimizer
    from emajax.train.state import create_state
    from emajax.train.step import BATCH_FIELDS, StepSpec, compile_train_step

    lora = args.mode == "lora"
    assert len(jax.devices()) == args.fsdp, (jax.devices(), args.fsdp)
    mesh = make_mesh(1, args.fsdp, 1)
    lc = LoraConfig(rank=args.rank, alpha=2.0 * args.rank) if lora else None
    t0 = time.perf_counter()
    loaded = load_model(args.model, lora=lc, mesh=mesh)
    cfg = loaded.config
    tx, schedule = make_optimizer(OptimCfg(), total_steps=100)
    spec = StepSpec(lora=lora)
    graphdef, state = create_state(loaded.model, lora=lora, tx=tx, mesh=mesh, need_ref=False)
    del loaded
    rss_state = current_rss_mb()
    host = synthetic_batch(cfg.vocab_size, args.batch, args.seq)
    sh = accum_batch_sharding(mesh)
    batch = {k: put_global(np.asarray(host[k])[None], sh) for k in BATCH_FIELDS}
    compiled = compile_train_step(graphdef, spec, tx, schedule, state, mesh).lower(state, batch).compile()
    mem = memory_of(compiled)
    losses = []
    for _ in range(args.steps):
        state, m = compiled(state, batch)
        losses.append(float(m["loss"]))
    return {"mode": args.mode, "fsdp": args.fsdp, "batch": args.batch, "seq": args.seq, **mem,
            "gathered_bytes": gathered_bytes(cfg), "rss_after_state_mb": rss_state, "peak_rss_mb": peak_rss_mb(),
            "steps": args.steps, "losses": losses, "seconds": time.perf_counter() - t0}


def run_one(args: argparse.Namespace, mode: str, fsdp: int) -> dict[str, Any]:
    from bench import worker_json
    from emajax.launch import cpu_devices_env

    cmd = [sys.executable, "-m", "bench.memory", "--worker", "--mode", mode, "--fsdp", str(fsdp),
           "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--rank", str(args.rank)]
    out = worker_json(cmd, args.timeout, cpu_devices_env(os.environ, fsdp))
    return {"mode": mode, "fsdp": fsdp, **out} if "error" in out else out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        one = next((o for o in rows if o["mode"] == r["mode"] and o["fsdp"] == 1 and "error" not in o), None)
        if one is not None and "error" not in r:
            r["ideal_bytes"] = int(ideal_bytes(one["device_bytes"], r["fsdp"], r["gathered_bytes"]))
            r["ratio_to_ideal"] = scaling_ratio(one["device_bytes"], r["device_bytes"], r["fsdp"], r["gathered_bytes"])


def table(rows: list[dict[str, Any]]) -> str:
    mb = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    out = ["| mode | fsdp | arguments MB | temporaries MB | per device MB | ideal MB | ratio | peak RSS MB |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['mode']} | {r['fsdp']} | error: {r['error'][:80]} | | | | | |")
            continue
        out.append(f"| {r['mode']} | {r['fsdp']} | {mb(r['argument_bytes'])} | {mb(r['temp_bytes'])} | "
                   f"{mb(r['device_bytes'])} | {mb(r.get('ideal_bytes', 0))} | {r.get('ratio_to_ideal', float('nan')):.2f} | "
                   f"{r['peak_rss_mb']:,.0f} |")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--fsdp", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--batch", type=int, default=8, help="global batch rows (fixed across fsdp)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--steps", type=int, default=1, help="steps run per worker for the peak RSS (0: compile only)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default="bench_memory.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.fsdp = args.fsdp[0]
        print(json.dumps(worker(args)))
        return 0
    from bench.harness import machine, write_results

    rows = []
    for mode in args.modes:
        for n in args.fsdp:
            r = run_one(args, mode, n)
            rows.append(r)
            add_ratios(rows)
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
            write_results(args.out, machine(), rows, model=args.model, goal_ratio=GOAL_RATIO)
    print(table(rows))
    bad = [r for r in rows if "error" in r or r.get("ratio_to_ideal", 0) > GOAL_RATIO]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
