"""PNG plots for ``emajax report``: per-method bars with confidence intervals, and training curves.

matplotlib with the Agg backend (no display); every figure is written to a temp file and renamed, so a
killed report never leaves a truncated PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence
from emajax import atomic

# Keys of metrics.jsonl rows that are not loss terms.
NON_LOSS_KEYS = {"step", "epoch", "lr", "tokens", "tokens_per_s", "step_time_s", "grad_norm"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    try:
        with atomic.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return path


def _color(i: int) -> str:
    """One fixed colour per method (its position), the same in every panel."""
    return f"C{i % 10}"


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return int(math.ceil(n / cols)), cols


def bars_png(labels: Sequence[str], panels: Sequence[tuple[str, Sequence[dict | None]]], path: str | Path) -> Path:
    """One panel per metric: a bar per method (value) with its CI as an error bar; missing values are
    left out. ``panels`` = [(title, [summary dict {value, ci_low, ci_high} or None per label])]."""
    plt = _plt()
    rows, cols = _grid(max(1, len(panels)))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, vals) in zip(axes.flat, panels):
        xs, ys, lo, hi = [], [], [], []
        for i, v in enumerate(vals):
            if v is None or v.get("value") is None:
                continue
            xs.append(i)
            ys.append(v["value"])
            l, h = v.get("ci_low"), v.get("ci_high")
            lo.append(0.0 if l is None else max(0.0, v["value"] - l))
            hi.append(0.0 if h is None else max(0.0, h - v["value"]))
        colors = [_color(i) for i in xs]
        ax.bar(xs, ys, yerr=[lo, hi], capsize=3, color=colors)
        ax.axhline(0.0, color="black", linewidth=0.6)
        if ys and min(ys) > 0:  # e.g. NLLs: zoom on the CIs, or every bar looks the same height
            low = min(y - l for y, l in zip(ys, lo))
            high = max(y + h for y, h in zip(ys, hi))
            pad = 0.15 * (high - low) or 0.05 * high
            ax.set_ylim(max(0.0, low - pad), high + pad)
            title += " (axis zoomed)"
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("per method, with 95% bootstrap CIs", fontsize=9)
    return _save(fig, Path(path))


def curves_png(series: Sequence[tuple[str, list[dict], list[dict]]], path: str | Path,
               monitor_key: str = "probe/general/margin") -> Path:
    """Training curves: one panel per loss term found in the runs' metrics rows, plus the EM monitor.
    ``series`` = [(label, metrics rows, monitor rows)]."""
    plt = _plt()
    terms: list[str] = []
    for _, rows, _ in series:
        for r in rows:
            for k, v in r.items():
                if k not in NON_LOSS_KEYS and isinstance(v, (int, float)) and k not in terms:
                    terms.append(k)
    has_monitor = any(any(monitor_key in r for r in mon) for _, _, mon in series)
    titles = terms + ([f"EM monitor: {monitor_key}"] if has_monitor else [])
    rows_n, cols = _grid(max(1, len(titles)))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False, layout="constrained")
    for ax in axes.flat[len(titles):]:
        ax.axis("off")
    for ax, title in zip(axes.flat, titles):
        for i, (label, rows, mon) in enumerate(series):
            src, key = (mon, monitor_key) if title.startswith("EM monitor") else (rows, title)
            pts = [(r["step"], r[key]) for r in src if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None, label=label,
                        color=_color(i))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    if titles:
        handles = [plt.Line2D([], [], color=_color(i), marker=".", label=label)
                   for i, (label, _, _) in enumerate(series)]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    else:
        axes.flat[0].text(0.5, 0.5, "no training metrics", ha="center", va="center")
    return _save(fig, Path(path))


def _errbar(ax, xs: Sequence[float], vals: Sequence[dict | None], **kw) -> None:
    pts = [(x, v) for x, v in zip(xs, vals) if v is not None and v.get("value") is not None]
    if not pts:
        return
    y = [v["value"] for _, v in pts]
    lo = [max(0.0, v["value"] - v["ci_low"]) if v.get("ci_low") is not None else 0.0 for _, v in pts]
    hi = [max(0.0, v["ci_high"] - v["value"]) if v.get("ci_high") is not None else 0.0 for _, v in pts]
    ax.errorbar([x for x, _ in pts], y, yerr=[lo, hi], capsize=3, **kw)


def dose_png(series: Sequence[tuple[str, Sequence[dict]]], path: str | Path) -> Path:
    """The dose curve: EM effect (no defense − control), each arm vs base, and narrow learning against
    optimiser steps, with 95 % CIs. ``series`` = [(label, dose rows of ``emajax.demo.dose.summarize_dose``)]."""
    plt = _plt()
    panels = [("EM effect: general margin, none − control", [("em_effect", None)]),
              ("general margin vs base", [("em_vs_base", "none"), ("em_control_vs_base", "control")]),
              ("narrow learning: in-domain margin, none − control", [("narrow_effect", None)]),
              ("benign NLL, none − control", [("coherence_effect", None)])]
    panels = [p for p in panels if any(r.get(k) for _, rows in series for r in rows for k, _ in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False, layout="constrained")
    for ax, (title, keys) in zip(axes.flat, panels):
        k = 0
        for label, rows in series:
            steps = [r["step"] for r in rows]
            for key, arm in keys:
                name = label if arm is None else f"{label}: {arm}"
                _errbar(ax, [s * (1 + 0.03 * k) for s in steps], [r.get(key) for r in rows], marker="o",
                        label=name, color=_color(k))
                k += 1
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("optimiser steps", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("dose study: means over seeds x items, 95 % crossed random-effects CIs", fontsize=9)
    return _save(fig, Path(path))


def effects_png(labels: Sequence[str], panels: Sequence[tuple[str, Sequence[dict | None]]], path: str | Path,
                note: str = "", colors: Sequence[str] | None = None,
                margins: Sequence[float | None] | None = None, title: str = "per method: mean with 95 % CI") -> Path:
    """Forest plot: one panel per figure (e.g. EM effect vs control), a point per method with its 95 % CI,
    a line at 0. ``panels`` = [(title, [summary dict or None per label])]; ``colors`` one per label (default:
    one per position); ``margins`` one per panel, drawn dashed (e.g. a decision rule's threshold)."""
    plt = _plt()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 0.45 * len(labels) + 1.6), squeeze=False, layout="constrained")
    ys = list(range(len(labels)))[::-1]
    for j, (ax, (head, vals)) in enumerate(zip(axes.flat, panels)):
        for i, (y, v) in enumerate(zip(ys, vals)):
            if v is None or v.get("value") is None:
                ax.text(0.0, y, "  —", va="center", fontsize=8)
                continue
            lo = v["value"] - v["ci_low"] if v.get("ci_low") is not None else 0.0
            hi = v["ci_high"] - v["value"] if v.get("ci_high") is not None else 0.0
            ax.errorbar([v["value"]], [y], xerr=[[max(0.0, lo)], [max(0.0, hi)]], fmt="o", capsize=3,
                        color=colors[i] if colors else _color(i))
        ax.axvline(0.0, color="black", linewidth=0.6)
        if margins and margins[j] is not None:
            ax.axvline(margins[j], color="black", linestyle="--", linewidth=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_title(head, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title + (f" ({note})" if note else ""), fontsize=9)
    return _save(fig, Path(path))
