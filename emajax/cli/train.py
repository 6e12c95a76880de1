"""Fine-tune a model with in-training defenses (KL, LDIFS, steering, inoculation, interleaving).

``emajax train CONFIG.yaml [--max-steps N] [--out DIR] [key=value ...]``: overrides are dotted
config keys with YAML-typed values (``defenses.kl.weight=0.1``, ``lora.enabled=false``). Re-running
with the same --out resumes from its latest checkpoint. --out may be remote (``gs://bucket/run``).
Several processes: ``emajax launch --processes N -- train ...`` (one machine) or the launch/ scripts.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from emajax.cli import CliError

SUMMARY = "Fine-tune with in-training defenses (KL, LDIFS, steering, inoculation, interleaving)"
EXAMPLES = (
    "emajax train configs/cpu/smollm2-medical-kl.yaml --out runs/kl",
    "emajax train configs/cpu/smollm2-medical-none.yaml --out runs/try --max-steps 10 defenses.kl.weight=0.1",
)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimiser steps (train.max_steps)")
    p.add_argument("--out", default=None, help="run directory (default: config 'out', else runs/<config name>)")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config YAML (see docs/configuration.md)")
    _options(p)
    # Overrides may be mixed with the options after CONFIG; argparse cannot interleave positionals with a
    # subcommand parser, so the tail is collected here and parsed again in run().
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="dotted config overrides with YAML-typed values, e.g. defenses.kl.weight=0.1")


def _split_tail(args: argparse.Namespace) -> None:
    tail = argparse.ArgumentParser(prog="emajax train", add_help=False)
    _options(tail)
    tail.add_argument("overrides", nargs="*")
    try:
        ns = tail.parse_intermixed_args(args.overrides)
    except SystemExit:
        raise CliError(f"cannot parse arguments {' '.join(args.overrides)!r}") from None
    args.max_steps = ns.max_steps if ns.max_steps is not None else args.max_steps
    args.out = ns.out if ns.out is not None else args.out
    args.overrides = ns.overrides


def run_config(args: argparse.Namespace, load: Any) -> Any:
    """The run's config: ``load(path, overrides)`` of the CLI's config and overrides, with --max-steps and the
    run directory (--out, else the config's ``out``, else runs/<config name>) applied (also ``emajax rl``'s)."""
    from emajax.train.config import TrainConfigError

    _split_tail(args)
    try:
        cfg = load(args.config, args.overrides)
    except TrainConfigError as e:
        raise CliError(str(e)) from None
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise CliError("--max-steps must be >= 0")
        cfg.train.max_steps = args.max_steps
    from emajax.paths import run_path

    out = args.out or cfg.out or str(Path("runs") / Path(args.config).stem)
    cfg.out = str(run_path(out))  # a gs:// (or other URL) run directory stays remote
    return cfg


def run(args: argparse.Namespace) -> int:
    from emajax.train.config import load_config

    cfg = run_config(args, load_config)

    from emajax.train.loop import train

    res = train(cfg, cfg.out)
    last = res.last_metrics
    msg = f"emajax train: {res.run_dir}: steps {res.start_step}->{res.final_step} of {res.total_steps}"
    if last:
        msg += f", loss {last['loss']:.4f}"
    if res.evals:
        msg += f", eval NLL {res.evals[0]['eval_nll']:.4f} -> {res.evals[-1]['eval_nll']:.4f}"
    if res.export_dir is not None:
        msg += f", export {res.export_dir}"
    print(msg)
    return 0
