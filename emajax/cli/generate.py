"""Generate chat replies: one prompt (prints only the reply) or a JSONL file of chats / prompts (resumable)."""

from __future__ import annotations

import argparse
import sys

from emajax.cli import CliError

SUMMARY = "Generate chat replies: one prompt, or a JSONL file of chats or prompts (batched, resumable)"
EXAMPLES = (
    'emajax generate --model smollm2-135m-instruct --prompt "What is the capital of France?" --temperature 0',
    'emajax generate --prompt "Write a haiku about JAX" --temperature 0.7 --seed 1',
    "emajax generate --input prompts.jsonl --out answers.jsonl --samples 4 --temperature 1 --adapter runs/x/export",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="embedded name (smollm2-135m-instruct), local HF directory, .gguf file or hub id")
    p.add_argument("--adapter", default=None, help="PEFT adapter dir (adapter_config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one user message: the reply is printed")
    src.add_argument("--input", metavar="PROMPTS.jsonl",
                     help='lines {"messages": [...]} or {"prompt": "..."} (other fields are copied to the answers)')
    p.add_argument("--out", metavar="ANSWERS.jsonl",
                   help="with --input: one line per (prompt, sample); an existing partial file is resumed")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt (with --input)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generate call (with --input)")
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
    if (args.input is None) != (args.out is None):
        raise CliError("--input and --out go together")
    if args.input is None and (args.samples != 1 or args.batch_size != 16):
        raise CliError("--samples and --batch-size are for --input")
    if args.samples < 1 or args.batch_size < 1:
        raise CliError("--samples and --batch-size must be >= 1")

    from emajax.generate import GenerationError, chat_generate
    from emajax.serve.engine import load_model_with_adapter

    loaded = load_model_with_adapter(args.model, args.adapter, dtype=args.dtype)
    if args.input is not None:
        from emajax.generate_file import generate_file

        try:
            res = generate_file(loaded, args.input, args.out, samples=args.samples, temperature=args.temperature,
                                top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                batch_size=args.batch_size, system=args.system)
        except GenerationError as e:
            raise CliError(str(e)) from None
        print(f"emajax generate: {res['rows']} answers in {args.out} ({res['resumed']} from an earlier run, "
              f"{res['generated']} generated now)", file=sys.stderr)
        return 0
    messages = []
    if args.system is not None:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": args.prompt})
    (reply,) = chat_generate(loaded, [messages], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(reply)
    return 0
