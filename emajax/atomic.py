"""Atomic file writes: a reader (or a resumed job) sees the old file or the whole new one, never half;
and the checked JSON / JSONL readers (errors name the file and line).

Every result, config, shard, checkpoint export and plot emajax writes goes through here: write to a temp
file (or directory) beside the target, fsync it, ``os.replace`` it onto the target (atomic on POSIX),
then fsync the directory so the rename itself survives a crash; the temp is removed on error. Every
function takes the target path first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator


def _fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or directory by path (its data, or for a directory its entries)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):  # files before the directories that hold them
        if not p.is_symlink():
            _fsync_path(p)
    _fsync_path(root)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path`` for any writer (savefig, safetensors, ...); it is fsynced and
    replaces ``path`` when the block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
    """``open`` for writing ("w" or "wb") whose result appears at ``path`` only once complete."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; on success it is fsynced and renamed into place in one step.

    An existing ``path`` is swapped out and deleted (``replace=True``), or wins and the temp directory
    is discarded (``replace=False``: a concurrent writer of the same content got there first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in (tmp, *tmp.rglob("*")):  # mkdtemp and some writers create owner-only modes
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        _fsync_tree(tmp)
        if path.exists():
            if not replace:
                return
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if not (path.exists() and not replace):
                    raise
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    with atomic_open(path) as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    import yaml

    with atomic_open(path) as f:
        yaml.safe_dump(obj, f, sort_keys=False)
    return Path(path)


def jsonl_rows(path: str | os.PathLike, error: type[Exception] = ValueError, *,
               missing_ok: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file. A missing file (unless
    ``missing_ok``: then nothing) or a line that is not JSON raises ``error`` naming the file and line;
    callers check the values' fields and name the line in their own errors the same way. ``path`` may also
    be a path object that opens itself (``etils.epath``: a remote run's metrics)."""
    path = path if hasattr(path, "open") and hasattr(path, "is_file") else Path(path)
    if not path.is_file():
        if missing_ok:
            return
        raise error(f"{path}: file not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError) -> list[Any]:
    """The values of a JSONL file ([] when it does not exist yet), checked as :func:`jsonl_rows` does."""
    return [v for _, v in jsonl_rows(path, error, missing_ok=True)]


def keep_jsonl_rows(path: str | os.PathLike, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrite the JSONL log at ``path`` with only the rows ``keep`` accepts and return them.

    For logs that a job appends to and that must match its state when it resumes (rows past the restored
    step are dropped before appending again)."""
    rows = [r for r in read_jsonl(path) if keep(r)]
    write_jsonl(path, rows)
    return rows


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
