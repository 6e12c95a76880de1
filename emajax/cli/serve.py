"""Serve a model (optionally + a PEFT adapter) as an OpenAI-compatible endpoint (chat and text completions)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

from emajax.cli import CliError

SUMMARY = "Serve a model (+ a PEFT adapter) as an OpenAI-compatible endpoint"
EXAMPLES = (
    "emajax serve --model smollm2-135m-instruct --adapter runs/kl/export --port 8000",
    "emajax serve --model smollm2-135m-instruct --port 8000 --max-batch-rows 16 --warmup-prompt-tokens 64 512",
    "emajax serve --model smollm2-135m-instruct --host 0.0.0.0 --port 8000 --api-key sk-my-key",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (smollm2-135m-instruct), local HF dir or hub id")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir (adapter_config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback); another address needs --api-key, or --insecure")
    p.add_argument("--port", type=int, required=True, help="TCP port (0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the 'model' id clients send (default: --model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-tokens-default", type=int, default=512,
                   help="chat max_tokens when a request omits it (clipped to the context left)")
    p.add_argument("--max-batch-rows", type=int, default=8,
                   help="most rows (choices of all requests) one generate call runs; a request with more runs alone")
    p.add_argument("--batch-window-ms", type=float, default=50.0,
                   help="a batch gathers requests until this long passes without a new one (at most 4x this "
                        "after its first); 0 = no waiting")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $EMAJAX_API_KEY)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without an API key (anyone who reaches it can generate)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host header name to answer besides the loopback names (repeatable; a loopback bind "
                        "answers only those: DNS rebinding)")
    p.add_argument("--max-concurrent-rows", type=int, default=128,
                   help="rows (choices) admitted at once, running or queued for a batch")
    p.add_argument("--max-queue", type=int, default=128,
                   help="requests waiting to be admitted; past it: 429 with Retry-After")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (413 past it)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send its request headers (slow or idle clients are closed)")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request has to send its body (408)")
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the common shapes before taking requests (every power-of-two batch up to "
                        "--max-batch-rows x --warmup-prompt-tokens x --warmup-max-tokens)")
    p.add_argument("--warmup-prompt-tokens", type=int, nargs="+", default=[64], metavar="N",
                   help="prompt lengths to warm (bucketed to powers of two; default 64)")
    p.add_argument("--warmup-max-tokens", type=int, nargs="+", default=None, metavar="N",
                   help="token budgets to warm (bucketed to powers of two; default --max-tokens-default)")


def run(args: argparse.Namespace) -> int:
    from emajax.serve import ChatEngine, Limits, load_model_with_adapter, make_server, warmup_shapes
    from emajax.serve.http import is_loopback

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is not a TCP port")
    api_key = args.api_key or os.environ.get("EMAJAX_API_KEY") or None
    if not is_loopback(args.host) and api_key is None and not args.insecure:
        raise CliError(f"--host {args.host} is reachable from other machines: give --api-key (or EMAJAX_API_KEY), "
                       f"or --insecure to serve it without authentication")
    if min(args.max_concurrent_rows, args.max_queue) < 1 or min(args.max_body_mb, args.header_timeout,
                                                                args.body_timeout) <= 0:
        raise CliError("--max-concurrent-rows and --max-queue must be >= 1; --max-body-mb and the timeouts > 0")
    limits = Limits(max_concurrent_rows=args.max_concurrent_rows, max_queue=args.max_queue,
                    max_body_bytes=int(args.max_body_mb * (1 << 20)), body_timeout_s=args.body_timeout)
    if args.max_batch_rows < 1 or args.batch_window_ms < 0 or args.max_tokens_default < 1:
        raise CliError("--max-batch-rows and --max-tokens-default must be >= 1, --batch-window-ms >= 0")
    warm_max = args.warmup_max_tokens or [args.max_tokens_default]
    if min(args.warmup_prompt_tokens + warm_max) < 1:
        raise CliError("--warmup-prompt-tokens and --warmup-max-tokens must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loaded = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype)
    shapes = warmup_shapes(args.max_batch_rows, args.warmup_prompt_tokens, warm_max) if args.warmup else []
    engine = ChatEngine(loaded, args.served_model_name or args.model, default_max_tokens=args.max_tokens_default,
                        max_batch_rows=args.max_batch_rows, batch_window_s=args.batch_window_ms / 1000.0,
                        warmup=shapes)
    try:
        server = make_server(engine, args.host, args.port, api_key=api_key, allowed_hosts=set(args.allow_host),
                             limits=limits, header_timeout_s=args.header_timeout)
    except OSError as e:
        engine.close()
        raise CliError(f"cannot bind {args.host}:{args.port}: {e.strerror or e}") from None
    print(f"emajax serve: {engine.name!r} on {server.url} (chat/completions, completions, models)"
          f"{'' if api_key else ' without authentication'}", flush=True)
    if shapes:
        t0 = time.perf_counter()
        print(f"emajax serve: compiling {len(shapes)} shapes (rows x prompt x new tokens: "
              f"{', '.join('x'.join(map(str, s)) for s in shapes)}); requests wait until it is done", flush=True)

        def announce() -> None:
            engine.wait_ready()
            print(f"emajax serve: ready after {time.perf_counter() - t0:.0f} s of warm-up", flush=True)

        threading.Thread(target=announce, daemon=True).start()
    try:
        server.serve_forever()  # until SIGINT / SIGTERM
        print("emajax serve: stopped", file=sys.stderr)
    except KeyboardInterrupt:
        print("emajax serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
        engine.close()
    return 0
