"""Serving throughput: N concurrent vs N sequential chat requests against a real ``emajax serve`` process.

``python -m bench.serve [--model smollm2-135m-instruct] [--clients 8] [--max-tokens 64] [--rounds 3]
[--dtype float32] [--warmup-check] [--out bench/results/serve.json]`` (also ``python -m bench --ops serve``)

Starts ``emajax serve`` (``--max-batch-rows`` = clients), sends one untimed request alone and one
untimed concurrent round (the compiles), then ``--rounds`` pairs of timed rounds, alternating which
mode goes first: a sequential round sends the N requests one after another, a concurrent round sends
them at once from N threads. Requests are OpenAI chat bodies with the client defaults (temperature 1,
top_p 1) and a fixed seed each, so both modes generate the same tokens. Reports completion tokens per
second per round, their medians, the per-pair ratio concurrent / sequential and its median, and how many
generate calls each concurrent round took (the server's ``/metrics``). The first (cold) request's latency
is recorded; ``--warmup-check`` then starts a second server with its warm-up (every power-of-two batch up
to N rows, 64 prompt tokens, ``--max-tokens`` new tokens) and records how long the warm-up took and the
first request's latency after it. JSON ``{"machine", "settings", "rounds": [...], "summary", "first_request"}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import machine
from bench.generate import QUESTIONS
from bench.harness import loadavg
from emajax.atomic import write_json

STORY = "Tell me a long story about {topic}, with a beginning, a middle and an end."
TOPICS = ["a robot who learns to paint", "a lighthouse keeper", "a lost cat in Paris", "two rival bakers",
          "a dragon afraid of heights", "a city under the sea", "the last tree on Mars", "a time-travelling chef"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--clients", type=int, default=8, help="requests per round (and concurrent clients)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--rounds", type=int, default=3, help="timed (sequential, concurrent) pairs")
    p.add_argument("--prompts", default="stories", choices=("stories", "questions"),
                   help="stories run to --max-tokens; questions (bench.generate's) often end sooner")
    p.add_argument("--warmup-check", action="store_true",
                   help="also time a second server's warm-up and its first request (vs the cold first request)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the server to be ready")
    p.add_argument("--out", "--json", dest="out", default="bench/results/serve.json", metavar="FILE",
                   help="JSON output path (--json FILE is the same)")
    return p.parse_args(argv)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.split(" ", 1) for ln in lines if ln and not ln.startswith("#") and "{" not in ln)}


def _round(url: str, bodies: list[dict], concurrent: bool) -> dict[str, Any]:
    """One round: wall seconds, completion tokens, tokens/s, per-request latencies, generate calls."""
    out: list[Any] = [None] * len(bodies)
    lat = [0.0] * len(bodies)

    def one(i: int) -> None:
        t = time.perf_counter()
        out[i] = _post(url, bodies[i])
        lat[i] = time.perf_counter() - t

    calls0 = _metrics(url)["emajax_generate_calls"]
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(bodies)):
            one(i)
    wall = time.perf_counter() - t0
    if any(o is None for o in out):
        raise RuntimeError("a request failed (see the traceback above)")
    tokens = sum(o["usage"]["completion_tokens"] for o in out)
    return {"mode": "concurrent" if concurrent else "sequential", "seconds": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "latency_s": lat, "generate_calls": _metrics(url)["emajax_generate_calls"]
            - calls0, "loadavg_1m": loadavg(), "texts": [o["choices"][0]["message"]["content"] for o in out]}


def start_server(args: argparse.Namespace, log_path: Path, warmup: bool = False) -> tuple[subprocess.Popen, str, float]:
    """``emajax serve`` on a free port -> (process, base URL, seconds from bound to ready: the warm-up)."""
    cmd = [sys.executable, "-c", "import sys; from emajax.cli import main; sys.exit(main())", "serve",
           "--model", args.model, "--dtype", args.dtype, "--port", "0", "--served-model-name", "bench",
           "--max-batch-rows", str(args.clients)]
    cmd += ["--warmup-prompt-tokens", "64", "--warmup-max-tokens", str(args.max_tokens)] if warmup else ["--no-warmup"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    lines = [proc.stdout.readline()]
    t0 = time.perf_counter()
    if warmup:  # "compiling N shapes ...", then "ready after S s of warm-up"
        lines += [proc.stdout.readline(), proc.stdout.readline()]
    if " on http" not in lines[0] or (warmup and "ready after" not in lines[-1]):
        proc.kill()
        raise RuntimeError(f"emajax serve did not start: {lines!r}; log tail: {log_path.read_text()[-2000:]}")
    return proc, lines[0].split(" on ")[1].split(" ")[0], time.perf_counter() - t0


def _timed_post(url: str, body: dict) -> float:
    t = time.perf_counter()
    _post(url, body)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.max_tokens < 1:
        raise SystemExit("bench.serve: --clients, --rounds and --max-tokens must be >= 1")
    texts = ([STORY.format(topic=TOPICS[i % len(TOPICS)]) for i in range(args.clients)] if args.prompts == "stories"
             else [QUESTIONS[i % len(QUESTIONS)] for i in range(args.clients)])
    bodies = [{"model": "bench", "messages": [{"role": "user", "content": t}], "max_tokens": args.max_tokens,
               "seed": 1000 + i} for i, t in enumerate(texts)]
    info = {**machine(), "loadavg_1m_start": loadavg(),
            "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:])}
    settings = {k: getattr(args, k) for k in ("model", "dtype", "clients", "max_tokens", "rounds", "prompts",
                                              "warmup_check")}
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "serve.log"
        proc, url, _ = start_server(args, log_path)
        try:
            t0 = time.perf_counter()
            first = {"no_warmup_s": _timed_post(url, bodies[0])}  # the compiles: one row alone, then a full batch
            warm = _round(url, bodies, concurrent=True)
            print(f"warm-up (compiles) {time.perf_counter() - t0:.0f} s; concurrent round took "
                  f"{warm['generate_calls']:.0f} generate calls", file=sys.stderr, flush=True)
            rounds = []
            for r in range(args.rounds):
                for concurrent in ((False, True) if r % 2 == 0 else (True, False)):
                    res = _round(url, bodies, concurrent)
                    res["pair"] = r
                    rounds.append(res)
                    print(f"pair {r} {res['mode']:>10}: {res['completion_tokens']} tokens in {res['seconds']:.1f} s = "
                          f"{res['tokens_per_s']:.1f} tokens/s ({res['generate_calls']:.0f} generate calls, "
                          f"load {res['loadavg_1m']})", file=sys.stderr, flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if args.warmup_check:
            proc, url, first["warmup_took_s"] = start_server(args, log_path, warmup=True)
            try:
                first["after_warmup_s"] = _timed_post(url, bodies[0])
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            print(f"first request: {first['no_warmup_s']:.1f} s cold, {first['after_warmup_s']:.1f} s after a "
                  f"{first['warmup_took_s']:.0f} s warm-up", file=sys.stderr, flush=True)
    seq = [r for r in rounds if r["mode"] == "sequential"]
    con = [r for r in rounds if r["mode"] == "concurrent"]
    ratios = [c["tokens_per_s"] / s["tokens_per_s"] for s, c in zip(seq, con)]
    summary = {"sequential_tokens_per_s": statistics.median(r["tokens_per_s"] for r in seq),
               "concurrent_tokens_per_s": statistics.median(r["tokens_per_s"] for r in con),
               "ratio_concurrent_over_sequential": statistics.median(ratios), "ratios": ratios,
               "same_texts_both_modes": all(s["texts"] == c["texts"] for s, c in zip(seq, con)),
               "generate_calls_per_concurrent_round": [c["generate_calls"] for c in con]}
    info["loadavg_1m_end"] = loadavg()
    write_json(args.out, {"machine": info, "settings": settings, "rounds": rounds, "summary": summary,
                          "first_request": first})
    print(f"{args.clients} requests x max_tokens {args.max_tokens}, {args.model} {args.dtype}: sequential "
          f"{summary['sequential_tokens_per_s']:.1f} tokens/s, concurrent {summary['concurrent_tokens_per_s']:.1f} "
          f"tokens/s, ratio {summary['ratio_concurrent_over_sequential']:.2f}x (pairs: "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
