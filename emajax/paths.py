"""Where emajax keeps converted models and other caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$EMAJAX_CACHE``, else ``$XDG_CACHE_HOME/emajax``, else ``~/.cache/emajax``."""
    env = os.environ.get("EMAJAX_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emajax"
