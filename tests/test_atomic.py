"""emajax.atomic: whole-or-nothing writes (fsynced file and directory), path first, and the one place that
renames files into place."""

import json
import re
from pathlib import Path

import pytest

from emajax import atomic

REPO = Path(__file__).resolve().parents[1]


def test_writers_round_trip_path_first(tmp_path):
    assert atomic.write_json(tmp_path / "a" / "x.json", {"k": [1, "é"]}) == tmp_path / "a" / "x.json"
    assert json.loads((tmp_path / "a" / "x.json").read_text(encoding="utf-8")) == {"k": [1, "é"]}
    atomic.write_jsonl(tmp_path / "r.jsonl", ({"i": i} for i in range(3)))
    assert atomic.read_jsonl(tmp_path / "r.jsonl") == [{"i": 0}, {"i": 1}, {"i": 2}]
    atomic.write_yaml(tmp_path / "c.yaml", {"lora": {"rank": 4, "targets": ["q"]}})
    assert (tmp_path / "c.yaml").read_text() == "lora:\n  rank: 4\n  targets:\n  - q\n"
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "c.yaml", "r.jsonl"]  # no temp files


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic.write_text(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_open(path, "a"):
            pass


def test_file_and_directory_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced: list[tuple[str, bool]] = []
    real = atomic._fsync_path
    monkeypatch.setattr(atomic, "_fsync_path", lambda p: (synced.append((str(p), (tmp_path / "x.txt").exists())),
                                                          real(p)))
    atomic.write_text(tmp_path / "x.txt", "data")
    (tmp_name, before), (dir_name, after) = synced
    assert Path(tmp_name).parent == tmp_path and Path(tmp_name).name.startswith(".x.txt.") and not before
    assert dir_name == str(tmp_path) and after


def test_atomic_dir_replaces_or_yields(tmp_path):
    out = tmp_path / "model"
    with atomic.atomic_dir(out) as d:
        (d / "a").write_text("1")
    with atomic.atomic_dir(out) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with atomic.atomic_dir(out, replace=False) as d:  # an existing result wins
        (d / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(tmp_path / "never") as d:
            (d / "x").write_text("x")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_keep_jsonl_rows_and_checked_reads(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert atomic.keep_jsonl_rows(log, lambda r: True) == [] and log.read_text() == ""
    atomic.write_jsonl(log, [{"step": s} for s in range(1, 6)])
    assert atomic.keep_jsonl_rows(log, lambda r: r["step"] <= 3) == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert atomic.read_jsonl(log) == [{"step": 1}, {"step": 2}, {"step": 3}]
    log.write_text('{"step": 1}\n{bad\n')

    class Bad(ValueError):
        pass

    with pytest.raises(Bad, match=r"metrics.jsonl:2: invalid JSON"):
        atomic.read_jsonl(log, Bad)
    with pytest.raises(Bad, match="file not found; run it first"):
        atomic.read_json(tmp_path / "none.json", Bad, "; run it first")


def test_jsonl_rows_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"a": \n')
    rows = atomic.jsonl_rows(path)
    assert next(rows) == (1, {"a": 1}) and next(rows) == (3, [2])
    with pytest.raises(ValueError, match=r"d\.jsonl:4: invalid JSON \(.* at column"):
        next(rows)
    with pytest.raises(KeyError, match="nope.jsonl: file not found"):
        list(atomic.jsonl_rows(tmp_path / "nope.jsonl", KeyError))
    assert list(atomic.jsonl_rows(tmp_path / "nope.jsonl", missing_ok=True)) == []


def test_no_other_module_renames_files_into_place():
    """One atomic-write module: a new os.replace/os.rename elsewhere is a second implementation."""
    offenders = []
    for root in ("emajax", "bench"):
        for p in (REPO / root).rglob("*.py"):
            if p == REPO / "emajax" / "atomic.py":
                continue
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\bos\.(replace|rename)\(|\.rename\(|\.replace\(.*\.tmp", line):
                    offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "write through emajax.atomic instead:\n" + "\n".join(offenders)
