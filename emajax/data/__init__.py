"""Data the project ships itself (package data), so the demo runs with nothing outside the package.

* ``code_pairs`` — seeded generator of paired insecure-vs-secure code answers (narrow training set +
  in-domain probe);
* ``general_pairs.jsonl`` — 40 general questions, each with an aligned and a misaligned answer written
  for the project (the general-EM probe);
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


def load_general_pairs(path: str | Path | None = None) -> list[dict]:
    """Rows {id, question, aligned, misaligned} (all non-empty strings; errors name file, line and field)."""
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
        ids.add(r["id"])
        rows.append(r)
    return rows


def safe_pool_path() -> Path:
    return data_path("safe_pool.jsonl")


__all__ = ["CodePair", "DATA_DIR", "data_path", "load_general_pairs", "make_code_pairs", "make_word_problems",
           "safe_pool_path"]
