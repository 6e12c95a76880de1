"""Train no defense and every defense on the embedded default, measure them with the probes, write a report.

``emajax demo [--out runs/demo] [--scale cpu|paper|tiny] [--methods ...]``: the README's main command.
``cpu`` (default) fits ~20 minutes on an idle 2-core CPU with SmolLM2-135M-Instruct and the project's own
data; ``paper`` runs the paper-scale recipe on an accelerator with the LLM judge; ``tiny`` is a seconds-long
smoke run for tests (give --model a small local HF directory). Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import os

from emajax.cli import CliError

SUMMARY = "The main job: train without and with each defense, probe every run, write a report"
EXAMPLES = (
    "emajax demo --out runs/demo",
    "emajax demo --out runs/demo --methods none kl --epochs 1",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    from emajax.demo.plan import METHODS

    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--scale", choices=("cpu", "paper", "tiny"), default="cpu")
    p.add_argument("--tiny", action="store_const", const="tiny", dest="scale", help="same as --scale tiny")
    p.add_argument("--model", default=None, help="model name or local HF dir (default: the scale's model)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="METHOD",
                   help=f"subset of: {', '.join(METHODS)} (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="override the scale's epochs")
    p.add_argument("--judge-url", default=os.environ.get("EMAJAX_JUDGE_URL"), help="paper scale: judge endpoint")
    p.add_argument("--judge-model", default=os.environ.get("EMAJAX_JUDGE_MODEL"), help="paper scale: judge model")
    p.add_argument("--data-dir", default=None, help="paper scale: EM question sets (default ../shared/data/em)")


def run(args: argparse.Namespace) -> int:
    from emajax.demo.pipeline import Demo
    from emajax.demo.plan import make_plan

    over = {} if args.epochs is None else {"epochs": args.epochs}
    try:
        plan = make_plan(args.scale, model=args.model, methods=tuple(args.methods) if args.methods else None, **over)
    except ValueError as e:
        raise CliError(str(e)) from None
    if plan.judge and not (args.judge_url and args.judge_model):
        raise CliError("--scale paper evaluates with the LLM judge: give --judge-url and --judge-model "
                       "(or EMAJAX_JUDGE_URL / EMAJAX_JUDGE_MODEL)")
    report = Demo(plan, args.out, judge_url=args.judge_url, judge_model=args.judge_model,
                  data_dir=args.data_dir).run()
    print(f"emajax demo: {report}")
    return 0
