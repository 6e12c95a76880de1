"""Atomic file writes: a reader (or a resumed job) sees the old file or the whole new one, never half;
and the one checked JSON reader.

Every result, config, shard and plot emajax writes goes through here: write to a temp file in the
target's directory, fsync, then ``os.replace`` (atomic on POSIX); the temp file is removed on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """``open`` for writing whose result appears at ``path`` only once complete (and fsynced)."""
    with atomic_path(path) as tmp:
        enc = None if "b" in mode else "utf-8"
        with open(tmp, mode, encoding=enc) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike, error: type[Exception], missing: str = "") -> Any:
    """The JSON in ``path``; a missing file or bad JSON raises ``error`` naming the file (and line).
    ``missing`` is appended to the file-not-found message (e.g. what the file should have been)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found{missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
