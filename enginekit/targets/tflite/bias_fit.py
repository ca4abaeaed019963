"""Weight ranges that keep every int32 bias of an int8 flatbuffer representable.

LiteRT stores a CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED / TRANSPOSE_CONV bias as int32 at
input scale x weight scale (per output channel). Two kinds of layer push bias / (that product)
past int32, and ai-edge-quantizer then casts it to -2^31, which flips the bias's sign:
- a dead channel (weights ~0 after batch-norm folding: efficientnet_lite0 has dozens), whose
  weight scale is ~1e-11;
- a layer whose input is tiny next to its bias: a squeeze-excitation gate's Conv reads a ReLU of
  ~1e-5 and adds hard-sigmoid's +3 (Keras MobileNetV3 with fresh weights: every gate read -2^31 and
  the INT8 output was a constant, cosine 0.0 to FP32).
Such a channel gets the weight scale its bias needs, |bias| / (input scale x limit), passed to
ai-edge-quantizer as the weight's per-channel min/max; its weights re-round to that coarser grid.
Its other channels keep max |w| / 127, the scale ai-edge-quantizer would have chosen.

The limit is int32's, less what the kernel adds to the bias in the same accumulator: the products
(up to K x 255 x 127 for K weights per channel) and the input zero point's term (K x 128 x 127).
Not the hub's 2^24 (quantization/qdq.py, for ONNX Runtime's kernels): LiteRT adds in int32, and
a live channel whose bias fits there needs no coarser weights.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from enginekit.quantization.qdq import BIAS_HEADROOM

INT32_LIMIT = 2**31 - 1
PRODUCT_BOUND = 127 * (255 + 128)  # per weight: |(x - zp) w| and |zp w|, summed in the same accumulator

# op -> (input, weight, bias) operand positions and the weight axis of the output channels
# (ai-edge-quantizer's TFL_OP_TO_WEIGHT_QUANTIZED_DIM)
BIASED_OPS = {"CONV_2D": (0, 1, 2, 0), "DEPTHWISE_CONV_2D": (0, 1, 2, 3), "FULLY_CONNECTED": (0, 1, 2, 0),
              "TRANSPOSE_CONV": (2, 1, 3, 0)}
INT8_LEVELS = 255


def input_scale(low: float, high: float) -> float:
    """The asymmetric int8 step ai-edge-quantizer derives from (low, high): the range widened to
    hold zero, over 255 levels."""
    return (max(high, 0.0) - min(low, 0.0)) / INT8_LEVELS


def bias_safe_weight_ranges(float_model: bytes, ranges: Mapping[str, tuple[float, float]],
                            skip: Collection[str] = ()) -> dict[str, dict[str, np.ndarray]]:
    """Weight tensor name -> {"min", "max"} per channel (shaped as ai-edge-quantizer reduces
    them), only for weights with at least one channel whose bias would not fit; ops writing a
    tensor in `skip` (float or 16x8 ops, whose biases are not int32) are left alone."""
    from enginekit.targets.tflite.runner import undelegated_interpreter

    interpreter = undelegated_interpreter(float_model)
    interpreter.allocate_tensors()
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    bounds: dict[str, np.ndarray] = {}
    for op in interpreter._get_ops_details():
        layout = BIASED_OPS.get(op["op_name"])
        if layout is None or any(names.get(t) in skip for t in op["outputs"]):
            continue
        data, weight, bias, axis = layout
        operands = list(op["inputs"])
        if len(operands) <= bias or min(operands[data], operands[weight], operands[bias]) < 0:
            continue
        activation = names.get(operands[data])
        if activation not in ranges:
            continue
        scale = input_scale(*ranges[activation])
        weights = np.asarray(interpreter.get_tensor(operands[weight]), np.float64)
        biases = np.asarray(interpreter.get_tensor(operands[bias]), np.float64).reshape(-1)
        if scale <= 0 or weights.ndim <= axis or weights.shape[axis] != biases.size:
            continue
        reduce = tuple(d for d in range(weights.ndim) if d != axis)
        largest = np.abs(weights).max(axis=reduce, keepdims=True)
        limit = 0.99 * max(INT32_LIMIT - PRODUCT_BOUND * weights.size // biases.size, BIAS_HEADROOM)  # 0.99: scales round to float32
        needed = (127.0 * np.abs(biases) / (scale * limit)).reshape(largest.shape)
        name = names[operands[weight]]
        if np.any(needed > largest) or name in bounds:
            bounds[name] = np.maximum(np.maximum(largest, needed), bounds.get(name, 0.0))
    return {name: {"min": (-bound).astype(np.float32), "max": bound.astype(np.float32)} for name, bound in bounds.items()}
