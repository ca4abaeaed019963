"""Silence native start-up chatter on file descriptor 2 (TensorFlow's absl lines are written
before any log level applies), so enginekit's one-line messages stay readable."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Point fd 2 at /dev/null for the block (Python exceptions still propagate normally)."""
    if os.environ.get("ENGINEKIT_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# Third-party loggers whose warnings are internal chatter, not something a user can act on:
# onnxscript logs every constant it could not fold (the node simply stays in the graph).
CHATTY_LOGGERS = ("onnxscript.optimizer._constant_folding", "torch.onnx")
# torch.export logs its own failures at ERROR ("E1204 ... _trace.py:1323] always_classified is unsupported",
# with tracebacks) before raising them; enginekit reports the exception in one line, or exports another way
EXPORT_LOGGERS = ("torch.export", "torch._export", "torch._dynamo", "torch._guards", "torch.fx.experimental.symbolic_shapes")


@contextlib.contextmanager
def quiet_loggers(names: tuple[str, ...] = CHATTY_LOGGERS, level: int = logging.ERROR) -> Iterator[None]:
    """Raise these loggers to `level` for the block, restoring their levels after."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
