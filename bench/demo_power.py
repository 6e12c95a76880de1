"""Power of the demo's no-defense EM effect against seeds per run and held-out items, from measured components.

``python -m bench.demo_power [--runs bench/results/demo_runs] [--out bench/results/demo_power] [--reps N]``
extracts the committed run directories and measures the variance components (seed, item, residual; the
crossed model of ``emajax.eval.pooled``) of the no-defense EM effect (general margin, none − control):

* **held-out**: the cpu recipe (16 steps at lr 1e-3) on the 96 held-out pairs, seeds 0-8 pooled (and each
  3-seed run alone, to show how poorly 3 seeds pin the seed component down);
* **dev**: the dose study's lr 1e-3 runs on the 40 dev pairs at 8, 16, 32 and 64 steps (3 seeds each).

and, for the verdicts, how often six defenses that truly remove all EM are shown *equivalent* to the
control (``emajax.demo.power.equivalence_power``).

Then ``emajax.demo.power.simulate`` gives, per design (seeds S x items I, and dose on dev), the chance that the
run's pooled 95 % CI lies above 0 — at the measured effect and at the lower end of its CI — with the wall
time of such a run on the 2-core CPU from the committed run's ``timings.json`` (shared stages once, then
per seed). Writes ``power.json`` and ``power.png``. Pure simulation after the extraction: ~2 minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from emajax import atomic

REPO = Path(__file__).resolve().parents[1]
HELDOUT_SEEDS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15)
HELDOUT_ITEMS = (96, 192, 200, 384)  # 200: the held-out pairs the demo probes (emajax/data/general_pairs.jsonl)
DEV_SEEDS = (1, 2, 3, 5, 10)
DEV_ITEMS = (40, 96, 192)


def em_matrix(run: Path) -> np.ndarray:
    """[seeds, items] general margin of no defense minus the control (held-out pairs) of a demo directory."""
    from emajax.demo.effects import DemoResults

    res = DemoResults(run)
    seeds = res.seeds_with(res.narrow, ["none", "control"])
    return res.matrix(res.narrow, seeds, "none", "general", "margin") - \
        res.matrix(res.narrow, seeds, "control", "general", "margin")


def dose_matrices(run: Path) -> dict[int, np.ndarray]:
    """step -> [seeds, dev items] EM effect of a dose-study directory."""
    from emajax.demo.dose import _items

    seeds = sorted(int(p.name[5:]) for p in run.glob("seed_*"))
    steps = sorted({int(p.stem.split("step")[1]) for p in run.glob("seed_*/none/probes_step*.json")})
    out = {}
    for t in steps:
        rows = [_items(run / f"seed_{s}" / "none" / f"probes_step{t}.json", "general", "margin")
                - _items(run / f"seed_{s}" / "control" / f"probes_step{t}.json", "general", "margin") for s in seeds]
        out[t] = np.stack(rows)
    return out


def seed_minutes(timings: dict) -> tuple[float, float]:
    """(shared stages, mean per seed) wall minutes of a demo run's timings.json."""
    shared, per = 0.0, {}
    for name, v in timings["stages"].items():
        if name.startswith("seed "):
            s = name.split(":")[0]
            per[s] = per.get(s, 0.0) + v["wall_s"]
        else:
            shared += v["wall_s"]
    return shared / 60, float(np.mean(list(per.values()))) / 60


def _summary(x: np.ndarray) -> dict:
    from emajax.eval.pooled import pooled_mean, variance_components

    s = pooled_mean(x)
    return {**variance_components(x), "ci_low": s["ci_low"], "ci_high": s["ci_high"], "df": s["df"]}


def _plot(result: dict, path: Path) -> None:
    from emajax.eval.plots import _plt, _save

    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    h = result["heldout"]
    for k, items in enumerate(HELDOUT_ITEMS):
        rows = [r for r in h["grid"] if r["n_items"] == items]
        a1.plot([r["n_seeds"] for r in rows], [r["power_at_mean"] for r in rows], "-o", color=f"C{k}",
                label=f"{items} items, effect +{h['components']['mean']:.3f}")
        a1.plot([r["n_seeds"] for r in rows], [r["power_at_ci_low"] for r in rows], "--", color=f"C{k}",
                label=f"{items} items, effect +{h['components']['ci_low']:.3f} (CI low)")
    a1.axhline(0.8, color="black", lw=0.7)
    a1.set(xlabel="seeds per run", ylabel="P(95 % CI above 0)", ylim=(0, 1.02),
           title="held-out pairs, cpu recipe (16 steps, lr 1e-3)")
    a1.legend(fontsize=7)
    for k, (step, d) in enumerate(sorted(result["dev"].items(), key=lambda t: int(t[0]))):
        rows = [r for r in d["grid"] if r["n_items"] == 96]
        a2.plot([r["n_seeds"] for r in rows], [r["power_at_mean"] for r in rows], "-o", color=f"C{k}",
                label=f"{step} steps (dev effect {d['components']['mean']:+.3f})")
    a2.axhline(0.8, color="black", lw=0.7)
    a2.set(xlabel="seeds per run", ylabel="P(95 % CI above 0)", ylim=(0, 1.02),
           title="dev pairs' components, lr 1e-3, at 96 items")
    a2.legend(fontsize=7)
    _save(fig, path)


def main(argv: list[str] | None = None) -> int:
    from bench.demo_rerender import _extract, pool
    from emajax.demo.power import simulate

    ap = argparse.ArgumentParser(prog="python -m bench.demo_power", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=REPO / "bench" / "results" / "demo_runs")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo_power")
    ap.add_argument("--reps", type=int, default=1000, help="simulated runs per design (default 1000)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for tar in sorted(args.runs.glob("*.tar.gz")):
            _extract(tar, work)
        runs = [work / "demo", work / "demo_k3", work / "demo_k6"]
        held = _summary(em_matrix(pool(runs, work / "pooled_9")))
        per_run = {r.name: _summary(em_matrix(r)) for r in runs}
        dev = {t: _summary(x) for t, x in dose_matrices(work / "dose_lr1e-3").items()}
        shared_min, seed_min = seed_minutes(json.loads((work / "demo" / "timings.json").read_text()))

    def grid(c: dict, seeds, items, with_low: bool) -> list[dict]:
        rows = []
        for i in items:
            for s in seeds:
                comps = (c["var_seed"], c["var_item"], c["var_resid"])
                r = simulate(c["mean"], *comps, s, i, args.reps, seed=1000 * s + i)
                row = {"n_seeds": s, "n_items": i, "power_at_mean": r["power"], "half_width": round(r["half_width"], 4),
                       "minutes_2core": round(shared_min + s * seed_min, 1)}
                if with_low:
                    row["power_at_ci_low"] = simulate(c["ci_low"], *comps, s, i, args.reps, seed=1000 * s + i)["power"]
                rows.append(row)
                print(f"  {s:2d} seeds x {i:3d} items: power {row['power_at_mean']:.2f}"
                      + (f" ({row['power_at_ci_low']:.2f} at the CI low)" if with_low else "")
                      + f", ~{row['minutes_2core']} min", flush=True)
        return rows

    print(f"held-out components (9 seeds): {held}")
    result = {"kind": "demo_power", "reps": args.reps,
              "what": "P(pooled 95 % CI of the no-defense EM effect lies above 0) per design, simulated from measured "
                      "variance components (negative components as 0) with emajax.eval.pooled's interval",
              "minutes_model": {"shared_min": round(shared_min, 2), "per_seed_min": round(seed_min, 2),
                                "source": "docs/demo_cpu/timings.json (idle 2-core Xeon)"},
              "heldout": {"components": held, "per_run": per_run,
                          "grid": grid(held, HELDOUT_SEEDS, HELDOUT_ITEMS, True)},
              "dev": {}}
    from emajax.demo.power import equivalence_power
    from emajax.eval.verdicts import EQUIV_MARGIN

    eq = []
    for s_, i_ in ((3, 96), (12, 96), (20, 96), (12, 192), (20, 192),
                   (12, 200), (20, 200)):
        share = equivalence_power(held["var_seed"], held["var_item"], held["var_resid"], s_, i_, seed=s_ * 1000 + i_)
        eq.append({"n_seeds": s_, "n_items": i_, "share_shown_equivalent": round(share, 3)})
        print(f"  equivalence: {s_:2d} seeds x {i_:3d} items: {share:.2f} of 6 perfect defenses shown equivalent", flush=True)
    result["heldout"]["equivalence"] = {
        "what": f"share of 6 defenses with true EM effect 0 (no defense's components) shown equivalent to the control "
                f"within ±{EQUIV_MARGIN} (TOST, Holm across the 6)", "grid": eq}
    for t, c in dev.items():
        print(f"dev, {t} steps: {c}")
        result["dev"][str(t)] = {"components": c, "grid": grid(c, DEV_SEEDS, DEV_ITEMS, False)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / "power.json", result)
    _plot(result, args.out / "power.png")
    print(f"wrote {args.out / 'power.json'} and power.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
