"""Plumbing of ``python -m bench``: worker processes, timing, peak memory, FLOP accounting, table + JSON.

Every (op, stack) pair runs in its own ``python -m bench --worker SPEC`` process so that its peak RSS
(``VmHWM`` of that process) is its own, and so that one stack's thread pools and allocator state never
leak into another's timing. The orchestrator imports neither jax nor torch.

FLOPs are *model* FLOPs (what the algorithm needs, MFU-style): recomputation (remat, chunked losses
that recompute logits) is not counted, so a stack that recomputes shows a lower peak fraction. A
forward pass costs ``2 * P_matmul`` per token plus causal-free attention ``4 * L * T * H * Dh`` per
token (both stacks compute the full T x T score matrix); a backward pass costs twice its forward
when weight gradients are needed (full fine-tuning) and once when only activation gradients are
(LoRA: frozen weights; LoRA's own A/B matmuls are added explicitly).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import bench
from bench import machine as _machine_base
from emajax import atomic
from emajax.atomic import write_json

OPS = ("lora", "lora_kl", "lora_ldifs", "lora_steer", "full", "score", "generate", "grpo")
TRAIN_OPS = ("lora", "lora_kl", "lora_ldifs", "lora_steer", "full")
STACKS = ("emajax-fp32", "emajax-bf16", "torch-fp32", "torch-bf16")
DEFAULT_PEAK_GFLOPS = 494.0  # XLA:CPU's fp32 matmul rate on the reference machine (docs/performance.md)
KL_WEIGHT, LDIFS_WEIGHT, STEER_COEF = 0.1, 1.0, 5.0  # the paper's strengths


# ----------------------------------------------------------------------------- worker spec
@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything one worker needs; travels as JSON on the command line."""

    op: str
    stack: str
    model_dir: str
    batch: int = 8
    seq: int = 256
    rank: int = 16
    warmup: int = 1
    runs: int = 3
    new_tokens: int = 64
    prompt_len: int = 32
    group: int = 4  # grpo: completions per prompt (rows = batch x group)
    seed: int = 0
    remat: str = "none"  # emajax only: none | full | dots
    device: str = "cpu"  # cpu | cuda (both stacks run on it; timings synchronise the device)

    @property
    def framework(self) -> str:
        return self.stack.split("-", 1)[0]

    @property
    def dtype(self) -> str:
        return {"fp32": "float32", "bf16": "bfloat16"}[self.stack.split("-", 1)[1]]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> "Spec":
        return Spec(**json.loads(text))


def check_op_stack(op: str, stack: str) -> None:
    if op not in OPS:
        raise ValueError(f"bench: unknown op {op!r}; choose from {', '.join(OPS)}")
    if stack not in STACKS:
        raise ValueError(f"bench: unknown stack {stack!r}; choose from {', '.join(STACKS)}")


# ----------------------------------------------------------------------------- measurement
def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM: reset at exec, so the parent's memory never counts)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def time_calls(fn: Callable[[], Any], *, warmup: int, runs: int) -> dict[str, Any]:
    """``warmup`` untimed calls, then the median of ``runs`` timed calls (``fn`` must block until done)."""
    for _ in range(max(warmup, 0)):
        fn()
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "min_s": min(times), "runs_s": times}


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """bench.machine() (with the CPU flags that matter here) and the load when the run started."""
    info = dict(_machine_base())
    info["loadavg_1m_start"] = loadavg()
    return info


# ----------------------------------------------------------------------------- FLOP accounting
@dataclasses.dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @staticmethod
    def from_hf_config(path: str | Path) -> "Dims":
        c = json.loads(Path(path).read_text())
        heads = c["num_attention_heads"]
        return Dims(layers=c["num_hidden_layers"], hidden=c["hidden_size"], inter=c["intermediate_size"],
                    heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                    head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab=c["vocab_size"])

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        return {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d), "gate": (d, f), "up": (d, f), "down": (f, d)}

    def block_matmul_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    def head_params(self) -> int:
        return self.hidden * self.vocab

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for i, o in self.linear_shapes().values())

    def attn_flops_per_token(self, ctx: int) -> int:
        """QK^T and PV against ``ctx`` keys, all layers."""
        return 4 * self.layers * ctx * self.heads * self.head_dim


def forward_flops(d: Dims, tokens: int, seq: int, *, head: bool = True, lora_rank: int = 0) -> float:
    per_tok = 2 * d.block_matmul_params() + d.attn_flops_per_token(seq) + 2 * d.lora_params(lora_rank) * (lora_rank > 0)
    if head:
        per_tok += 2 * d.head_params()
    return float(per_tok) * tokens


def op_flops(op: str, d: Dims, *, batch: int, seq: int, rank: int, new_tokens: int = 0, prompt_len: int = 0) -> float:
    """Model FLOPs of one step of ``op`` (see module doc)."""
    n = batch * seq
    fwd = forward_flops(d, n, seq)  # base model, with the vocabulary projection
    lora_fb = 3 * 2 * d.lora_params(rank) * n  # A/B forward + their weight and input gradients
    if op in ("lora", "lora_steer"):
        return 2 * fwd + lora_fb  # forward + activation-gradient backward
    if op == "lora_kl":
        return 2 * fwd + lora_fb + fwd  # + reference forward (adapters off) incl. its logits
    if op == "lora_ldifs":
        return 2 * fwd + lora_fb + forward_flops(d, n, seq, head=False)  # reference features only
    if op == "full":
        return 3 * fwd
    if op == "score":
        return fwd
    if op == "generate":
        prefill = forward_flops(d, batch * prompt_len, prompt_len)
        mean_ctx = prompt_len + (new_tokens + 1) / 2
        decode = batch * new_tokens * (2 * (d.block_matmul_params() + d.head_params())
                                       + d.attn_flops_per_token(int(mean_ctx)))
        return prefill + decode
    if op == "grpo":  # batch = rollout rows: their sampling, then a LoRA step over prompt + completion
        return (op_flops("generate", d, batch=batch, seq=seq, rank=rank, new_tokens=new_tokens, prompt_len=prompt_len)
                + op_flops("lora", d, batch=batch, seq=prompt_len + new_tokens, rank=rank))
    raise ValueError(f"bench: unknown op {op!r}")


def tokens_per_step(op: str, *, batch: int, seq: int, new_tokens: int) -> int:
    """Tokens a step processes: batch x seq, or the new tokens for ``generate`` / ``grpo`` (rollout rows)."""
    return batch * new_tokens if op in ("generate", "grpo") else batch * seq


# ----------------------------------------------------------------------------- orchestration
def run_worker(spec: Spec, timeout: float) -> dict[str, Any]:
    """Run one worker process; its last stdout line starting with '{' is the result."""
    return run_worker_raw(spec.to_json(), timeout)


def run_worker_raw(arg: str, timeout: float) -> dict[str, Any]:
    """``python -m bench --worker ARG``; errors come back as ``{"error": ...}``, never raised."""
    t0 = time.perf_counter()
    out = bench.worker_json([sys.executable, "-m", "bench", "--worker", arg], timeout)
    if "error" not in out:
        out["wall_s"] = time.perf_counter() - t0
    return out


def run_paired_overhead(spec: Spec, b_op: str, pairs: int, timeout: float) -> dict[str, Any]:
    """``python -m bench.paired --op <spec.op> --b-op B_OP`` in a worker process: B's time over A's from
    steps alternated in one process. Returns ratio, pairs, pairs_b_faster and both medians, or ``{"error"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "paired.json"
        cmd = [sys.executable, "-m", "bench.paired", "--op", spec.op, "--b-op", b_op, "--stack", spec.stack,
               "--pairs", str(pairs), "--model", spec.model_dir, "--batch", str(spec.batch), "--seq", str(spec.seq),
               "--rank", str(spec.rank), "--remat", spec.remat, "--device", spec.device, "--out", str(out)]
        proc = bench.run_process(cmd, timeout)
        if isinstance(proc, dict):
            return proc
        if proc.returncode != 0 or not out.exists():
            return bench.process_error(proc)
        res = json.loads(out.read_text())
    p, (a, b) = res["paired"], res["results"]
    return {"ratio": p["ratio_b_over_a"], "pairs": p["pairs"], "pairs_b_faster": p["pairs_b_faster"],
            "a_seconds": a["seconds"], "b_seconds": b["seconds"]}


def finish_row(spec: Spec, raw: dict[str, Any], dims: Dims, peak_gflops: float) -> dict[str, Any]:
    """Result row: the required fields first, then FLOPs, peak fraction and the worker's extras."""
    row: dict[str, Any] = {"op": spec.op, "stack": spec.stack}
    if "error" in raw:
        row.update(seconds=None, tokens_per_s=None, peak_rss_mb=None, error=raw["error"])
        return row
    sec = raw["seconds"]
    rows = spec.batch * spec.group if spec.op == "grpo" else spec.batch
    prompt_len = int(sum(raw["prompt_tokens"]) / len(raw["prompt_tokens"])) if raw.get("prompt_tokens") else spec.prompt_len
    toks = tokens_per_step(spec.op, batch=rows, seq=spec.seq, new_tokens=spec.new_tokens)
    flops = op_flops(spec.op, dims, batch=rows, seq=spec.seq, rank=spec.rank, new_tokens=spec.new_tokens,
                     prompt_len=prompt_len)
    row.update(seconds=sec, tokens_per_s=toks / sec, peak_rss_mb=raw["peak_rss_mb"])
    row.update(compile_s=raw.get("compile_s"), gflops=flops / 1e9, gflops_per_s=flops / 1e9 / sec,
               peak_fraction=flops / 1e9 / sec / peak_gflops)
    for k, v in raw.items():
        row.setdefault(k, v)
    row.update(batch=spec.batch, seq=spec.seq)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed-ups vs torch (per op, same run) on each emajax row; emajax overheads vs its own lora."""
    by = {(r["op"], r["stack"]): r for r in rows if r.get("seconds")}
    for r in rows:
        if not r.get("seconds") or not r["stack"].startswith("emajax"):
            continue
        for peer in ("torch-fp32", "torch-bf16"):
            p = by.get((r["op"], peer))
            if p:
                r[f"speedup_vs_{peer.replace('-', '_')}"] = p["seconds"] / r["seconds"]
    overheads: dict[str, Any] = {}
    for stack in sorted({r["stack"] for r in rows}):
        base = by.get(("lora", stack))
        if not base:
            continue
        o = {}
        for op in ("lora_kl", "lora_ldifs", "lora_steer"):
            r = by.get((op, stack))
            if r:
                o[f"{op}/lora"] = r["seconds"] / base["seconds"]
                r["time_vs_lora"] = o[f"{op}/lora"]
                r["rss_vs_lora"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        kl = by.get(("lora_kl", stack))
        if kl:
            o["rss lora_kl/lora"] = kl["peak_rss_mb"] / base["peak_rss_mb"]
        if o:
            overheads[stack] = o
    return overheads


# ----------------------------------------------------------------------------- targets (issue 6)
def check_targets(rows: list[dict[str, Any]], overheads: dict[str, Any], peak_gflops: float,
                  stack: str | None = None) -> list[dict[str, Any]]:
    """Each target of issue 6 that this run's rows can decide: name, value, bound, met.

    The per-stack targets (fraction of peak, overheads) are checked for ``stack``, or for every emajax
    stack in the rows when None. An overhead measured step by step in one process
    (``overheads[stack]["paired"]``, from ``--paired-overheads``) decides its target in place of the
    ratio of two worker processes' medians, which drifts with the machine."""
    by = {(r["op"], r["stack"]): r for r in rows if r.get("seconds")}
    best = {}
    for (op, st), r in by.items():  # the faster emajax variant per op
        if st.startswith("emajax") and (op not in best or r["seconds"] < best[op]["seconds"]):
            best[op] = r
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, bound: float, higher: bool = True) -> None:
        if value is not None:
            out.append({"target": name, "value": value, "bound": bound,
                        "met": bool(value >= bound if higher else value <= bound)})

    def ratio(op: str, peer: str) -> float | None:
        e, p = best.get(op), by.get((op, peer))
        return p["seconds"] / e["seconds"] if e and p else None

    stacks = [stack] if stack else sorted({st for _, st in by if st.startswith("emajax")})
    for op in ("lora", "lora_kl", "full"):
        add(f"{op} speed-up vs torch-fp32 (best emajax)", ratio(op, "torch-fp32"), 1.3)
        add(f"{op} speed-up vs torch-bf16 (best emajax)", ratio(op, "torch-bf16"), 0.8)
        for st in stacks:
            e = by.get((op, st))
            add(f"{op} fraction of fp32 peak ({st}, peak {peak_gflops:g} GFLOP/s)",
                e["peak_fraction"] if e else None, 0.6)
    add("score speed-up vs torch-bf16 (best emajax)", ratio("score", "torch-bf16"), 1.2)
    add("score speed-up vs torch-fp32 (best emajax)", ratio("score", "torch-fp32"), 2.0)
    gen_peers = [by[("generate", p)]["seconds"] for p in ("torch-fp32", "torch-bf16") if ("generate", p) in by]
    if gen_peers and "generate" in best:
        add("generate speed-up vs torch's faster mode (best emajax)", min(gen_peers) / best["generate"]["seconds"], 2.0)
    rl_peers = [by[("grpo", p)]["seconds"] for p in ("torch-fp32", "torch-bf16") if ("grpo", p) in by]
    if rl_peers and "grpo" in best:
        add("grpo step speed-up vs TRL GRPOTrainer's faster mode (best emajax)", min(rl_peers) / best["grpo"]["seconds"],
            1.5)
    for st in stacks:
        o = overheads.get(st, {})
        paired = o.get("paired", {})
        for op, bound in (("lora_kl", 1.35), ("lora_ldifs", 1.1), ("lora_steer", 1.02)):
            key = f"{op}/lora"
            if "ratio" in paired.get(key, {}):
                add(f"{key} time ({st}, paired: {paired[key]['pairs']} pairs in one process)",
                    paired[key]["ratio"], bound, higher=False)
            else:
                add(f"{key} time ({st})", o.get(key), bound, higher=False)
        add(f"lora_kl/lora peak RSS ({st})", o.get("rss lora_kl/lora"), 1.1, higher=False)
    return out


# ----------------------------------------------------------------------------- output
COLUMNS = ("op", "stack", "seconds", "tokens_per_s", "peak_rss_mb", "compile_s", "gflops_per_s", "peak_fraction",
           "speedup_vs_torch_fp32", "speedup_vs_torch_bf16")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], cols: Sequence[str] = COLUMNS) -> str:
    """Markdown table (readable in a terminal and pasteable into docs/performance.md)."""
    body = [[_fmt(r.get(c)) if not (c == "seconds" and r.get("error")) else "ERROR" for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def format_report(rows: list[dict[str, Any]], overheads: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    parts = [format_table(rows)]
    errs = [f"  {r['op']} / {r['stack']}: {r['error']}" for r in rows if r.get("error")]
    if errs:
        parts.append("errors:\n" + "\n".join(errs))
    if overheads:
        lines = ["overheads within a stack (seconds / seconds of its lora; rss = peak RSS ratio):"]
        for st, o in overheads.items():
            lines.append(f"  {st}: " + ", ".join(f"{k} {v:.3f}" for k, v in o.items() if k != "paired"))
            if o.get("paired"):
                lines.append(f"  {st}, paired (steps alternated in one process): " + ", ".join(
                    f"{k} {v['ratio']:.3f} (B faster in {v['pairs_b_faster']} of {v['pairs']})" if "ratio" in v
                    else f"{k} ERROR {v.get('error')}" for k, v in o["paired"].items()))
        parts.append("\n".join(lines))
    if targets:
        parts.append(format_table(targets, ("target", "value", "bound", "met")))
    return "\n\n".join(parts)


def write_results(path: str | Path, machine_info: dict[str, Any], rows: list[dict[str, Any]], **extra: Any) -> None:
    write_json(path, {"machine": machine_info, "results": rows, **extra})


# ----------------------------------------------------------------------------- inputs shared by both stacks
def synthetic_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, Any]:
    """A full-length SFT batch (numpy [B, T]): random tokens, the first quarter of each row a "prompt"
    outside the loss (answer-only masking), targets = next token. Identical for every stack."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq + 1), dtype=np.int64)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq // 4:] = True
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32), "loss_mask": loss_mask,
            "attn_mask": np.ones((batch, seq), bool),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}


def synthetic_prompts(vocab: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return rng.integers(3, vocab, size=(batch, prompt_len)).tolist()


def steering_vector(hidden: int, seed: int = 0) -> Any:
    """A fixed unit-norm direction standing in for a persona vector (the cost does not depend on it)."""
    import numpy as np

    v = np.random.default_rng(seed + 2).standard_normal(hidden).astype(np.float32)
    return v / np.linalg.norm(v)


def steering_layer(num_layers: int) -> int:
    return max(1, num_layers // 2)


# ----------------------------------------------------------------------------- random models (no hub here)
TINY_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
}
_QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
           "use_sliding_window": False}
# Published shapes of real models, for timing on machines that cannot reach the hub: the weights are
# random (speed and memory do not depend on them), the architecture is the real one.
RANDOM_PRESETS = {
    "tiny": TINY_HF_CONFIG,
    "qwen2.5-0.5b": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-1.5b": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "qwen2.5-7b": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
}


def make_tiny_model_dir(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny Llama as a Hugging Face directory (config, safetensors, tokenizer) that both
    emajax's loader and transformers read: the harness's plumbing runs in seconds with it."""
    return make_random_model_dir(TINY_HF_CONFIG, out_dir, seed)


def make_random_model_dir(c: dict[str, Any], out_dir: str | Path, seed: int = 0) -> Path:
    """A Hugging Face directory with config ``c`` and random weights (N(0, 0.08) for the tiny model,
    N(0, 0.02) otherwise; norms 1, biases 0) plus a word-level tokenizer over the whole vocabulary.
    Written once (atomically) and reused."""
    import numpy as np
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    std = 0.08 if c["hidden_size"] <= 64 else 0.02

    def w(*shape: int) -> Any:
        return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    d, f = c["hidden_size"], c["intermediate_size"]
    dh = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * dh, c["num_key_value_heads"] * dh
    qkv_bias = c["model_type"] == "qwen2" or c.get("attention_bias", False)
    t = {"model.embed_tokens.weight": w(c["vocab_size"], d), "model.norm.weight": np.ones(d, np.float32)}
    if not c.get("tie_word_embeddings", False):
        t["lm_head.weight"] = w(c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
                  p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f), p + "input_layernorm.weight": np.ones(d, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
        if qkv_bias:
            for n, size in (("q", q), ("k", kv), ("v", kv)):
                t[p + f"self_attn.{n}_proj.bias"] = np.zeros(size, np.float32)
    with atomic.atomic_dir(out) as tmp:
        save_file(t, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic.write_json(tmp / "config.json", c, indent=1)
        _tiny_tokenizer(c["vocab_size"]).save_pretrained(str(tmp))
    return out


def _tiny_tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t3", pad_token="t0", bos_token="t1", eos_token="t2")
