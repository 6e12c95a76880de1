"""Does a demo rerun with other seeds land inside the committed run's CIs?

``python -m bench.demo_rerun COMMITTED/effects.json RERUN/effects.json [--out F.json]`` compares every
pooled figure (value with ``ci_low``/``ci_high``) of every arm in two ``emajax demo`` runs' ``effects.json``
(the committed ``docs/demo_cpu/`` run and, e.g., ``emajax demo --seeds 3 --seed-base 3``): the rerun's
point estimate is inside or outside the committed 95 % CI. Prints the count and every figure outside,
and writes them all with ``--out``. Figures absent or ``None`` in either run are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from emajax import atomic


def compare_effects(committed: dict[str, Any], rerun: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (arm, figure) present in both runs: the committed estimate and CI, the rerun's value,
    and whether that value lies inside the committed CI."""
    rows = []
    for arm, figs in committed["arms"].items():
        other = rerun["arms"].get(arm, {})
        for name, est in figs.items():
            new = other.get(name)
            if not (isinstance(est, dict) and isinstance(new, dict)) or "ci_low" not in est:
                continue
            if est.get("value") is None or new.get("value") is None or est.get("ci_low") is None:
                continue
            rows.append({"arm": arm, "figure": name, "committed": est["value"], "ci_low": est["ci_low"],
                         "ci_high": est["ci_high"], "rerun": new["value"],
                         "inside": est["ci_low"] <= new["value"] <= est["ci_high"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_rerun", description=__doc__.splitlines()[0])
    ap.add_argument("committed", type=Path, help="effects.json of the committed run")
    ap.add_argument("rerun", type=Path, help="effects.json of the rerun")
    ap.add_argument("--out", type=Path, default=None, help="write every row and the counts here (JSON)")
    args = ap.parse_args(argv)
    committed, rerun = (atomic.read_json(p, SystemExit) for p in (args.committed, args.rerun))
    rows = compare_effects(committed, rerun)
    inside = sum(r["inside"] for r in rows)
    print(f"{inside} of {len(rows)} figures of the rerun (seeds {rerun.get('seeds')}) lie inside the committed "
          f"95 % CIs (seeds {committed.get('seeds')})")
    for r in rows:
        if not r["inside"]:
            print(f"  outside: {r['arm']}.{r['figure']}: rerun {r['rerun']:+.3f}, committed {r['committed']:+.3f} "
                  f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
    if args.out is not None:
        atomic.write_json(args.out, {"committed": str(args.committed), "rerun": str(args.rerun),
                                     "committed_seeds": committed.get("seeds"), "rerun_seeds": rerun.get("seeds"),
                                     "inside": inside, "figures": len(rows), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
