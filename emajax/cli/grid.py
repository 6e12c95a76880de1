"""Run the paper's experiment grid: domains x defenses x seeds, each cell trained and evaluated, then the table.

``emajax grid GRID.yaml [--out DIR] [--only KEY=VALUE ...] [--dry-run]``: trains every cell (resuming),
evaluates general EM, in-domain EM (LLM judge) and OpSwap, writes DIR/grid.json and DIR/report.md (the
paper's table; ``emajax report DIR`` rebuilds it). Rerunning the same command resumes. See emajax/grid.py
and docs/interleaving.md.
"""

from __future__ import annotations

import argparse

from emajax.cli import CliError

SUMMARY = "Run the paper's grid (domains x defenses x seeds): train, evaluate, tabulate; resumable"
EXAMPLES = (
    "emajax grid configs/grid/paper.yaml --out runs/paper-grid",
    "emajax grid configs/grid/paper.yaml --only domain=code --only seed=0 --dry-run",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="grid spec YAML (see configs/grid/paper.yaml)")
    p.add_argument("--out", default=None, help="grid directory (default: the spec's 'out', else runs/<spec name>)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="run only cells with domain=..., defense=... or seed=... (repeatable; AND across keys, "
                        "OR within one key)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")


def _filter(only: list[str]):
    want: dict[str, set[str]] = {}
    for item in only:
        key, sep, val = item.partition("=")
        if not sep or key not in ("domain", "defense", "seed"):
            raise CliError(f"--only {item!r}: expected domain=NAME, defense=NAME or seed=N")
        want.setdefault(key, set()).add(val)
    return lambda c: all(str(getattr(c, k)) in v for k, v in want.items())


def run(args: argparse.Namespace) -> int:
    from emajax.grid import GridError, cell_state, load_grid, run_grid

    try:
        spec = load_grid(args.spec, args.out)
        only = _filter(args.only)
        if args.dry_run:
            for c in spec.cells():
                if only(c):
                    print(f"{c.key}\t{cell_state(spec, c)}\t{spec.cell_dir(c)}")
            return 0
        path = run_grid(spec, only=only)
    except GridError as e:
        raise CliError(str(e)) from None
    print(f"emajax grid: {path}")
    return 0
