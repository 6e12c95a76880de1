"""Resumable output of ``emajax score``: a manifest plus one file per finished shard, written atomically.

A shard file appears only once complete (temp file + ``os.replace``), so after a kill every shard file
on disk is whole and a restart recomputes exactly the missing ones. The manifest records every setting
that changes the numbers (models, pool hash, plan hash, epsilon, ...); a restart with different settings
is refused instead of silently mixing two runs in one directory.

Columns: ``index`` (line in the pool), ``nll_aligned``, ``nll_misaligned`` (list, one per model, in
manifest order), ``n_tokens`` (answer tokens scored), ``score``. Parquet by default, JSONL optionally.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from emajax import atomic

MANIFEST = "manifest.json"
COLUMNS = ("index", "nll_aligned", "nll_misaligned", "n_tokens", "score")
FORMATS = ("parquet", "jsonl")


class ShardError(ValueError):
    """An output directory that cannot be resumed (different settings) or a corrupt shard."""


def shard_path(out_dir: Path, shard_id: int, fmt: str) -> Path:
    return Path(out_dir) / f"shard-{shard_id:05d}.{fmt}"


def _jsonable(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def write_shard(path: Path, columns: dict[str, Sequence[Any]]) -> None:
    """Write one shard (rows sorted by index) atomically, as parquet or JSONL by the file suffix."""
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise ShardError(f"{path}: missing columns {missing}")
    n = len(columns["index"])
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({
            "index": pa.array(np.asarray(columns["index"], np.int64)),
            "nll_aligned": pa.array(np.asarray(columns["nll_aligned"], np.float64)),
            "nll_misaligned": pa.array([list(map(float, r)) for r in columns["nll_misaligned"]],
                                       pa.list_(pa.float64())),
            "n_tokens": pa.array(np.asarray(columns["n_tokens"], np.int64)),
            "score": pa.array(np.asarray(columns["score"], np.float64)),
        })
        with atomic.atomic_open(path, "wb") as f:
            pq.write_table(table, f)
    elif path.suffix == ".jsonl":
        atomic.write_jsonl(path, ({
            "index": int(columns["index"][i]),
            "nll_aligned": _jsonable(float(columns["nll_aligned"][i])),
            "nll_misaligned": [_jsonable(float(v)) for v in columns["nll_misaligned"][i]],
            "n_tokens": int(columns["n_tokens"][i]),
            "score": _jsonable(float(columns["score"][i])),
        } for i in range(n)))
    else:
        raise ShardError(f"{path}: unknown shard format (use .parquet or .jsonl)")


def read_shard(path: Path) -> dict[str, list]:
    """Columns of one shard as Python lists (NaN for missing NLLs)."""
    path = Path(path)
    nan = float("nan")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(path)
        except Exception as e:
            raise ShardError(f"{path}: unreadable parquet shard ({e})") from None
        cols = {c: t.column(c).to_pylist() for c in COLUMNS if c in t.column_names}
    else:
        cols = {c: [] for c in COLUMNS}
        for lineno, row in atomic.jsonl_rows(path, ShardError):
            for c in COLUMNS:
                if not isinstance(row, dict) or c not in row:
                    raise ShardError(f"{path}:{lineno}: field {c!r} is missing")
                cols[c].append(row[c])
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise ShardError(f"{path}: missing columns {missing}")
    fix = lambda v: nan if v is None else float(v)
    cols["nll_aligned"] = [fix(v) for v in cols["nll_aligned"]]
    cols["score"] = [fix(v) for v in cols["score"]]
    cols["nll_misaligned"] = [[fix(v) for v in r] for r in cols["nll_misaligned"]]
    return cols


# Manifest fields that must match for a directory to be resumed.
RESUME_KEYS = ("aligned", "misaligned", "pool", "pool_sha256", "n_examples", "max_len", "shard_size", "plan_sha256",
               "epsilon", "leave_out", "dtype", "param_dtype", "format")


def check_or_write_manifest(out_dir: Path, manifest: dict[str, Any], *, overwrite: bool = False) -> bool:
    """Write the manifest of a new run, or verify a previous one matches. Returns True when resuming."""
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST
    if path.is_file() and not overwrite:
        old = atomic.read_json(path, ShardError)
        for k in RESUME_KEYS:
            if old.get(k) != manifest.get(k):
                raise ShardError(f"{path}: field {k!r} is {old.get(k)!r} in the existing run but {manifest.get(k)!r} "
                                 f"now; use a new --out directory or --overwrite")
        return True
    if overwrite and out_dir.is_dir():
        for p in out_dir.glob("shard-*.*"):
            p.unlink()
    atomic.write_json(path, manifest)
    return False


def read_manifest(out_dir: Path) -> dict[str, Any]:
    return atomic.read_json(Path(out_dir) / MANIFEST, ShardError, " (not an `emajax score` output directory)")


def read_scores(out_dir: Path) -> dict[str, list]:
    """All finished shards of an output directory, concatenated and sorted by index."""
    out_dir = Path(out_dir)
    man = read_manifest(out_dir)
    fmt = man.get("format", "parquet")
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    n_missing = 0
    for k in range(int(man["n_shards"])):
        p = shard_path(out_dir, k, fmt)
        if not p.is_file():
            n_missing += 1
            continue
        part = read_shard(p)
        for c in COLUMNS:
            cols[c].extend(part[c])
    if n_missing:
        raise ShardError(f"{out_dir}: {n_missing} of {man['n_shards']} shards are missing; rerun `emajax score` "
                         f"with the same arguments to finish")
    order = np.argsort(np.asarray(cols["index"], np.int64), kind="stable")
    return {c: [cols[c][i] for i in order] for c in COLUMNS}
