"""Write report.md (the paper's table + probe margins) and PNG plots from run directories.

``emajax report RUN_DIR [RUN_DIR ...] [--out DIR]``: each RUN_DIR holds results files (probes.json, the
judge's em_<set>.json, opswap.json / gsm8k.json, metrics.jsonl); see docs/demo.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from emajax.cli import CliError

SUMMARY = "Write report.md (the paper's table + probe margins) and plots from run directories"
EXAMPLES = (
    "emajax report runs/demo/base runs/demo/runs/none runs/demo/runs/kl --out report/",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, one row each, in this order")
    p.add_argument("--out", default=None, help="output directory (default: the first RUN_DIR's parent)")
    p.add_argument("--base", default=None, help="RUN_DIR of the base model (default: the run whose method is base)")
    p.add_argument("--baseline", default=None, help="RUN_DIR of the no-defense run (default: method none)")
    p.add_argument("--title", default="emajax report")


def run(args: argparse.Namespace) -> int:
    from emajax.eval.report import ReportError, write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]).resolve().parent
    try:
        path = write_report(args.run_dirs, out, base=args.base, baseline=args.baseline, title=args.title)
    except ReportError as e:
        raise CliError(str(e)) from None
    print(f"emajax report: {path}")
    return 0
