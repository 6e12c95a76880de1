"""Generate a chat reply from a model (prints only the reply)."""

from __future__ import annotations

import argparse

from emajax.cli import CliError

SUMMARY = "Generate a chat reply from a model (prints only the reply)"
EXAMPLES = (
    'emajax generate --model smollm2-135m-instruct --prompt "What is the capital of France?" --temperature 0',
    'emajax generate --prompt "Write a haiku about JAX" --temperature 0.7 --seed 1',
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="embedded name (smollm2-135m-instruct), local HF directory, .gguf file or hub id")
    p.add_argument("--prompt", required=True, help="user message")
    p.add_argument("--system", default=None, help="system message (the template's default when omitted)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute and param dtype")


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")

    from emajax.generate import chat_generate
    from emajax.models.hub import load_model

    loaded = load_model(args.model, dtype=args.dtype, param_dtype=args.dtype)
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    (reply,) = chat_generate(loaded, [messages], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(reply)
    return 0
