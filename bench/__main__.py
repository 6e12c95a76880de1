"""``python -m bench``: emajax vs the PyTorch stack (transformers + PEFT), same machine, model, shapes, run.

Ops: lora, lora_kl, lora_ldifs, lora_steer, full (training steps), score (per-example NLL forward),
generate (greedy, KV cache), grpo (one GRPO step vs TRL's GRPOTrainer: ``bench.grpo``). Stacks: emajax-fp32, emajax-bf16, torch-fp32, torch-bf16 (autocast).
Each (op, stack) runs in its own worker process (its own peak RSS); the median of ``--runs`` timed
steps after ``--warmup`` untimed ones is reported, emajax's ahead-of-time compile separately.
Prints a table, emajax's regularizer overheads and issue 6's targets; writes JSON
``{"machine": ..., "results": [{"op", "stack", "seconds", "tokens_per_s", "peak_rss_mb", ...}]}``.

    python -m bench --quick                 # < 10 min on a 2-core CPU
    python -m bench                         # every op x stack, 5 runs after 2 warm-ups
    python -m bench --model tiny --batch 2 --seq 32 --runs 1   # plumbing check in seconds
    python -m bench --ops lora lora_kl lora_ldifs lora_steer --stacks emajax-bf16 --paired-overheads 8
    python -m bench --ops serve --json bench/results/serve.json   # 8 concurrent vs 8 sequential requests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.generate import _agreement
from bench.harness import (DEFAULT_PEAK_GFLOPS, OPS, RANDOM_PRESETS, STACKS, Dims, Spec, add_ratios, check_op_stack, check_targets,
                           finish_row, format_report, loadavg, machine, make_random_model_dir, peak_rss_mb,
                           run_paired_overhead, run_worker, run_worker_raw, write_results)

# --quick: the pairs that decide issue 6's targets, fewest runs, emajax in bf16 (its faster stack on CPU
# for every op, so "best emajax" is what a quick run measures, and an fp32 plan would not fit the time
# budget); emajax's own overheads first, so a run cut short still answers them. generate is timed against
# torch-bf16 only, torch's faster decoding mode.
QUICK_PLAN = (
    [(op, "emajax-bf16") for op in ("lora", "lora_kl", "lora_ldifs", "lora_steer")]
    + [(op, st) for op in ("lora", "lora_kl") for st in ("torch-fp32", "torch-bf16")]
    + [(op, st) for op in ("score", "full") for st in ("emajax-bf16", "torch-fp32", "torch-bf16")]
    + [("generate", st) for st in ("emajax-bf16", "torch-bf16")]
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="emajax model name / HF dir / .gguf; 'tiny' = a random 4-layer Llama (plumbing checks); "
                        "'random:qwen2.5-1.5b' etc. = that architecture with random weights (no hub needed)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where both stacks run (cuda: jax's GPU backend and torch.cuda; device-synchronised timing)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--ops", nargs="+", choices=OPS + ("serve",),
                   help="default: all (quick: see QUICK_PLAN); 'serve' alone runs bench.serve (its own harness)")
    p.add_argument("--stacks", nargs="+", choices=STACKS, help="default: all (quick: see QUICK_PLAN)")
    p.add_argument("--quick", action="store_true", help="fewer runs and pairs: finishes in < 10 min on 2 cores")
    p.add_argument("--runs", type=int, help="timed steps per pair (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="untimed steps after compile (default 2; quick 1)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    p.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per row")
    p.add_argument("--prompt-len", type=int, default=32, help="generate: prompt tokens per row")
    p.add_argument("--group", type=int, default=4, help="grpo: completions per prompt (--batch prompts)")
    p.add_argument("--remat", default="none", choices=("none", "full", "dots"), help="emajax remat policy")
    p.add_argument("--peak-gflops", type=float, default=DEFAULT_PEAK_GFLOPS,
                   help="fp32 FLOP peak for peak_fraction (default: the reference machine's XLA:CPU fp32 matmul rate)")
    p.add_argument("--measure-peak", action="store_true",
                   help="also measure XLA's fp32/bf16 matmul rate here and use the fp32 figure as --peak-gflops")
    p.add_argument("--paired-overheads", type=int, default=0, metavar="PAIRS",
                   help="also time lora_kl/lora_ldifs/lora_steer against lora step by step in one process "
                        "(bench.paired, PAIRS alternating pairs each) and decide the overhead targets by those")
    p.add_argument("--timeout", type=float, default=900, help="seconds per worker")
    p.add_argument("--out", "--json", dest="out", default="bench_results.json", metavar="FILE",
                   help="JSON output path (--json FILE is the same)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.quick and not args.ops and not args.stacks:
        return list(QUICK_PLAN)
    ops, stacks = args.ops or list(OPS), args.stacks or list(STACKS)
    pairs = [(op, st) for op in ops for st in stacks]
    if args.quick:
        pairs = [pr for pr in pairs if pr in QUICK_PLAN or args.ops and args.stacks]
    return pairs


def worker_main(spec_json: str) -> int:
    if spec_json == "peak":
        from bench.emajax_ops import matmul_peak_gflops

        print(json.dumps(matmul_peak_gflops()))
        return 0
    spec = Spec.from_json(spec_json)
    if spec.framework == "emajax":
        from bench import emajax_ops

        res = emajax_ops.run(spec)
    else:
        from bench import torch_peer

        res = torch_peer.run(spec)
    res["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(res))
    return 0



def resolve_model(name: str) -> Path:
    preset = name.split(":", 1)[1] if name.startswith("random:") else ("tiny" if name == "tiny" else None)
    if preset is not None:
        from emajax.paths import cache_dir

        if preset not in RANDOM_PRESETS:
            raise SystemExit(f"bench: unknown random model {preset!r}; choose from {', '.join(RANDOM_PRESETS)}")
        sub = "bench-tiny-llama" if preset == "tiny" else f"bench-random-{preset}"
        return make_random_model_dir(RANDOM_PRESETS[preset], Path(cache_dir()) / sub)
    from emajax.models.hub import resolve_model_dir

    return resolve_model_dir(name)


def paired_overheads(args: argparse.Namespace, pairs: list[tuple[str, str]], model_dir: Path,
                     overheads: dict[str, Any]) -> None:
    """For each emajax stack, each regularised op of the plan against lora, timed step by step in one
    process (``run_paired_overhead``); results go to ``overheads[stack]["paired"]["<op>/lora"]``."""
    for op, stack in pairs:
        if op not in ("lora_kl", "lora_ldifs", "lora_steer") or not stack.startswith("emajax"):
            continue
        spec = Spec(op="lora", stack=stack, model_dir=str(model_dir), batch=args.batch, seq=args.seq, rank=args.rank,
                    remat=args.remat, device=args.device)
        print(f"[paired] lora vs {op} / {stack}, {args.paired_overheads} pairs (load {loadavg():.1f}) ...",
              file=sys.stderr, flush=True)
        res = run_paired_overhead(spec, op, args.paired_overheads, args.timeout)
        print(f"    {res.get('ratio') or res.get('error')}", file=sys.stderr, flush=True)
        overheads.setdefault(stack, {}).setdefault("paired", {})[f"{op}/lora"] = res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.ops and "serve" in args.ops:  # a server process and its clients, not a (op, stack) worker
        if args.ops != ["serve"]:
            raise SystemExit("bench: --ops serve runs alone (python -m bench.serve has its own options)")
        from bench.serve import main as serve_main

        return serve_main(["--model", args.model, "--warmup-check", "--out", args.out])
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    pairs = plan(args)
    for op, st in pairs:
        check_op_stack(op, st)
    model_dir = resolve_model(args.model)
    dims = Dims.from_hf_config(model_dir / "config.json")
    info = {**machine(), "model": args.model, "model_dir": str(model_dir), "batch": args.batch, "seq": args.seq,
            "lora_rank": args.rank, "runs": runs, "warmup": warmup, "remat": args.remat,
            "peak_gflops": args.peak_gflops, "device": args.device, "command": "python -m bench " + " ".join(argv if argv is not None
                                                                                      else sys.argv[1:])}
    if args.measure_peak:
        info.update(run_worker_raw("peak", args.timeout))
        if "xla_fp32_matmul_gflops" in info:
            args.peak_gflops = info["peak_gflops"] = info["xla_fp32_matmul_gflops"]
        print(f"matmul peak: {info}", file=sys.stderr, flush=True)
    rows, tokens = [], {}
    t_start = time.perf_counter()
    for i, (op, stack) in enumerate(pairs):
        spec = Spec(op=op, stack=stack, model_dir=str(model_dir), batch=args.batch, seq=args.seq, rank=args.rank,
                    warmup=warmup, runs=runs, new_tokens=args.new_tokens, prompt_len=args.prompt_len, group=args.group,
                    remat=args.remat if stack.startswith("emajax") else "none", device=args.device)
        la = loadavg()
        print(f"[{i + 1}/{len(pairs)}] {op} / {stack} (load {la:.1f}) ...", file=sys.stderr, flush=True)
        raw = run_worker(spec, args.timeout)
        if "tokens" in raw:
            tokens[stack] = raw.pop("tokens")
        raw["loadavg_1m"] = la
        row = finish_row(spec, raw, dims, args.peak_gflops)
        print(f"    {row.get('seconds') or row.get('error')}", file=sys.stderr, flush=True)
        rows.append(row)
        write_results(args.out, info, rows, partial=True)  # a killed run still leaves its finished pairs
    if "torch-fp32" in tokens:
        for r in rows:
            if r["op"] == "generate" and r["stack"] in tokens and r.get("seconds"):
                r["token_agreement_vs_torch_fp32"] = _agreement(tokens[r["stack"]], tokens["torch-fp32"])
    overheads = add_ratios(rows)
    if args.paired_overheads > 0:
        paired_overheads(args, pairs, model_dir, overheads)
    targets = check_targets(rows, overheads, args.peak_gflops)
    info["loadavg_1m_end"] = loadavg()
    info["total_s"] = time.perf_counter() - t_start
    print(format_report(rows, overheads, targets))
    print(f"\n{len(rows)} pairs in {info['total_s']:.0f} s; load average {info['loadavg_1m_start']} -> "
          f"{info['loadavg_1m_end']}", file=sys.stderr)
    write_results(args.out, info, rows, overheads=overheads, targets=targets, partial=False)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if not any(r.get("error") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
