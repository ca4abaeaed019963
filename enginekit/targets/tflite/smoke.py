"""Run a fresh flatbuffer once in a child process before this process runs it.

LiteRT aborts the whole process (SIGABRT from a kernel's check) on some int8 graphs instead of
returning an error; inside a multi-target build that would end every other cell and print
nothing. The child runs the model on a few calibration samples; if it dies by a signal, the cell
fails with one line instead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from enginekit.core.errors import InputError
from enginekit.core.tensors import Feeds

_CHILD = """
import sys
from enginekit.core.loaders import check_tflite, load_arrays
from enginekit.targets.tflite.runner import TfliteRunner
TfliteRunner(check_tflite(sys.argv[1]), threads=1).infer(load_arrays(sys.argv[2]))
"""
SMOKE_TIMEOUT = 300.0


def smoke_run(model: bytes, feeds: Feeds, folder: Path, what: str) -> None:
    """Raise an InputError naming the signal if LiteRT kills a process running `model` on `feeds`."""
    model_path, feeds_path = folder / ".smoke.tflite", folder / ".smoke.npz"
    model_path.write_bytes(model)
    np.savez(feeds_path, **{name: np.asarray(value) for name, value in feeds.items()})
    try:
        child = subprocess.run([sys.executable, "-c", _CHILD, str(model_path), str(feeds_path)],
                               capture_output=True, text=True, timeout=SMOKE_TIMEOUT)
    finally:
        model_path.unlink(missing_ok=True)
        feeds_path.unlink(missing_ok=True)
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        raise InputError(f"LiteRT crashed ({name}) running the {what} flatbuffer; the graph converts but one of its "
                         "kernels aborts at run time")
