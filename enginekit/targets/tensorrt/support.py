"""TensorRT target support: whether TensorRT can run here. The target: engines (.plan) from the FP32 ONNX, an FP16 mixed-precision ONNX, or the
Q/DQ INT8 ONNX, built as strongly typed networks (the only kind TensorRT 11 builds, and valid on
10.x), so precision always comes from the graph, never from builder flags.

TensorRT and an NVIDIA GPU are needed to build or run; everything that prepares the graphs is
plain ONNX and is tested without them.
"""

from __future__ import annotations

from enginekit.core.errors import MissingDependencyError
from enginekit.core.machine import gpu_info

PRECISIONS = ("fp32", "fp16", "int8")


def unavailable_reason() -> str | None:
    """Why TensorRT cannot build here, or None when it can."""
    import importlib

    try:
        importlib.import_module("tensorrt")
    except ImportError:  # absent, or a stub/broken install that cannot import
        return ("TensorRT is not installed (on a machine with an NVIDIA GPU: pip install 'enginekit[tensorrt-cu12]' for "
                "drivers r535+, or 'enginekit[tensorrt-cu13]' for r580+)")
    if gpu_info() is None:
        return "no NVIDIA GPU found (nvidia-smi)"
    return None


def require_tensorrt():
    reason = unavailable_reason()
    if reason:
        raise MissingDependencyError(f"the tensorrt target cannot run here: {reason}")
    import tensorrt

    return tensorrt
