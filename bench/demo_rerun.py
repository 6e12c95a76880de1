"""Does a demo rerun with other seeds land inside the committed run's CIs?

``python -m bench.demo_rerun COMMITTED/effects.json RERUN/effects.json [--out F.json]`` compares every
pooled figure (value with ``ci_low``/``ci_high``) of every arm in two ``emajax demo`` runs' ``effects.json``
(the committed ``docs/demo_cpu/`` run and, e.g., ``emajax demo --seeds 3 --seed-base 3``): the rerun's
point estimate is inside or outside the committed 95 % CI. Prints the count and every figure outside,
and writes them all with ``--out``. Figures absent or ``None`` in either run are skipped.

What to expect: a rerun redraws the seeds but not the probe items, so under the committed run's own
estimates its value differs from the committed one by ``N(0, se_seeds^2 (1 + S / S'))`` (``se_seeds``: the
seeds' share of the committed standard error, ``emajax.eval.pooled``; S and S' the two runs' seed counts). ``p_inside`` is the chance of landing inside the
committed CI under that model and ``expected_inside`` its sum: a count far below it says the committed
seeds understated the seed-to-seed spread. The figures share seeds, so their hits are correlated.
"""

from __future__ import annotations

import argparse
import math
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
                         "inside": est["ci_low"] <= new["value"] <= est["ci_high"],
                         "p_inside": p_inside(est, new.get("n_seeds"))})
    return rows


def p_inside(est: dict[str, Any], rerun_seeds: int | None = None) -> float | None:
    """P(a rerun with ``rerun_seeds`` seeds (default: as many as committed) lands in the committed CI when it
    differs from the committed value by N(0, se_seeds^2 (1 + S / S')); None without ``se_seeds`` (one seed,
    or a run from before it was recorded)."""
    sd = est.get("se_seeds")
    if sd is None:
        return None
    lo, hi = est["ci_low"] - est["value"], est["ci_high"] - est["value"]
    if sd == 0:
        return float(lo <= 0 <= hi)
    s_c = est.get("n_seeds") or 1
    scale = sd * math.sqrt(2 * (1 + s_c / (rerun_seeds or s_c)))  # sqrt(2) * the difference's sd, for erf

    def cdf(z: float) -> float:
        return 0.5 * (1 + math.erf(z / scale))

    return cdf(hi) - cdf(lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_rerun", description=__doc__.splitlines()[0])
    ap.add_argument("committed", type=Path, help="effects.json of the committed run")
    ap.add_argument("rerun", type=Path, help="effects.json of the rerun")
    ap.add_argument("--out", type=Path, default=None, help="write every row and the counts here (JSON)")
    args = ap.parse_args(argv)
    committed, rerun = (atomic.read_json(p, SystemExit) for p in (args.committed, args.rerun))
    rows = compare_effects(committed, rerun)
    inside = sum(r["inside"] for r in rows)
    ps = [r["p_inside"] for r in rows if r["p_inside"] is not None]
    expected = round(sum(ps), 1) if len(ps) == len(rows) else None
    print(f"{inside} of {len(rows)} figures of the rerun (seeds {rerun.get('seeds')}) lie inside the committed "
          f"95 % CIs (seeds {committed.get('seeds')})"
          + (f"; expected under the committed run's own seed spread: {expected}" if expected is not None else ""))
    for r in rows:
        if not r["inside"]:
            print(f"  outside: {r['arm']}.{r['figure']}: rerun {r['rerun']:+.3f}, committed {r['committed']:+.3f} "
                  f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]")
    if args.out is not None:
        atomic.write_json(args.out, {"committed": str(args.committed), "rerun": str(args.rerun),
                                     "committed_seeds": committed.get("seeds"), "rerun_seeds": rerun.get("seeds"),
                                     "inside": inside, "expected_inside": expected, "figures": len(rows),
                                     "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
