"""Data the project ships itself (package data), so the demo runs with nothing outside the package.

* ``code_pairs`` — seeded generator of paired insecure-vs-secure code answers (narrow training set +
  in-domain probe);
* ``general_pairs.jsonl`` — general questions, each with an aligned and a misaligned answer written for
  the project (the general-EM probe), split into 40 ``dev`` (the dose study's: tuning may look at them) and
  200 ``heldout`` (the demo's reported figures; never used to choose anything; the last 104 added for
  power before the preregistered study, docs/prereg/demo_primary.md);
* ``safe_pool.jsonl`` — 48 benign chats (the pool for interleaving and Interleaving++);
* ``word_problems`` — seeded arithmetic word problems with worked answers (benign reference text).
"""

from __future__ import annotations

from pathlib import Path

from emajax import atomic
from emajax.data.code_pairs import CodePair, make_code_pairs
from emajax.data.word_problems import make_word_problems

DATA_DIR = Path(__file__).resolve().parent


def data_path(name: str) -> Path:
    """Path of a shipped data file (FileNotFoundError naming it when the package lacks it)."""
    p = DATA_DIR / name
    if not p.is_file():
        raise FileNotFoundError(f"{p}: shipped data file not found (broken install?)")
    return p


GENERAL_SPLITS = ("dev", "heldout")


def load_general_pairs(path: str | Path | None = None, *, split: str | None = None) -> list[dict]:
    """Rows {id, question, aligned, misaligned[, split]} (non-empty strings; errors name file, line and field).

    ``split`` ('dev' or 'heldout') keeps that part only; every row then needs a ``split`` field."""
    if split is not None and split not in GENERAL_SPLITS:
        raise ValueError(f"general pairs split must be one of {GENERAL_SPLITS}, got {split!r}")
    path = Path(path) if path is not None else data_path("general_pairs.jsonl")
    rows, ids = [], set()
    for i, r in atomic.jsonl_rows(path):
        if not isinstance(r, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object")
        for field in ("id", "question", "aligned", "misaligned"):
            if not isinstance(r.get(field), str) or not r[field].strip():
                raise ValueError(f"{path}:{i}: field {field!r} must be a non-empty string")
        if r["id"] in ids:
            raise ValueError(f"{path}:{i}: field 'id' = {r['id']!r} is duplicated")
        if "split" in r and r["split"] not in GENERAL_SPLITS:
            raise ValueError(f"{path}:{i}: field 'split' must be one of {GENERAL_SPLITS}, got {r['split']!r}")
        if split is not None and "split" not in r:
            raise ValueError(f"{path}:{i}: field 'split' is missing (needed to select the {split!r} part)")
        ids.add(r["id"])
        if split is None or r["split"] == split:
            rows.append(r)
    if not rows:
        raise ValueError(f"{path}: no general pairs" + (f" in split {split!r}" if split else ""))
    return rows


def safe_pool_path() -> Path:
    return data_path("safe_pool.jsonl")


__all__ = ["CodePair", "DATA_DIR", "GENERAL_SPLITS", "data_path", "load_general_pairs", "make_code_pairs", "make_word_problems",
           "safe_pool_path"]
