"""Where derived model files (trained zoo weights) are cached between runs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """`$ENGINEKIT_CACHE`, else `$XDG_CACHE_HOME/enginekit`, else `~/.cache/enginekit`."""
    if explicit := os.environ.get("ENGINEKIT_CACHE"):
        path = Path(explicit)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "enginekit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_or_train(path: Path, load: Callable[[Path], None], train: Callable[[], None], save: Callable[[Path], None],
                  unusable: tuple[type[BaseException], ...], what: str) -> None:
    """Weights trained here and cached at `path`: load them, or (absent, or unusable: one of the
    `unusable` errors) train, then save atomically so an interrupted run leaves no half file."""
    import warnings

    from enginekit.core.artifacts import atomic_write

    if path.is_file():
        try:
            load(path)
            return
        except unusable as exc:
            warnings.warn(f"cached {what} weights are unusable ({exc}); training again", stacklevel=3)
    train()
    atomic_write(path, save)
