"""Run the demo on the embedded default model (for now: one greedy generation)."""

from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--prompt", default="What is the capital of France?")


def run(args: argparse.Namespace) -> int:
    from emajax.cli.generate import run as generate_run

    ns = argparse.Namespace(model=args.model, prompt=args.prompt, system=None, max_new_tokens=64,
                            temperature=0.0, top_p=1.0, seed=0, dtype="float32")
    return generate_run(ns)
