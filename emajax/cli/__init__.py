"""``emajax VERB ...``: one thin module per verb.

A verb module (``emajax/cli/<module>.py``, listed in ``VERBS``) declares, as plain string literals at module
level, ``SUMMARY`` (one line) and ``EXAMPLES`` (a tuple of command lines, each starting ``emajax <verb>``;
a line starting ``emajax <verb> <task>`` also goes to that sub-task's help), and defines
``add_parser(parser)`` and ``run(args)``. ``emajax --help`` reads SUMMARY and EXAMPLES from the sources
without importing anything, so it stays fast and never loads jax; only the chosen verb is imported.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys

# verb -> module under emajax.cli
VERBS = {
    "generate": "generate",
    "convert": "convert",
    "train": "train",
    "rl": "rl",
    "persona": "persona",
    "score": "score",
    "select": "select",
    "eval": "evaluate",
    "serve": "serve",
    "report": "report",
    "demo": "demo",
    "launch": "launch",
    "grid": "grid",
    "guard": "guard",
}

DESCRIPTION = ("Fine-tune language models in JAX/Flax with in-training defenses against emergent misalignment, "
               "and measure whether they worked.")


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _available() -> dict[str, str]:
    out = {}
    for verb, mod in VERBS.items():
        if importlib.util.find_spec(f"emajax.cli.{mod}") is not None:
            out[verb] = mod
    return out


def verb_help(module: str) -> tuple[str, tuple[str, ...]]:
    """(SUMMARY, EXAMPLES) of ``emajax.cli.<module>``, read from its source (nothing is imported)."""
    spec = importlib.util.find_spec(f"emajax.cli.{module}")
    found: dict[str, object] = {}
    if spec is not None and spec.origin:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), spec.origin)
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and t.id in ("SUMMARY", "EXAMPLES") and node.value is not None:
                        found[t.id] = ast.literal_eval(node.value)
    examples = found.get("EXAMPLES", ())
    return str(found.get("SUMMARY", "")), tuple(examples) if isinstance(examples, (tuple, list)) else (str(examples),)


def _examples_block(examples: tuple[str, ...] | list[str]) -> str | None:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None


def _verbs_epilog(verbs: dict[str, str]) -> str:
    lines = ["verbs:"]
    width = max(map(len, verbs), default=0)
    for verb, mod in verbs.items():
        summary, examples = verb_help(mod)
        lines.append(f"  {verb:<{width}}  {summary}")
        lines.extend(f"  {'':<{width}}    e.g. {e}" for e in examples[:1])
    lines += ["", "`emajax VERB --help` shows a verb's options and more examples."]
    return "\n".join(lines)


def _verb_parser(sub: argparse._SubParsersAction, verb: str, m: object) -> argparse.ArgumentParser:
    summary, examples = getattr(m, "SUMMARY", ""), tuple(getattr(m, "EXAMPLES", ()))
    p = sub.add_parser(verb, help=summary, description=(m.__doc__ or summary).strip(),
                       epilog=_examples_block(examples), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_parser(p)
    for action in p._actions:  # sub-tasks (eval em, persona extract, ...) get the examples that name them
        if isinstance(action, argparse._SubParsersAction):
            for task, tp in action.choices.items():
                mine = [e for e in examples if e.split()[:3] == ["emajax", verb, task]]
                tp.epilog = tp.epilog or _examples_block(mine)
                tp.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the verb it names (if any) is imported and gets its full parser."""
    verbs = _available()
    chosen = argv[0] if argv and argv[0] in verbs else None
    parser = argparse.ArgumentParser(prog="emajax", description=DESCRIPTION,
                                     epilog=None if chosen else _verbs_epilog(verbs),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", help="one of the verbs below")
    sub.required = True
    for verb, mod in verbs.items():
        if verb == chosen:
            m = importlib.import_module(f"emajax.cli.{mod}")
            _verb_parser(sub, verb, m).set_defaults(_run=m.run)
        else:  # a stub: `emajax VERB ...` re-parses with that verb chosen
            sub.add_parser(verb, add_help=False)
    return parser


def _in_multiprocess_run() -> bool:
    mesh = sys.modules.get("emajax.train.mesh")  # never imported (nor jax) by a verb that runs no JAX
    return mesh is not None and mesh.distributed_started()


def _exit_now(code: int) -> None:
    """Leave a multi-process run at once: a normal exit waits in jax.distributed's shutdown for the other
    processes, which may be waiting for this one in a collective, so a process that failed alone would
    hang the run instead of letting the launcher (`emajax launch`, a slice's supervisor) stop the rest."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CliError, FileNotFoundError, ValueError) as e:
        # Library errors name the file / field / limit; show them as one line, not a traceback.
        print(f"emajax {args.verb}: error: {e}", file=sys.stderr)
        if _in_multiprocess_run():
            _exit_now(2)
        return 2
    except Exception:
        if not _in_multiprocess_run():
            raise
        import traceback

        traceback.print_exc()
        _exit_now(1)
        raise  # only when os._exit is replaced (tests)


if __name__ == "__main__":
    sys.exit(main())
