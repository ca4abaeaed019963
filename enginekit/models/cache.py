"""Where derived model files (trained zoo weights) are cached between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$ENGINEKIT_CACHE`, else `$XDG_CACHE_HOME/enginekit`, else `~/.cache/enginekit`."""
    if explicit := os.environ.get("ENGINEKIT_CACHE"):
        path = Path(explicit)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enginekit"
    path.mkdir(parents=True, exist_ok=True)
    return path
