"""TensorRT target: engines (.plan) from the FP32 ONNX, an FP16 mixed-precision ONNX, or the
Q/DQ INT8 ONNX, built as strongly typed networks (the only kind TensorRT 11 builds, and valid on
10.x), so precision always comes from the graph, never from builder flags.

TensorRT and an NVIDIA GPU are needed to build or run; everything that prepares the graphs is
plain ONNX and is tested without them.
"""

from enginekit.targets.tensorrt.support import PRECISIONS, require_tensorrt, unavailable_reason
from enginekit.targets.tensorrt.target import TARGET, TensorRTTarget

__all__ = ["PRECISIONS", "TARGET", "TensorRTTarget", "require_tensorrt", "unavailable_reason"]
