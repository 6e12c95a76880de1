"""Greedy generation, emajax vs transformers ``generate`` (torch fp32, KV cache), same prompts, same run.

``python -m bench.generate [--model M] [--batch 8] [--new-tokens 64] [--runs 3] [--dtype bfloat16 ...]``

Every row decodes exactly ``--new-tokens`` tokens in both stacks (EOS disabled), so the work is
identical. Each stack runs in its own worker process (its own peak RSS); emajax's first call
(compile + run) is reported separately as ``compile_s``. Prints a table and writes JSON
``{"machine": ..., "results": [{"op": "generate", "stack", "seconds", "tokens_per_s", "peak_rss_mb", ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import sys

from bench import machine, peak_rss_mb, run_worker, table, time_runs
from emajax.atomic import write_json

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a ten-year-old in two sentences.",
    "List three fruits that are rich in vitamin C.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Tell me a short story about a robot who learns to paint.",
    "Give me two tips for writing clear emails at work.",
]


def _prompts(tok, batch: int) -> list[list[int]]:
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    out = []
    for q in qs:
        text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    return out


def _worker_emajax(args) -> dict:
    from emajax.generate import generate
    from emajax.models.hub import load_model

    loaded = load_model(args.model, dtype=args.dtype, param_dtype=args.dtype)
    prompts = _prompts(loaded.tokenizer, args.batch)
    box = {}

    def once():
        box["out"] = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=args.new_tokens, eos_ids=[])

    t = time_runs(once, warmup=args.warmup, runs=args.runs)
    return {**t, "tokens": box["out"]}


def _worker_torch(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emajax.models.hub import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # decode exactly --new-tokens per row, as the emajax worker
    prompts = _prompts(tok, args.batch)
    width = max(map(len, prompts))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    box = {}

    def once():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=attn, max_new_tokens=args.new_tokens,
                              do_sample=False, use_cache=True, pad_token_id=pad)
        box["out"] = out[:, width:].tolist()

    t = time_runs(once, warmup=args.warmup, runs=args.runs)
    return {**t, "tokens": box["out"], "torch_threads": torch.get_num_threads()}


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of rows whose tokens agree up to the first difference, averaged (prefix agreement)."""
    fr = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        fr.append(n / max(len(x), 1))
    return sum(fr) / max(len(fr), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", nargs="*", default=[], choices=("bfloat16",),
                   help="extra emajax rows in these dtypes (fp32 rows always run)")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--out", default="bench_generate.json")
    p.add_argument("--worker", choices=("emajax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.dtype = args.worker_dtype
        res = (_worker_emajax if args.worker == "emajax" else _worker_torch)(args)
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return 0

    common = ["--model", args.model, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
              "--runs", str(args.runs), "--warmup", str(args.warmup), "--torch-threads", str(args.torch_threads)]
    plan = [("torch-fp32", "torch", "float32"), ("emajax-fp32", "emajax", "float32")]
    plan += [(f"emajax-{'bf16' if d == 'bfloat16' else d}", "emajax", d) for d in args.dtype]
    results, tokens = [], {}
    for stack, kind, dtype in plan:
        print(f"running {stack} ...", file=sys.stderr, flush=True)
        r = run_worker("bench.generate", common + ["--worker", kind, "--worker-dtype", dtype])
        tokens[stack] = r.pop("tokens")
        new = sum(len(t) for t in tokens[stack])
        results.append({"op": "generate", "stack": stack, "seconds": r["seconds"], "tokens_per_s": new / r["seconds"],
                        "peak_rss_mb": r["peak_rss_mb"], "compile_s": r["compile_s"], "first_s": r["first_s"],
                        "cpu_s": r["cpu_s"], "min_s": r["min_s"],
                        "runs_s": r["runs"], "batch": args.batch, "new_tokens": args.new_tokens,
                        **({"torch_threads": r["torch_threads"]} if "torch_threads" in r else {})})
    torch_s = results[0]["seconds"]
    for r in results:
        r["speedup_vs_torch_fp32"] = torch_s / r["seconds"]
        r["token_agreement_vs_torch_fp32"] = _agreement(tokens[r["stack"]], tokens["torch-fp32"])
    print(table(results, extra=("cpu_s", "speedup_vs_torch_fp32", "token_agreement_vs_torch_fp32")))
    write_json(args.out, {"machine": machine(), "results": results})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
