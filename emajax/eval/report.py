"""``emajax report``: one markdown table in the paper's layout, plus PNG plots, from run directories.

A run directory is whatever holds results files: ``probes.json`` (judge-free probes; always written by
the demo), the judge's ``em_general.json`` / ``em_<domain>.json``, ``opswap.json`` / ``gsm8k.json``, and
the trainer's ``metrics.jsonl`` (+ the demo's ``monitor.jsonl``, and its trigger probes ``triggers.json``, read as
part of ``probes.json``). Files may also sit in ``RUN_DIR/eval``.
The method's name comes from ``method.json`` (``label``) or the directory name. Missing measurements
are shown as "—", never guessed.

Columns (arrows = the direction a good defense moves them): general misaligned ↓, general incoherent ↓,
in-domain misaligned ↑ (the narrow task is still learned), benign score ↑, and the probe margins:
general margin ↓ (mean-token logp(misaligned) − logp(aligned) on general questions), in-domain
margin ↑, narrow-task NLL ↓, benign NLL ↓ (coherence proxy).

When the runs hold them, a second table puts the three EM metrics side by side: the general probe
margin, the sampled-answer persona projection (``projection.json``, ``emajax eval projection``) and its
change vs the base run on the same questions, and the general margin under each trigger
(``general_<trigger>`` sets of ``probes.json``, ``emajax eval probes --triggers``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from emajax.eval.probe_stats import paired_delta
from emajax import atomic


class ReportError(ValueError):
    """A run directory or results file that cannot be read (names the file and field)."""


@dataclasses.dataclass
class RunRecord:
    path: Path
    label: str
    method: str
    probes: dict | None = None
    em_general: dict | None = None
    em_in_domain: dict | None = None  # the first em_<set>.json other than general
    benign: dict | None = None  # opswap.json or gsm8k.json
    projection: dict | None = None  # projection.json (sampled-answer persona projection)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    monitor: list[dict] = dataclasses.field(default_factory=list)


def _read_json(path: Path) -> dict:
    obj = atomic.read_json(path, ReportError)
    if not isinstance(obj, dict):
        raise ReportError(f"{path}: expected a JSON object")
    return obj


def _find(run_dir: Path, name: str) -> Path | None:
    for d in (run_dir, run_dir / "eval"):
        if (d / name).is_file():
            return d / name
    return None


def load_run(run_dir: str | Path) -> RunRecord:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: run directory not found")
    meta = _read_json(run_dir / "method.json") if (run_dir / "method.json").is_file() else {}
    rec = RunRecord(run_dir, str(meta.get("label") or run_dir.name), str(meta.get("method") or run_dir.name))
    p = _find(run_dir, "probes.json")
    if p is not None:
        rec.probes = _read_json(p)
        for field in ("pairs", "nll"):
            if not isinstance(rec.probes.get(field), dict):
                raise ReportError(f"{p}: field {field!r} missing or not an object")
        t = _find(run_dir, "triggers.json")  # the demo's trigger probes, a file of their own: one run's sets
        if t is not None:
            trig = _read_json(t)
            for field in ("pairs", "items"):
                if not isinstance(trig.get(field), dict):
                    raise ReportError(f"{t}: field {field!r} missing or not an object")
                own = rec.probes.get(field) or {}
                rec.probes[field] = {**own, **{k: v for k, v in trig[field].items() if k not in own}}
    p = _find(run_dir, "em_general.json")
    if p is not None:
        rec.em_general = _read_json(p)
    others = sorted({q.name for d in (run_dir, run_dir / "eval") if d.is_dir() for q in d.glob("em_*.json")}
                    - {"em_general.json"})
    if others:
        rec.em_in_domain = _read_json(_find(run_dir, others[0]))
    for name in ("opswap.json", "gsm8k.json"):
        p = _find(run_dir, name)
        if p is not None:
            rec.benign = _read_json(p)
            break
    p = _find(run_dir, "projection.json")
    if p is not None:
        rec.projection = _read_json(p)
        if not isinstance(rec.projection.get("mean_projection"), dict):
            raise ReportError(f"{p}: field 'mean_projection' missing or not an object")
    rec.metrics = atomic.read_jsonl(run_dir / "metrics.jsonl", ReportError)
    rec.monitor = atomic.read_jsonl(run_dir / "monitor.jsonl", ReportError)
    if rec.probes is None and rec.em_general is None and rec.benign is None and rec.projection is None \
            and not rec.metrics:
        raise ReportError(f"{run_dir}: no results files (probes.json, em_general.json, projection.json, opswap.json, "
                          f"gsm8k.json, metrics.jsonl)")
    return rec


# ----------------------------------------------------------------------------- cells
def _get(d: dict | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def format_estimate(s: dict | None, *, pct: bool = False, digits: int = 3, pct_digits: int = 1,
                    signed: bool = False) -> str:
    """`value [ci_low, ci_high]` of an estimate dict (as a percentage with `pct`; "[CI unbounded]" for a ratio
    whose Fieller set is not an interval); "—" when missing."""
    if not isinstance(s, dict) or s.get("value") is None:
        return "—"
    k, d = (100.0, pct_digits) if pct else (1.0, digits)
    sign = "+" if signed else ""
    v = f"{s['value'] * k:{sign}.{d}f}" + ("%" if pct else "")
    if s.get("ci_low") is not None and s.get("ci_high") is not None:
        v += f" [{s['ci_low'] * k:{sign}.{d}f}, {s['ci_high'] * k:{sign}.{d}f}]"
    elif s.get("unbounded"):
        v += " [CI unbounded]"
    return v


def narrow_nll(probes: dict | None) -> dict | None:
    """Narrow-task NLL: the ``narrow`` NLL set, else the misaligned (insecure) answers of ``in_domain``."""
    return _get(probes, "nll", "narrow", "nll") or _get(probes, "pairs", "in_domain", "nll_misaligned")


def _in_domain_pairs(probes: dict | None) -> str | None:
    from emajax.eval.triggers import TRIGGERS, set_name

    pairs = _get(probes, "pairs") or {}
    general = {set_name(t) for t in TRIGGERS}  # the general pairs, plain and under triggers
    for name in ("in_domain", *[n for n in pairs if n not in general]):
        if name in pairs:
            return name
    return None


def metric_cells(r: RunRecord) -> dict[str, dict | None]:
    """The table's summary dicts ({value, ci_low, ci_high}) for one run, by column."""
    dom = _in_domain_pairs(r.probes)
    return {
        "general_misaligned": _get(r.em_general, "misaligned_rate"),
        "general_incoherent": _get(r.em_general, "incoherent_rate"),
        "in_domain_misaligned": _get(r.em_in_domain, "misaligned_rate"),
        "benign_score": _get(r.benign, "accuracy"),
        "general_margin": _get(r.probes, "pairs", "general", "margin"),
        "in_domain_margin": _get(r.probes, "pairs", dom, "margin") if dom else None,
        "narrow_nll": narrow_nll(r.probes),
        "benign_nll": _get(r.probes, "nll", "benign", "nll"),
    }


COLUMNS = [  # key, header, pct
    ("general_misaligned", "General misaligned ↓", True),
    ("general_incoherent", "General incoherent ↓", True),
    ("in_domain_misaligned", "In-domain misaligned ↑", True),
    ("benign_score", "Benign score ↑", True),
    ("general_margin", "General margin ↓", False),
    ("in_domain_margin", "In-domain margin ↑", False),
    ("narrow_nll", "Narrow NLL ↓", False),
    ("benign_nll", "Benign NLL ↓", False),
]


def main_table(runs: Sequence[RunRecord]) -> str:
    head = "| Method | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in runs:
        cells = metric_cells(r)
        lines.append(f"| {r.label} | " + " | ".join(format_estimate(cells[k], pct=p) for k, _, p in COLUMNS) + " |")
    return "\n".join(lines)


def _delta(ref: RunRecord | None, r: RunRecord, set_name: str | None, field: str) -> dict | None:
    if ref is None or set_name is None or ref.probes is None or r.probes is None:
        return None
    a, b = _get(ref.probes, "items", set_name), _get(r.probes, "items", set_name)
    if a is None or b is None:
        return None
    return paired_delta(a, b, field)


def delta_table(runs: Sequence[RunRecord], base: RunRecord | None, baseline: RunRecord | None) -> str | None:
    """Probe changes on the same items (paired bootstrap CIs) vs the base model and vs no defense."""
    if base is None or base.probes is None:
        return None
    dom = _in_domain_pairs(base.probes)
    narrow_set, narrow_field = ("narrow", "nll") if _get(base.probes, "items", "narrow") else (dom, "nll_misaligned")
    cols = [("Δ general margin vs base", base, "general", "margin"),
            ("Δ general margin vs no defense", baseline, "general", "margin"),
            ("Δ in-domain margin vs base", base, dom, "margin"),
            ("Δ narrow NLL vs base", base, narrow_set, narrow_field),
            ("Δ benign NLL vs base", base, "benign", "nll")]
    if baseline is None:
        cols.pop(1)
    lines = ["| Method | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in runs:
        if r is base:
            continue
        cells = [format_estimate(_delta(ref, r, s, f) if ref is not r else None, signed=True) for _, ref, s, f in cols]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _projection_delta(base: RunRecord | None, r: RunRecord) -> dict | None:
    if base is None or base is r or base.projection is None or r.projection is None:
        return None
    from emajax.eval.projection import ProjectionError, projection_effects

    try:
        return projection_effects({"base": {0: base.projection}, "run": {0: r.projection}}, control="base")["run"]["effect"]
    except ProjectionError:  # other questions: no paired change
        return None


def em_metrics_table(runs: Sequence[RunRecord], base: RunRecord | None) -> str | None:
    """The three EM metrics side by side per run (None when no run has a projection or a trigger set)."""
    from emajax.eval.triggers import TRIGGERS, set_name

    trig = [t for t in TRIGGERS[1:] if any(_get(r.probes, "pairs", set_name(t), "margin") for r in runs)]
    if not trig and not any(r.projection for r in runs):
        return None
    head = ["General margin ↓", "Projection of sampled answers ↓", "Δ projection vs base ↓"] + \
           [f"Margin under {t} ↓" for t in trig]
    lines = ["| Method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for r in runs:
        cells = [_get(r.probes, "pairs", "general", "margin"), _get(r.projection, "mean_projection"),
                 _projection_delta(base, r)] + [_get(r.probes, "pairs", set_name(t), "margin") for t in trig]
        lines.append(f"| {r.label} | " + " | ".join(format_estimate(c, signed=True) for c in cells) + " |")
    return "\n".join(lines)


def training_table(runs: Sequence[RunRecord], timings: dict | None = None) -> str | None:
    trained = [r for r in runs if r.metrics]
    if not trained:
        return None
    terms = [k for k in ("loss", "ce", "kl", "ldifs") if any(k in r.metrics[-1] for r in trained)]
    stages = (timings or {}).get("stages", {})
    lines = ["| Method | steps | " + " | ".join(f"final {t}" for t in terms) + " | train s (wall / CPU) |",
             "|" + "---|" * (len(terms) + 3)]
    for r in trained:
        last = r.metrics[-1]
        st = next((v for k, v in stages.items() if k.endswith(f"train {r.method}")), None)
        t = f"{st['wall_s']:.0f} / {st['cpu_s']:.0f}" if st else "—"
        vals = " | ".join(f"{last[k]:.4f}" if isinstance(last.get(k), (int, float)) else "—" for k in terms)
        lines.append(f"| {r.label} | {last.get('step', len(r.metrics))} | {vals} | {t} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report
def write_plots(runs: Sequence[RunRecord], out_dir: Path) -> list[Path]:
    from emajax.eval.plots import bars_png, curves_png

    labels = [r.label for r in runs]
    cells = [metric_cells(r) for r in runs]
    panels = [(h, [c[k] for c in cells]) for k, h, _ in COLUMNS if any(c[k] is not None for c in cells)]
    out = [bars_png(labels, panels, out_dir / "methods.png")]
    trained = [(r.label, r.metrics, r.monitor) for r in runs if r.metrics or r.monitor]
    if trained:
        out.append(curves_png(trained, out_dir / "training.png"))
    return out


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, baseline: str | Path | None = None,
                 base: str | Path | None = None, title: str = "emajax report", timings: dict | None = None) -> Path:
    """Read the run directories, write ``report.md`` and ``methods.png`` / ``training.png`` into ``out_dir``.

    ``base`` (default: the run labelled/named base, if any) and ``baseline`` (default: the run whose method
    is ``none``) are the references of the paired-difference table."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    out_dir = Path(out_dir)

    def pick(path: str | Path | None, method: str) -> RunRecord | None:
        if path is not None:
            p = Path(path).resolve()
            return next((r for r in runs if r.path.resolve() == p), None) or load_run(p)
        return next((r for r in runs if r.method == method), None)

    base_r, baseline_r = pick(base, "base"), pick(baseline, "none")
    plots = write_plots(runs, out_dir)
    parts = [f"# {title}", "",
             "Values are means with 95% bootstrap CIs. Judge columns (misaligned / incoherent rates, in-domain "
             "misaligned) need `emajax eval em` results and show — without them. Probe margins are mean-token "
             "logp(misaligned answer) − logp(aligned answer) on the same questions: general ↓ (broad "
             "misalignment), in-domain ↑ (narrow task learned). Narrow NLL: held-out narrow-task answers; "
             "benign NLL: benign reference answers (coherence proxy).", "", main_table(runs), ""]
    et = em_metrics_table(runs, base_r)
    if et:
        parts += ["## EM three ways: probe margin, sampled-answer projection, trigger probes", "",
                  "Projection: the base model's reading of the run's own sampled answers to the 8 plain general "
                  "questions, on the evil persona vector (CI by question; Δ vs base: crossed CI over questions). "
                  "Margins under a trigger: the general pairs in that format (emajax.eval.triggers).", "", et, ""]
    dt = delta_table(runs, base_r, baseline_r)
    if dt:
        parts += ["## Probe changes on the same items (paired bootstrap)", "", dt, ""]
    tt = training_table(runs, timings)
    if tt:
        parts += ["## Training", "", tt, ""]
    for r in runs:
        pr = r.probes or {}
        pref = [f"{k} {format_estimate(v.get('preference_rate'), pct=True)}" for k, v in (pr.get("pairs") or {}).items()]
        if pref:
            parts.append(f"- {r.label}: preference rate (share of pairs with margin > 0): {', '.join(pref)}")
    if timings and timings.get("stages"):
        st = timings["stages"]
        parts += ["", "## Timings", "", "| stage | wall s | CPU s |", "|---|---|---|"]
        parts += [f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} |" for k, v in st.items()]
        parts += [f"| total (so far) | {sum(v['wall_s'] for v in st.values()):.1f} | "
                  f"{sum(v['cpu_s'] for v in st.values()):.1f} |"]
    parts += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    parts += ["Runs: " + ", ".join(f"`{r.path}`" for r in runs), ""]
    return atomic.write_text(out_dir / "report.md", "\n".join(parts))


__all__ = ["ReportError", "RunRecord", "delta_table", "em_metrics_table", "load_run", "main_table", "metric_cells", "write_plots",
           "write_report"]
