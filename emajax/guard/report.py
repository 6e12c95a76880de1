"""The decision's files: decision.json (what was decided, why, and hashes that pin what it was decided on),
report.md, a self-contained report.html (plots inlined as base64 PNG), and release/ (the job's adapter,
only when released). Every file is written atomically; decision.json is written last (it marks the job
decided)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from emajax import atomic


def sha256_file(path: str | Path) -> str:
    from emajax.scoring.plan import file_sha256

    return file_sha256(path)


def sha256_dir(path: str | Path) -> str:
    """sha256 over a directory's files (relative path and content, in sorted order)."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(bytes.fromhex(sha256_file(p)))
    return h.hexdigest()


def git_commit() -> str | None:
    """The commit of the emajax checkout running this (with ``-dirty`` when it has local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _effect_str(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "n/a"
    lo, hi = e.get("ci_low"), e.get("ci_high")
    ci = f" [{lo:+.4f}, {hi:+.4f}]" if lo is not None else ""
    return f"{e['value']:+.4f}{ci}"


def effects_png(metrics: list[dict]) -> bytes | None:
    """Job − control effect per metric with its 95 % CI and the policy's margin."""
    rows = [m for m in metrics if m.get("effect") and m["effect"].get("value") is not None]
    if not rows:
        return None
    from emajax.eval.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.55 * len(rows)))
    for i, m in enumerate(rows):
        e = m["effect"]
        lo = e["ci_low"] if e["ci_low"] is not None else e["value"]
        hi = e["ci_high"] if e["ci_high"] is not None else e["value"]
        ax.errorbar([e["value"]], [i], xerr=[[e["value"] - lo], [hi - e["value"]]], fmt="o", color=f"C{i}",
                    capsize=4)
        ax.plot([m["margin"]] * 2, [i - 0.35, i + 0.35], color="k", linestyle="--", linewidth=1)
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{m['name']} ({m['kind']})" for m in rows])
    ax.set_xlabel("job − control (95 % CI); dashed: the policy's margin")
    ax.invert_yaxis()
    return _png(fig)


def _png(fig: Any) -> bytes:
    from emajax.eval.plots import _plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def screen_png(screen: dict) -> bytes | None:
    """Histograms of the customer's screening scores (persona projection, Interleaving++ score) with the
    flag threshold calibrated on the safe pool."""
    panels = [(k, label, screen[k]) for k, label in (("persona", "evil-persona projection"),
                                                     ("gap", "Interleaving++ score (low = misaligned-like)"))
              if screen.get(k)]
    if not panels:
        return None
    from emajax.eval.plots import _plt

    fig, axes = _plt().subplots(1, len(panels), figsize=(5 * len(panels), 3), squeeze=False)
    for ax, (_, label, s) in zip(axes[0], panels):
        ax.hist([v for v in s["values"] if v == v], bins=30, color="C0")
        ax.axvline(s["threshold"], color="C3", linestyle="--", label=f"flag threshold (pool q{s['quantile']})")
        ax.set_xlabel(label)
        ax.set_ylabel("answers")
        ax.legend(fontsize=8)
    return _png(fig)


def _md(decision: dict, screen: dict, gate: dict | None, train: dict | None, policy_yaml: str, shown: int,
        flagged: list[dict], rules: dict, on_inconclusive: str) -> str:
    from emajax.guard.metrics import METRICS

    L = [f"# Guard decision: **{decision['decision'].upper()}** — job `{decision['job']}`", ""]
    L += ["## Reasons", ""] + [f"- `{r['source']}` ({r['outcome']}): {r['figure']}" for r in decision["reasons"]] + [""]
    L += ["## Screening", "",
          f"{screen['n_lines']} rows, {screen['n_valid']} well-formed, {screen['n_unique']} unique; "
          f"{len(screen['format_errors'])} format errors, duplicate share {screen['duplicate_share']:.1%}, "
          f"refusal share {screen['refusal_share']:.1%}."]
    for key, label in (("persona", "evil-persona projection"), ("gap", "Interleaving++ perplexity gap")):
        s = screen.get(key)
        L.append(f"- {label}: " + ("not configured" if s is None else
                                   f"{s['flagged_share']:.1%} flagged (threshold {s['threshold']:+.4f} = the safe "
                                   f"pool's q{s['quantile']}; mean {s['mean']:+.4f} vs pool {s['pool_mean']:+.4f})"))
    if flagged:
        L += ["", f"Flagged examples (first {min(shown, len(flagged))} of {len(flagged)}, all in screen/flagged.jsonl):",
              "", "| line | why | answer (start) |", "|---|---|---|"]
        for f in flagged[:shown]:
            ans = (f.get("messages") or [{}])[-1].get("content", "")[:80].replace("|", "\\|").replace("\n", " ")
            L.append(f"| {f['line']} | {'; '.join(f['why']).replace('|', '/')} | {ans} |")
    if train:
        L += ["", "## Training", "", f"Safety net: {train['safety_net']}. Seeds: {train['seeds']}. "
              f"Control: the base model's own sampled answers to the same prompts, same recipe, no defense.", ""]
        L += [f"- {k}: {v:.1f} s" for k, v in train["wall_s"].items()]
    if gate:
        L += ["", "## Gate (job − control, pooled over seeds × items)", "", f"CI: {gate['method']}.", "",
              "| metric | kind | effect [95 % CI] | margin | required | outcome | base | job | control |",
              "|---|---|---|---|---|---|---|---|---|"]
        outcome = {m["metric"]: m for m in decision["metrics"]}
        for m in gate["metrics"]:
            o = outcome.get(m["name"], {})
            fmt = lambda xs: ", ".join(f"{x:+.4f}" for x in xs) if xs else ""  # noqa: E731
            L.append(f"| {m['name']} | {m['kind']} | {_effect_str(m.get('effect'))} | {m['margin']:+.4f} | "
                     f"{m['required']} | {o.get('outcome', '')} | {fmt([m['base']] if 'base' in m else [])} | "
                     f"{fmt(m.get('job'))} | {fmt(m.get('control'))} |")
        L += [""] + [f"- {m['name']}: {m['what']}" + (f" — not measured: {m['not_measured']}"
                                                      if m.get("not_measured") else "") for m in gate["metrics"]]
    L += ["", "## The decision rule", "", "In effect (defaults filled in): " + "; ".join(
        f"{n} ({METRICS[n].kind if n in METRICS else '?'}, margin {r.margin:+.4f}, "
        f"{'required' if r.required else 'optional'})" for n, r in rules.items()) +
          f"; gate.on_inconclusive = {on_inconclusive}.", "", "The policy as written:", "",
          "```yaml", policy_yaml.rstrip(), "```", "",
          "em metrics pass when the effect's upper 95 % bound <= margin and fail when the lower bound > margin; "
          "learning metrics pass when the lower bound > margin and fail when the upper bound <= margin; anything "
          "else is inconclusive. A failing required metric rejects; all required passing releases; otherwise "
          "gate.on_inconclusive decides.", "", "## Provenance", ""]
    L += [f"- {k}: `{v}`" for k, v in decision["provenance"].items()]
    return "\n".join(L) + "\n"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _html(md_text: str, plots: dict[str, bytes | None]) -> str:
    """A self-contained page: the report's text (tables rendered) and the plot inlined."""
    out, table = [], []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|-")]
            head, body = cells[0], cells[1:]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) +
                       "</table>")
            table.clear()

    in_code = False
    for line in md_text.splitlines():
        if line.startswith("```"):
            flush()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
            section = line[3:].split(" ")[0].lower()
            if plots.get(section) is not None:
                out.append(_img(plots[section], section))
        elif line.startswith("# "):
            out.append(f"<h1>{html.escape(line[2:]).replace('**', '')}</h1>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}pre{background:#f4f4f4;padding:8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>emajax guard</title><style>{style}</style>"
            f"</head><body>{chr(10).join(out)}</body></html>\n")


def write_decision(spec: Any, out: Path, d: dict, screen: dict, gate: dict | None) -> dict:
    """Write release/ (if released), report.md, report.html, then decision.json; returns its content."""
    import emajax
    from emajax.guard.spec import policy_text

    train_path = out / "train" / "train.json"
    train = json.loads(train_path.read_text()) if train_path.is_file() else None
    seed0 = spec.policy.seeds[0]
    adapter = out / "train" / f"seed_{seed0}" / "job" / "export"
    config = out / "train" / f"seed_{seed0}" / "job" / "config.yaml"
    prov = {"data_sha256": sha256_file(spec.data),
            "config_sha256": sha256_file(config) if config.is_file() else None,
            "policy_sha256": spec.policy.sha256,
            "adapter_sha256": sha256_dir(adapter) if adapter.is_dir() else None,
            "adapter": str(adapter) if adapter.is_dir() else None,
            "emajax_version": emajax.__version__, "git_commit": git_commit(),
            "model": spec.model, "data": spec.data, "policy": spec.policy.name}
    decision = {"job": spec.id, **d, "provenance": prov}
    release = out / "release"
    if decision["decision"] == "release":
        with atomic.atomic_dir(release) as tmp:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
        decision["release"] = str(release)
    elif release.exists():  # a stale release from an earlier decision of this directory must not survive
        shutil.rmtree(release)
    flagged = atomic.read_jsonl(out / "screen" / "flagged.jsonl") if (out / "screen" / "flagged.jsonl").is_file() else []
    md = _md(decision, screen, gate, train, policy_text(spec.policy), spec.policy.screen.show, flagged,
             spec.policy.gate.metrics, spec.policy.gate.on_inconclusive)
    atomic.write_text(out / "report.md", md)
    plots = {"screening": screen_png(screen), "gate": effects_png(gate["metrics"]) if gate else None}
    atomic.write_text(out / "report.html", _html(md, plots))
    atomic.write_json(out / "decision.json", decision)
    return decision


__all__ = ["effects_png", "screen_png", "git_commit", "sha256_dir", "sha256_file", "write_decision"]
