"""Re-render every committed demo result from its run directories, without training.

``python -m bench.demo_rerender [--runs bench/results/demo_runs] [--work DIR]`` extracts the committed run
directories (``seeds_0-2``, ``seeds_3-5``, ``seeds_6-8``, ``dose_runs``: probes with per-item values,
metrics, configs, timings; no weights) and writes, with today's ``emajax.eval.pooled`` intervals and
``emajax.eval.verdicts`` rules:

* ``docs/demo_cpu/`` — the committed 3-seed run's report.md, effects.json and plots;
* ``bench/results/demo_rerun_k3/``, ``demo_rerun_k6/`` — the reruns' reports, and ``compare.json``
  (``bench.demo_rerun`` against the committed run);
* ``bench/results/demo_pooled_9/`` — the nine seeds pooled in one directory (one run's base, data, persona
  and plan; every run's ``seed_*``);
* ``bench/results/demo_dose/lr1e-3.json``, ``lr2e-4.json``, ``dose.png`` — the dose study.

What ``emajax demo`` would re-render too (its report stage; this skips the CLI so ``timings.json`` stays
the training run's). numpy, scipy and matplotlib only; a few seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from emajax import atomic

REPO = Path(__file__).resolve().parents[1]
RENDERED = ("report.md", "effects.json", "effects.png", "dose.png", "training.png")


def _extract(tar: Path, into: Path) -> None:
    with tarfile.open(tar) as t:
        t.extractall(into, filter="data")


def _render(run: Path, dest: Path) -> dict:
    from emajax.demo.report import write_demo_report

    write_demo_report(run)
    dest.mkdir(parents=True, exist_ok=True)
    for name in RENDERED:
        if (run / name).is_file():
            shutil.copyfile(run / name, dest / name)
    return json.loads((run / "effects.json").read_text())


def pool(runs: list[Path], out: Path) -> Path:
    """One demo directory holding every run's seeds (the first run's base, data, persona vector and plan)."""
    first = runs[0]
    out.mkdir(parents=True)
    for name in ("base", "data", "persona"):
        if (first / name).is_dir():
            shutil.copytree(first / name, out / name)
    plan = json.loads((first / "plan.json").read_text())
    seeds = []
    for r in runs:
        for d in sorted(r.glob("seed_*")):
            shutil.copytree(d, out / d.name)
            seeds.append(int(d.name.split("_", 1)[1]))
    atomic.write_json(out / "plan.json", {**plan, "seeds": sorted(seeds)})
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.demo_rerun import main as compare
    from emajax.demo.dose import combine, write_dose_report

    ap = argparse.ArgumentParser(prog="python -m bench.demo_rerender", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=REPO / "bench" / "results" / "demo_runs")
    ap.add_argument("--work", type=Path, default=None, help="extract here (default: a temporary directory)")
    args = ap.parse_args(argv)
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = args.work or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    for tar in sorted(args.runs.glob("*.tar.gz")):
        _extract(tar, work)
    res = REPO / "bench" / "results"
    committed = _render(work / "demo", REPO / "docs" / "demo_cpu")
    print(f"docs/demo_cpu: no-defense EM effect {committed['arms']['none']['em_effect']}")
    for k in (3, 6):
        dest = res / f"demo_rerun_k{k}"
        _render(work / f"demo_k{k}", dest)
        compare([str(REPO / "docs" / "demo_cpu" / "effects.json"), str(dest / "effects.json"),
                 "--out", str(dest / "compare.json")])
    pooled = pool([work / "demo", work / "demo_k3", work / "demo_k6"], work / "pooled_9")
    _render(pooled, res / "demo_pooled_9")
    dose = res / "demo_dose"
    for lr in ("1e-3", "2e-4"):
        write_dose_report(work / f"dose_lr{lr}")
        shutil.copyfile(work / f"dose_lr{lr}" / "dose.json", dose / f"lr{lr}.json")
    print(combine([dose / "lr2e-4.json", dose / "lr1e-3.json"], dose / "dose.png"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
