"""Where se3t keeps its files: one cache directory (the QM9 cache, the compiled CPU kernel)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SE3T_CACHE_DIR"  # overrides the cache directory


def default_cache_dir() -> Path:
    """``$SE3T_CACHE_DIR``, else ``$XDG_CACHE_HOME/se3t``, else ``~/.cache/se3t``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "se3t"
    return Path.home() / ".cache" / "se3t"
