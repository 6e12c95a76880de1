"""``emajax VERB ...``: one thin module per verb, each exposing ``add_parser(sub)`` and ``run(args)``."""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> module under emajax.cli (imported lazily so `emajax --help` stays fast and jax loads only when used)
VERBS = {
    "generate": "generate",
    "convert": "convert",
    "train": "train",
    "persona": "persona",
    "score": "score",
    "select": "select",
    "eval": "evaluate",
    "serve": "serve",
    "report": "report",
    "demo": "demo",
    "launch": "launch",
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _available() -> dict[str, str]:
    out = {}
    for verb, mod in VERBS.items():
        if importlib.util.find_spec(f"emajax.cli.{mod}") is not None:
            out[verb] = mod
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbs = _available()
    parser = argparse.ArgumentParser(prog="emajax", description=__doc__)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    # Only the chosen verb's module is imported; the others get a stub parser for --help.
    chosen = argv[0] if argv and argv[0] in verbs else None
    for verb, mod in verbs.items():
        if verb == chosen:
            m = importlib.import_module(f"emajax.cli.{mod}")
            p = sub.add_parser(verb, help=(m.__doc__ or "").strip().splitlines()[0] if m.__doc__ else None)
            m.add_parser(p)
            p.set_defaults(_run=m.run)
        else:
            sub.add_parser(verb, add_help=False)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except CliError as e:
        print(f"emajax {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        # Library errors name the file / field / limit; show them as one line, not a traceback.
        print(f"emajax {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
