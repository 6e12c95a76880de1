"""``emajax report`` from synthetic run directories: the table's rows and columns, deltas, valid PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from emajax.eval.probes import NllSet, PairedSet, ProbeSuite, summarize_items
from emajax.eval.report import ReportError, load_run, write_report
from emajax.eval.stats import summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_GEN, N_DOM, N_BEN = 6, 4, 3


def _suite() -> ProbeSuite:
    p = lambda name, n: PairedSet(name, tuple(f"{name}{i}" for i in range(n)),  # noqa: E731
                                  tuple(({"role": "user", "content": "q"},) for _ in range(n)), ("a",) * n, ("m",) * n)
    return ProbeSuite((p("general", N_GEN), p("in_domain", N_DOM)),
                      (NllSet("benign", tuple(map(str, range(N_BEN))), (({"role": "user", "content": "q"},),) * N_BEN),
                       ))


def _probes(shift: float, seed: int) -> dict:
    """Probe results through the real summariser: misaligned answers get ``shift`` nats more likely."""
    s = _suite()
    keys = [(ps.name, role, i) for ps in s.pairs for i in range(len(ps.ids)) for role in ("aligned", "misaligned")]
    keys += [("benign", "answer", i) for i in range(N_BEN)]
    rng = np.random.default_rng(seed)
    nll = np.array([2.0 + 0.1 * rng.standard_normal() - (shift if k[1] == "misaligned" else 0.0) for k in keys])
    return summarize_items(s, keys, nll, n_boot=200)


def _write(d: Path, name: str, obj) -> None:
    d.mkdir(parents=True, exist_ok=True)
    if name.endswith(".jsonl"):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in obj))
    else:
        (d / name).write_text(json.dumps(obj))


def _em(rate: float) -> dict:
    vals = [1.0] * int(rate * 100) + [0.0] * (100 - int(rate * 100))
    return {"kind": "em", "misaligned_rate": summarize(vals, n_boot=200), "incoherent_rate": summarize([0.0] * 100)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    base, none, kl = root / "base", root / "none", root / "kl"
    _write(base, "probes.json", {**_probes(0.0, 0), "kind": "probes"})
    _write(base, "method.json", {"method": "base", "label": "Base model"})
    _write(none, "probes.json", _probes(0.3, 0))
    _write(none, "method.json", {"method": "none", "label": "No defense"})
    _write(none, "metrics.jsonl", [{"step": s, "loss": 2.0 - 0.1 * s, "ce": 2.0 - 0.1 * s, "lr": 1e-4,
                                    "grad_norm": 1.0} for s in range(1, 5)])
    _write(none, "monitor.jsonl", [{"step": s, "probe/general/margin": 0.05 * s} for s in (0, 2, 4)])
    _write(none / "eval", "em_general.json", _em(0.2))
    _write(none / "eval", "em_code.json", _em(0.6))
    _write(none, "opswap.json", {"task": "opswap", "accuracy": summarize([1.0, 0.0, 1.0, 1.0], n_boot=200)})
    _write(kl, "probes.json", _probes(0.1, 0))
    _write(kl, "metrics.jsonl", [{"step": s, "loss": 2.1 - 0.1 * s, "ce": 2.0 - 0.1 * s, "kl": 0.01 * s}
                                 for s in range(1, 5)])
    return {"base": base, "none": none, "kl": kl, "root": root}


def _table_rows(md: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| Method | General misaligned"))
    rows = []
    for l in lines[start:]:
        if not l.startswith("|"):
            break
        rows.append([c.strip() for c in l.strip("|").split("|")])
    return rows


def test_report_table_rows_columns_and_plots(runs, tmp_path):
    out = tmp_path / "rep"
    path = write_report([runs["base"], runs["none"], runs["kl"]], out)
    md = path.read_text()
    rows = _table_rows(md)
    assert rows[0] == ["Method", "General misaligned ↓", "General incoherent ↓", "In-domain misaligned ↑",
                       "Benign score ↑", "General margin ↓", "In-domain margin ↑", "Narrow NLL ↓", "Benign NLL ↓"]
    body = {r[0]: r[1:] for r in rows[2:]}
    assert list(body) == ["Base model", "No defense", "kl"]  # label from method.json, else the directory name
    assert body["No defense"][0].startswith("20.0% [") and body["No defense"][2].startswith("60.0% [")
    assert body["No defense"][3].startswith("75.0% [")
    assert body["Base model"][:4] == ["—"] * 4 and body["kl"][:4] == ["—"] * 4  # no judge results: never guessed
    none_margin = json.loads((runs["none"] / "probes.json").read_text())["pairs"]["general"]["margin"]["value"]
    assert body["No defense"][4].startswith(f"{none_margin:.3f} [")
    assert none_margin == pytest.approx(0.3, abs=0.1)
    # paired deltas vs base and vs no defense
    assert "## Probe changes on the same items" in md
    delta = md.split("## Probe changes on the same items")[1].split("##")[0]
    kl_row = next(l for l in delta.splitlines() if l.startswith("| kl |"))
    # same noise (seed) in every run: kl's general margin is exactly +0.1 over base, -0.2 vs no defense
    assert kl_row.split("|")[2].strip() == "+0.100 [+0.100, +0.100]"
    assert kl_row.split("|")[3].strip() == "-0.200 [-0.200, -0.200]"
    assert "| kl | 4 | 1.7000 | 1.6000 | 0.0400 | — |" in md  # training table: final loss terms, no timings
    for name in ("methods.png", "training.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
        assert f"]({name})" in md
    assert not list(out.glob(".*"))  # atomic writes left no temp files


def test_report_cli_and_errors(runs, tmp_path, capsys):
    from emajax.cli import main

    out = tmp_path / "cli"
    assert main(["report", str(runs["base"]), str(runs["none"]), "--out", str(out), "--title", "T"]) == 0
    assert (out / "report.md").read_text().startswith("# T")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no results files"):
        load_run(empty)
    assert main(["report", str(empty), "--out", str(out)]) == 2
    assert "no results files" in capsys.readouterr().err
    bad = tmp_path / "bad"
    _write(bad, "probes.json", {"kind": "probes", "pairs": {}})
    with pytest.raises(ReportError, match=r"probes\.json: field 'nll'"):
        load_run(bad)
