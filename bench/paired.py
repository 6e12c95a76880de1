"""Two variants of one emajax op timed step by step in one process: ``python -m bench.paired``.

Why: on a shared machine the speed of whole runs drifts between minutes by more than the differences
worth measuring, so "run A, then run B" decides little. This compiles the op twice in one process,
variant A and B each with its own XLA options (or B another op), then alternates single steps (A B, B A,
A B, ...), each variant carrying its own training state: both see the same machine state within a pair,
and the paired difference of the medians is what is reported.

    python -m bench.paired --op lora --b-xla xla_cpu_enable_concurrency_optimized_scheduler=false
    python -m bench.paired --op lora --b-op lora_ldifs --pairs 8     # a regulariser's overhead

``--b-op`` makes variant B a different op on the same model and batch: the overhead ratios issue 6 sets
(``lora_kl``/``lora``, ``lora_ldifs``/``lora``, ``lora_steer``/``lora``) then come from steps that
alternated on one machine state, not from two worker processes minutes apart.

``--b-xla`` passes XLA debug options (the names ``XLA_FLAGS`` takes, without the dashes) to that
variant's compilation only; settings read once at process start (``XLA_FLAGS`` itself,
``GLIBC_TUNABLES``) cannot be paired this way: compare them with separate ``python -m bench`` runs.
Prints both variants' step times, first losses, compiled-program hashes and custom calls, and writes JSON
``{"machine", "op", "b_op", "stack", "pairs", "results": [{"variant", "op", "xla_options", "seconds",
"runs_s", "loss_first", ...}], "paired": {...}}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

from bench.harness import TRAIN_OPS, Spec, machine, write_results

PAIRED_OPS = (*TRAIN_OPS, "score")


def parse_xla(items: list[str] | None, flag: str) -> dict[str, Any]:
    """``["xla_option=value", ...]`` -> compile options (true/false -> bool, integers -> int, else str)."""
    opts: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key.startswith("xla_"):
            raise SystemExit(f"bench.paired: {flag} expects xla_OPTION=VALUE, got {item!r}")
        low = value.strip().lower()
        opts[key] = low == "true" if low in ("true", "false") else int(value) if value.lstrip("-").isdigit() else value
    return opts


def run_pairs(spec: Spec, pairs: int, a_xla: dict[str, Any] | None = None, b_xla: dict[str, Any] | None = None,
              b_op: str | None = None) -> dict[str, Any]:
    """Compile ``spec``'s op (B: ``b_op`` if given) with each variant's XLA options, warm both up, then time
    ``pairs`` alternating pairs."""
    from bench.emajax_ops import prepare_score, prepare_train

    specs = {"A": spec, "B": dataclasses.replace(spec, op=b_op or spec.op)}
    if spec.framework != "emajax" or any(s.op not in PAIRED_OPS for s in specs.values()):
        raise SystemExit(f"bench.paired: needs an emajax stack and ops from {', '.join(PAIRED_OPS)}")
    if (spec.op == "score") != (specs["B"].op == "score"):
        raise SystemExit("bench.paired: pair a training op with a training op (score only with score)")
    variants: dict[str, dict[str, Any]] = {}
    calls = {}
    for name, xla in (("A", a_xla or {}), ("B", b_xla or {})):
        s = specs[name]
        prepare = prepare_score if s.op == "score" else prepare_train
        calls[name], info = prepare(s, xla or None)
        variants[name] = {"variant": name, "op": s.op, "xla_options": xla, **info, "runs_s": []}
    for name in ("A", "B"):
        variants[name]["loss_first"] = calls[name]()  # warm-up step; its loss shows both compute the same thing
    for i in range(pairs):
        for name in ("A", "B") if i % 2 == 0 else ("B", "A"):
            t0 = time.perf_counter()
            calls[name]()
            variants[name]["runs_s"].append(time.perf_counter() - t0)
    a, b = variants["A"]["runs_s"], variants["B"]["runs_s"]
    for v in variants.values():
        v["seconds"] = statistics.median(v["runs_s"])
    paired = {"median_b_minus_a_s": statistics.median(y - x for x, y in zip(a, b)),
              "ratio_b_over_a": variants["B"]["seconds"] / variants["A"]["seconds"],
              "pairs_b_faster": sum(y < x for x, y in zip(a, b)), "pairs": pairs}
    return {"results": [variants["A"], variants["B"]], "paired": paired}


def format_paired(out: dict[str, Any]) -> str:
    lines = [f"{'variant':8s} {'op':11s} {'median s':>9s} {'min s':>7s} {'loss_first':>11s} {'program':>12s}  "
             "XLA options / custom calls"]
    for v in out["results"]:
        opts = " ".join(f"{k}={val}" for k, val in v.get("xla_options", {}).items()) or "(defaults)"
        lines.append(f"{v['variant']:8s} {v.get('op', '-'):11s} {v['seconds']:9.3f} {min(v['runs_s']):7.3f} "
                     f"{v['loss_first']:11.5f} "
                     f"{v.get('program_sha1', '-'):>12s}  {opts}; {', '.join(v.get('custom_calls', [])) or 'none'}")
    p = out["paired"]
    same = out["results"][0].get("program_sha1") == out["results"][1].get("program_sha1")
    lines.append(f"B/A {p['ratio_b_over_a']:.3f}; median paired difference {p['median_b_minus_a_s']:+.3f} s; "
                 f"B faster in {p['pairs_b_faster']} of {p['pairs']} pairs"
                 + ("; both optimised HLO programs are identical (options acting only on code"
                    " generation, such as the vector width, still differ below it)" if same else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import resolve_model

    ap = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--op", default="lora", choices=PAIRED_OPS)
    ap.add_argument("--stack", default="emajax-bf16", choices=("emajax-bf16", "emajax-fp32"))
    ap.add_argument("--a-xla", nargs="*", metavar="xla_OPTION=VALUE", help="XLA options for A's compilation")
    ap.add_argument("--b-xla", nargs="+", metavar="xla_OPTION=VALUE", help="XLA options for B's compilation")
    ap.add_argument("--b-op", choices=PAIRED_OPS, help="variant B runs this op instead of --op (e.g. an overhead ratio)")
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="as for python -m bench")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"), help="emajax remat policy")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default="bench_paired.json")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        raise SystemExit("bench.paired: --pairs must be >= 1")
    a_xla, b_xla = parse_xla(args.a_xla, "--a-xla"), parse_xla(args.b_xla, "--b-xla")
    if not (b_xla or a_xla or (args.b_op and args.b_op != args.op)):
        raise SystemExit("bench.paired: give variant B (or A) something to differ in: --b-xla or --b-op")
    spec = Spec(op=args.op, stack=args.stack, model_dir=str(resolve_model(args.model)), batch=args.batch,
                seq=args.seq, rank=args.rank, warmup=1, runs=args.pairs, remat=args.remat, device=args.device)
    out = run_pairs(spec, args.pairs, a_xla, b_xla, b_op=args.b_op)
    print(format_paired(out))
    write_results(args.out, machine(), out["results"], op=args.op, b_op=args.b_op or args.op, stack=args.stack,
                  pairs=args.pairs, paired=out["paired"], batch=args.batch, seq=args.seq)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
