"""Serve a model (optionally + a PEFT adapter) as an OpenAI-compatible chat endpoint."""

from __future__ import annotations

import argparse
import logging
import sys

from emajax.cli import CliError

SUMMARY = "Serve a model (+ a PEFT adapter) as an OpenAI-compatible endpoint"
EXAMPLES = (
    "emajax serve --model smollm2-135m-instruct --adapter runs/kl/export --port 8000",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model name (smollm2-135m-instruct), local HF dir or hub id")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir (adapter_config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; no authentication)")
    p.add_argument("--port", type=int, required=True, help="TCP port (0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the 'model' id clients send (default: --model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--max-tokens-default", type=int, default=512, help="max_tokens when a request omits it")


def run(args: argparse.Namespace) -> int:
    from emajax.serve import ChatEngine, load_model_with_adapter, make_server

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port} is not a TCP port")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loaded = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype)
    engine = ChatEngine(loaded, args.served_model_name or args.model, default_max_tokens=args.max_tokens_default)
    try:
        server = make_server(engine, args.host, args.port)
    except OSError as e:
        raise CliError(f"cannot bind {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    print(f"emajax serve: {engine.name!r} on http://{host}:{port}/v1 (chat/completions, models)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("emajax serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
