"""Run an emajax command as N cooperating processes on this machine (jax.distributed over loopback).

``emajax launch --processes 2 [--devices-per-process 4] [--log-dir DIR] -- train CONFIG [...]``:
each process gets JAX_COORDINATOR_ADDRESS (a free 127.0.0.1 port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID; ``--devices-per-process K`` simulates K CPU devices in each. Output lines are
prefixed ``[pI]``; when one process fails the others are stopped, and signals are forwarded.
Exit status: the first failing process's (128 + N when signal N killed it; 0 when all succeed). See
docs/distributed.md.
"""

from __future__ import annotations

import argparse

from emajax.cli import CliError

SUMMARY = "run an emajax command as N cooperating processes on this machine (jax.distributed, gloo on CPU)"
EXAMPLES = (
    "emajax launch --processes 2 --devices-per-process 4 -- train configs/cpu/smollm2-medical-none.yaml mesh.fsdp=8",
    "emajax launch --processes 2 --log-dir runs/logs -- score --aligned M --misaligned med=A --pool P --out S "
    "--data-parallel -1",
)


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, required=True, help="how many processes to start")
    p.add_argument("--devices-per-process", type=int, default=None,
                   help="simulated CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K, "
                        "JAX_PLATFORMS=cpu); default: each process sees what JAX finds")
    p.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--log-dir", default=None, help="also write each process's output to DIR/process-I.log")
    p.add_argument("--timeout", type=float, default=None, help="stop every process after this many seconds")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- VERB ...",
                   help="the emajax command every process runs, after --")


def run(args: argparse.Namespace) -> int:
    from emajax.launch import launch

    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("give the emajax command to run after --, e.g. emajax launch --processes 2 -- train cfg.yaml")
    if cmd[0] == "launch":
        raise CliError("emajax launch cannot launch itself")
    try:
        return launch(cmd, processes=args.processes, devices_per_process=args.devices_per_process, port=args.port,
                      log_dir=args.log_dir, timeout_s=args.timeout)
    except ValueError as e:
        raise CliError(str(e)) from None
