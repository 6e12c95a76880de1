"""Scoring throughput: emajax vs a straightforward batched HF transformers + PEFT scorer, same run.

``python -m bench.score [--chats 976] [--torch-chats 244] [--out bench_score.json]``

Workload: SmolLM2-135M-Instruct (the embedded GGUF, dequantized to fp32) scoring pool chats under two
models — the aligned base and one misaligned LoRA adapter (rank 32, all seven projections, random
nonzero B) — i.e. the inner loop of ``emajax score``. The pool is the shared 244-chat WildGuard pool
repeated to ``--chats`` (976 = 4 copies: same length distribution, ~1,000 chats). Each stack runs in
its own subprocess (clean peak RSS, no thread fights between jax and torch):

* ``emajax-fp32`` / ``emajax-bf16``: ``Scorer.example_nlls`` — quarter-octave length buckets (the CLI default), ~4096 padded
  tokens per batch, chunked log-softmax, adapter swapped as an input; compile time reported separately
  (a warm-up pass over every batch shape).
* ``torch-fp32`` / ``torch-bf16`` (autocast): length-sorted batches of 8 rows padded to the longest, full
  logits + log_softmax, answer-token NLL; aligned via ``disable_adapter()`` as in the paper. Torch scores
  the first ``--torch-chats`` chats (one copy of the pool: the same length distribution) to bound
  the run time; tokens/s is per model, so the figures compare directly.

Reports tokens/s per model (real, non-pad chat tokens x models / s), seconds per model-pass over 1,000
chats' worth of tokens, the fraction of the fp32 FLOP peak (``--peak-gflops``; the default is XLA's own
fp32 matmul rate on the reference machine of docs/performance.md, give yours), and peak RSS. FLOPs counted: 2 x matmul params (blocks + LM head, + LoRA for the
adapter) per real token + causal attention 2 x L x 2 x D_attn x n^2 / 2 per chat — useful work only, so
padding lowers the fraction. Prints a table and writes JSON in the format of ``python -m bench``:
{"machine": ..., "results": [{"op", "stack", "seconds", "tokens_per_s", "peak_rss_mb", ...}]}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import machine as bench_machine
from emajax import atomic

REPO = Path(__file__).resolve().parents[1]
POOL = REPO.parent / "shared" / "data" / "em" / "pool" / "wildguard_selected_safe.jsonl"
STACKS = ("emajax-fp32", "torch-fp32", "torch-bf16", "emajax-bf16")
RANK, ALPHA = 32, 64.0
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def machine() -> str:
    """One-line machine description for the score bench (bench.machine() has the details)."""
    m = bench_machine()
    return f"{m['cpu']}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_pool(path: Path, n_chats: int) -> Path:
    lines = [l for l in POOL.read_text().splitlines() if l.strip()]
    rows = [lines[i % len(lines)] for i in range(n_chats)]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A random PEFT LoRA adapter (rank 32, alpha 64, all projections) for the model in ``model_dir``."""
    from safetensors.numpy import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    d, f, n_l = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"q_proj": (d, cfg["num_attention_heads"] * hd), "k_proj": (d, kv), "v_proj": (d, kv),
              "o_proj": (cfg["num_attention_heads"] * hd, d), "gate_proj": (d, f), "up_proj": (d, f),
              "down_proj": (f, d)}
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(n_l):
        for name, (din, dout) in shapes.items():
            base = f"base_model.model.model.layers.{i}.{TARGETS[name]}.{name}"
            tensors[base + ".lora_A.weight"] = (rng.standard_normal((RANK, din)) / np.sqrt(din)).astype(np.float32)
            tensors[base + ".lora_B.weight"] = (0.01 * rng.standard_normal((dout, RANK))).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir), "r": RANK,
        "lora_alpha": ALPHA, "use_rslora": False, "target_modules": sorted(TARGETS), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True}))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def flops(model_dir: Path, lengths: list[int], lora: bool) -> float:
    """Useful FLOPs of one forward over chats of ``lengths`` tokens (see module doc)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    d, f, n_l, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    dq, dkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = d * dq + 2 * d * dkv + dq * d + 3 * d * f
    if lora:
        per_layer += RANK * ((d + dq) + 2 * (d + dkv) + (dq + d) + 2 * (d + f) + (f + d))
    matmul = n_l * per_layer + d * v
    toks = float(sum(lengths))
    attn = sum(2.0 * n_l * 2 * dq * n * n / 2 for n in lengths)
    return 2.0 * matmul * toks + attn


# ------------------------------------------------------------------------------------------- workers
def _examples(model_dir: Path, pool: Path, max_len: int):
    from emajax.models.hub import load_tokenizer
    from emajax.scoring.plan import encode_pool, read_pool

    tok = load_tokenizer(model_dir)
    return tok, encode_pool(tok, read_pool(pool), max_len)


def run_emajax(dtype: str, model_dir: Path, adapter: Path, pool: Path, max_len: int, batch_tokens: int) -> dict:
    from emajax.models.hub import load_model
    from emajax.scoring.adapters import parse_model_spec
    from emajax.batching import octave_buckets
    from emajax.scoring.plan import plan_shards
    from emajax.scoring.score import Scorer

    loaded = load_model(str(model_dir), dtype=dtype, param_dtype=dtype)
    scorer = Scorer(loaded, [parse_model_spec(f"misaligned={adapter}")], dtype=dtype, param_dtype=dtype)
    _, examples = _examples(model_dir, pool, max_len)
    buckets = octave_buckets(max_len)
    (order,) = plan_shards(examples, buckets, len(examples))
    # Warm-up: one batch of every distinct shape (compiles), timed separately.
    seen, warm = set(), []
    for b in scorer.batches(examples, order, buckets, batch_tokens):
        if b.inputs_bt.shape not in seen:
            seen.add(b.inputs_bt.shape)
            warm.extend(b.rows)
    t = time.perf_counter()
    scorer.example_nlls(examples, warm, buckets, batch_tokens)
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    res = scorer.example_nlls(examples, order, buckets, batch_tokens)
    seconds = time.perf_counter() - t
    nll = np.stack([res[p] for p in range(len(examples))])
    return {"seconds": seconds, "compile_s": compile_s, "shapes": len(seen), "nll": nll.tolist(),
            "lengths": [int(e.inputs.size) for e in examples]}


def run_torch(dtype: str, model_dir: Path, adapter: Path, pool: Path, max_len: int, rows: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    _, examples = _examples(model_dir, pool, max_len)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter).eval()
    order = sorted(range(len(examples)), key=lambda i: examples[i].inputs.size)
    batches = [order[s: s + rows] for s in range(0, len(order), rows)]
    nll = np.zeros((len(examples), 2))

    def one_pass(batch_list) -> None:
        for idx in batch_list:
            n = max(examples[i].inputs.size for i in idx)
            ids = torch.zeros((len(idx), n), dtype=torch.long)
            att = torch.zeros((len(idx), n), dtype=torch.long)
            tgt = torch.zeros((len(idx), n), dtype=torch.long)
            msk = torch.zeros((len(idx), n), dtype=torch.float32)
            for r, i in enumerate(idx):
                e = examples[i]
                k = e.inputs.size
                ids[r, :k] = torch.from_numpy(e.inputs.astype(np.int64))
                att[r, :k] = 1
                tgt[r, :k] = torch.from_numpy(e.targets.astype(np.int64))
                msk[r, :k] = torch.from_numpy(e.loss_mask.astype(np.float32))
            for col in range(2):
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    if col == 0:
                        with model.disable_adapter():
                            logits = model(input_ids=ids, attention_mask=att).logits
                    else:
                        logits = model(input_ids=ids, attention_mask=att).logits
                    logp = torch.log_softmax(logits.float(), dim=-1)
                    tok_nll = -logp.gather(-1, tgt[..., None])[..., 0]
                    per = (tok_nll * msk).sum(1) / msk.sum(1).clamp(min=1)
                nll[idx, col] = per.numpy()

    t = time.perf_counter()
    one_pass(batches[:1])  # warm-up
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    one_pass(batches)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "compile_s": warm_s, "nll": nll.tolist(),
            "lengths": [int(e.inputs.size) for e in examples]}


def worker(args: argparse.Namespace) -> None:
    model_dir, adapter, pool = Path(args.model_dir), Path(args.adapter), Path(args.pool)
    kind, dt = args.worker.split("-")
    if kind == "emajax":
        res = run_emajax({"fp32": "float32", "bf16": "bfloat16"}[dt], model_dir, adapter, pool, args.max_len,
                         args.batch_tokens)
    else:
        res = run_torch(dt, model_dir, adapter, pool, args.max_len, args.torch_rows)
    res["peak_rss_mb"] = peak_rss_mb()
    atomic.write_json(args.result, res)


# --------------------------------------------------------------------------------------- orchestrate
def _finish(results: list[dict], raw: dict, args: argparse.Namespace, argv: list[str] | None) -> dict:
    """Speed-ups, cross-stack NLL agreement, and the JSON file (rewritten after every stack)."""
    from emajax.models.hub import DEFAULT_MODEL

    agree = {}
    ref = raw.get("torch-fp32")
    if ref is not None:  # a sanity check on the common chats, not a parity test
        n = len(ref["nll"])
        for s, r in raw.items():
            a, b = np.asarray(r["nll"][:n]), np.asarray(ref["nll"])
            agree[s] = float(np.max(np.abs(a - b) / np.abs(b)))
    by = {r["stack"]: r for r in results}
    for r in results:
        for peer in ("torch-fp32", "torch-bf16"):
            if peer in by:
                r[f"speedup_vs_{peer}"] = r["tokens_per_s"] / by[peer]["tokens_per_s"]
        if r["stack"] in agree:
            r["max_rel_nll_diff_vs_torch_fp32"] = agree[r["stack"]]
    doc = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": "python -m bench.score " +
           " ".join(argv if argv is not None else sys.argv[1:]), "model": DEFAULT_MODEL,
           "workload": f"aligned + 1 LoRA adapter (r{RANK}, all projections) over pool chats; emajax {args.chats} "
                       f"chats, torch {args.torch_chats} (same pool, repeated)", "results": results}
    atomic.write_json(args.out, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.score", description=__doc__.splitlines()[0])
    p.add_argument("--chats", type=int, default=976, help="pool chats for emajax (the 244-chat pool repeated)")
    p.add_argument("--torch-chats", type=int, default=244, help="chats for the torch stacks (a prefix)")
    p.add_argument("--stacks", default=",".join(STACKS))
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--torch-rows", type=int, default=8)
    p.add_argument("--peak-gflops", type=float, default=490.0, help="fp32 FLOP peak of the CPU (GFLOP/s)")
    p.add_argument("--out", default="bench_score.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    p.add_argument("--pool", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    from emajax.models.hub import DEFAULT_MODEL, resolve_model_dir

    model_dir = resolve_model_dir(DEFAULT_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="bench_score_"))
    adapter = write_adapter(model_dir, tmp / "adapter")
    pools = {"emajax": write_pool(tmp / "pool_emajax.jsonl", args.chats),
             "torch": write_pool(tmp / "pool_torch.jsonl", args.torch_chats)}
    results, raw = [], {}
    for stack in [s for s in args.stacks.split(",") if s]:
        kind = stack.split("-")[0]
        out = tmp / f"{stack}.json"
        cmd = [sys.executable, "-m", "bench.score", "--worker", stack, "--model-dir", str(model_dir),
               "--adapter", str(adapter), "--pool", str(pools[kind]), "--result", str(out),
               "--max-len", str(args.max_len), "--batch-tokens", str(args.batch_tokens),
               "--torch-rows", str(args.torch_rows)]
        print(f"[bench.score] running {stack} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=REPO)
        r = json.loads(out.read_text())
        raw[stack] = r
        lengths = r["lengths"]
        tokens = 2 * sum(lengths)  # two models (aligned + adapter)
        fl = flops(model_dir, lengths, False) + flops(model_dir, lengths, True)
        per_1000 = r["seconds"] / len(lengths) * 1000 / 2  # seconds per model over 1,000 chats
        results.append({"op": "score", "stack": stack, "seconds": per_1000, "tokens_per_s": tokens / r["seconds"],
                        "peak_rss_mb": round(r["peak_rss_mb"], 1), "compile_s": round(r["compile_s"], 2),
                        "chats": len(lengths), "models": 2, "measured_s": round(r["seconds"], 2),
                        "gflops_per_s": fl / r["seconds"] / 1e9,
                        "fraction_of_fp32_peak": fl / r["seconds"] / 1e9 / args.peak_gflops,
                        "wall_s": round(time.perf_counter() - t, 1)})
        _finish(results, raw, args, argv)
        print(f"[bench.score] {stack}: {results[-1]['tokens_per_s']:.0f} tok/s per model, compile "
              f"{results[-1]['compile_s']:.1f} s", file=sys.stderr, flush=True)
    doc = _finish(results, raw, args, argv)
    print(f"\nscore throughput on {doc['machine']} (tokens/s per model; seconds = per model per 1,000 chats)")
    hdr = f"{'stack':<12} {'tok/s':>8} {'s/1k chats':>10} {'compile s':>9} {'GFLOP/s':>8} {'% peak':>7} " \
          f"{'x torch32':>9} {'x torch16':>9} {'RSS MB':>7} {'max rel dNLL':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['stack']:<12} {r['tokens_per_s']:>8.0f} {r['seconds']:>10.1f} {r['compile_s']:>9.1f} "
              f"{r['gflops_per_s']:>8.0f} {100 * r['fraction_of_fp32_peak']:>6.1f}% "
              f"{r.get('speedup_vs_torch-fp32', float('nan')):>9.2f} {r.get('speedup_vs_torch-bf16', float('nan')):>9.2f} "
              f"{r['peak_rss_mb']:>7.0f} {r.get('max_rel_nll_diff_vs_torch_fp32', float('nan')):>12.2e}")
    print(f"\nJSON -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
