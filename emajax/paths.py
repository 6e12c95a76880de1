"""Where emajax keeps converted models and caches, and run locations that may be remote (gs://...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$EMAJAX_CACHE``, else ``$XDG_CACHE_HOME/emajax``, else ``~/.cache/emajax``."""
    env = os.environ.get("EMAJAX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emajax"


# ------------------------------------------------------------------ run locations (local or remote)
def is_remote(path: str | os.PathLike) -> bool:
    """A URL (``gs://``, ``s3://``, ...) rather than a local path."""
    return "://" in os.fspath(path)


def run_path(path: str | os.PathLike) -> Any:
    """A run, checkpoint or export location as an ``etils.epath.Path`` (the path type orbax uses):
    URLs keep their scheme (``gs://bucket/run`` stays remote, never a local directory named ``gs:``),
    local paths become absolute."""
    from etils import epath

    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(Path(os.fspath(path)).expanduser().resolve())


def write_text(path: Any, text: str) -> None:
    """Write a whole file at ``path`` (local or remote) so a reader never sees half of it: locally
    through ``emajax.atomic`` (temp file + rename); an object store publishes an object only once its
    upload completes."""
    from emajax import atomic

    if is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    else:
        atomic.write_text(path, text)


def upload_dir(local_dir: Path, dest: Any, last: tuple[str, ...] = ()) -> None:
    """Copy a finished local directory's files to ``dest`` (remote), the files named in ``last`` after
    all others: a reader that looks for them (``config.json``, ``adapter_config.json``) finds them only
    once the rest is in place."""
    files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        target = dest / p.relative_to(local_dir).as_posix()
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "rb") as src, target.open("wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
