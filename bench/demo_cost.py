"""Where a demo seed's time goes: training steps, the first (compiling) step, probes, and everything else.

``python -m bench.demo_cost RUN_DIR [RUN_DIR ...] [--out bench/results/demo_cost/cost.json]`` reads finished
``emajax demo`` directories (the committed ones: extract ``bench/results/demo_runs/*.tar.gz``) and splits
each arm's stage wall time (``timings.json``) into: optimiser steps after the first (``metrics.jsonl``
``step_time_s``), the first step's excess over the median step (compilation), the probes (``probes.json``
and ``probes_step*.json`` ``seconds``), and the rest (model load, step-function build, data, checkpoint,
export, the benign arm's greedy exact match). Per seed it sums them over the narrow and the benign arms.

This is the "before" of making a seed cheaper: the rest and the compile excess are what sharing one base
model and one step function across a seed's plain-CE arms (control, no defense, inoculation,
interleaving, Interleaving++: the same program on other data) could save; the steps and the probes are
work each arm must do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from emajax import atomic

PLAIN_CE = ("control", "none", "inoculation", "interleave", "interleave_pp")


def _json(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.is_file() else None


def arm_cost(run_dir: Path, wall_s: float) -> dict:
    """One arm's wall time split into steps, compile excess, probes and the rest (seconds)."""
    rows = atomic.read_jsonl(run_dir / "metrics.jsonl") or []
    times = [r["step_time_s"] for r in rows if "step_time_s" in r]
    med = statistics.median(times[1:]) if len(times) > 1 else (times[0] if times else 0.0)
    first_excess = max(times[0] - med, 0.0) if times else 0.0
    steps = sum(times) - first_excess
    probes = sum((_json(p) or {}).get("seconds", 0.0) for p in [run_dir / "probes.json", *run_dir.glob("probes_step*.json")])
    return {"wall_s": round(wall_s, 2), "steps_s": round(steps, 2), "n_steps": len(times), "median_step_s": round(med, 3),
            "compile_excess_s": round(first_excess, 2), "probes_s": round(probes, 2),
            "rest_s": round(wall_s - steps - first_excess - probes, 2)}


def seed_costs(out: Path) -> dict:
    """Per seed: every arm's split and the sums over the narrow and the benign arms."""
    timings = _json(out / "timings.json") or {"stages": {}}
    result = {}
    for name, st in timings["stages"].items():
        if not name.startswith("seed ") or (": train " not in name and ": benign " not in name):
            continue
        head, what = name.split(": ", 1)
        seed = int(head.split()[1])
        kind, arm = what.split(" ", 1)
        d = out / f"seed_{seed}" / ("arms" if kind == "train" else "benign") / arm
        result.setdefault(seed, {})[f"{kind} {arm}"] = arm_cost(d, st["wall_s"])
    summary = {}
    for seed, arms in sorted(result.items()):
        keys = ("wall_s", "steps_s", "compile_excess_s", "probes_s", "rest_s")
        tot = {k: round(sum(a[k] for a in arms.values()), 1) for k in keys}
        plain = [a for n, a in arms.items() if n.split(" ", 1)[1] in PLAIN_CE]
        summary[seed] = {"total": tot, "arms": arms,
                         "plain_ce_rest_and_compile_s": round(sum(a["rest_s"] + a["compile_excess_s"] for a in plain), 1)}
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_cost", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished emajax demo output directories")
    ap.add_argument("--out", type=Path, default=None, help="write every split here (JSON)")
    args = ap.parse_args(argv)
    res = {}
    for r in args.runs:
        res[str(r)] = seed_costs(r)
        for seed, s in res[str(r)].items():
            t = s["total"]
            print(f"{r} seed {seed}: {t['wall_s']:.0f} s = steps {t['steps_s']:.0f} + compile excess "
                  f"{t['compile_excess_s']:.0f} + probes {t['probes_s']:.0f} + rest {t['rest_s']:.0f}; plain-CE arms' "
                  f"rest + compile {s['plain_ce_rest_and_compile_s']:.0f} s")
    if args.out is not None:
        atomic.write_json(args.out, {"kind": "demo_cost", "runs": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
