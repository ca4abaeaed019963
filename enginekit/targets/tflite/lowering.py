"""ONNX -> TensorFlow function, for the TFLite converter: the PyTorch and ONNX path to TFLite.

Why our own lowering: onnx2tf pins TensorFlow 2.19 / onnx 1.19 / numpy 1.26 and breaks this
stack (and drops Q/DQ ranges), onnx-tf is dead for TF >= 2.16, nobuco fails on Keras 3, and
litert-torch only reads PyTorch (not ONNX files), weighs 3.6 GB and its int8 is not full-integer.
The graphs enginekit exports use a small op set, so each ONNX op becomes one or two TF ops,
and TensorFlow's own (maintained) TFLite converter does the rest.

Layout: image tensors (4-D) are carried channel-last inside, because TFLite's convolutions are
NHWC; the function's inputs and outputs keep the ONNX (NCHW) layout, so the same feeds run on
every target. A node whose op is not lowered here raises an InputError naming the op and node.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.core.errors import InputError, one_line
from enginekit.onnx.nodes import node_inputs
from enginekit.targets.tflite.recurrent import gru, lstm, rnn
from enginekit.targets.tflite.values import Value, attributes as _attrs, require_constant as _constant, tf_module as _tf

TO_NHWC, TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)
NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}  # where an NCHW axis lives in the channel-last tensor


def nchw(value: Value) -> Any:
    return _tf().transpose(value.data, TO_NCHW) if value.nhwc else value.data


def nhwc(value: Value) -> Any:
    if value.nhwc:
        return value.data
    if value.const:
        return np.ascontiguousarray(value.data.transpose(TO_NHWC))
    return _tf().transpose(value.data, TO_NHWC)


# ----------------------------------------------------------------------------- windows, pads


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's SAME padding of one spatial dim: (before, after), the odd pixel after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _window_args(node: onnx.NodeProto, attrs: dict[str, Any], x: Any, kernel: tuple[int, ...]) -> tuple[str, tuple, tuple, list[int] | None]:
    """(TF padding, strides, dilations, explicit pad) of an ONNX window op on NHWC `x`. The
    padding is "VALID", "SAME", or "VALID" after an explicit pad [top, bottom, left, right]
    (ONNX may put the odd pixel where TF's SAME does not)."""
    if len(kernel) != 2:
        raise InputError(f"node {node.name} ({node.op_type}): only 2-D windows are supported by the tflite target")
    if attrs.get("ceil_mode", 0) and node.op_type != "MaxPool":
        raise InputError(f"node {node.name} ({node.op_type}): ceil_mode=1 is not supported by the tflite target")
    strides = tuple(attrs.get("strides", (1, 1)))
    dilations = tuple(attrs.get("dilations", (1, 1)))
    auto_pad = _text(attrs.get("auto_pad", b"NOTSET"))
    if auto_pad == "VALID":
        return "VALID", strides, dilations, None
    spatial = (x.shape[1], x.shape[2])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = [_same_pads(*dim) for dim in zip(spatial, kernel, strides, dilations)]
        pads = pads if auto_pad == "SAME_UPPER" else [(after, before) for before, after in pads]
        pads_onnx = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
    else:
        pads_onnx = list(attrs.get("pads", [0, 0, 0, 0]))
    if not any(pads_onnx):
        return "VALID", strides, dilations, None
    if None not in spatial:
        same = [_same_pads(*dim) for dim in zip(spatial, kernel, strides, dilations)]
        if [same[0][0], same[1][0], same[0][1], same[1][1]] == pads_onnx:
            return "SAME", strides, dilations, None
    top, left, bottom, right = pads_onnx
    return "VALID", strides, dilations, [top, bottom, left, right]


def _pad(x: Any, explicit: list[int] | None, value: float = 0.0) -> Any:
    if explicit is None:
        return x
    top, bottom, left, right = explicit
    return _tf().pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=value)


# ------------------------------------------------------------------------------------- ops


def _conv(node, args, attrs):
    tf = _tf()
    weight = _constant(args[1], node, "the weight")
    if weight.ndim == 3 and not args[0].const and args[0].rank == 3:
        return _conv1d(node, args, attrs)
    if weight.ndim != 4:  # before the layout change, which a 5-D input (Conv3d) would fail inside TensorFlow
        raise InputError(f"node {node.name} (Conv): only 1-D and 2-D convolutions are supported by the tflite target")
    x = nhwc(_with_static_dims(args[0], weight.shape[1] * attrs.get("group", 1)))
    padding, strides, dilations, explicit = _window_args(node, attrs, x, tuple(weight.shape[2:]))
    group = attrs.get("group", 1)
    x = _pad(x, explicit)
    out_channels, in_per_group = weight.shape[:2]
    if group == 1:
        y = tf.nn.conv2d(x, weight.transpose(2, 3, 1, 0), (1, *strides, 1), padding, dilations=(1, *dilations, 1))
    elif in_per_group == 1 and out_channels % group == 0:  # depthwise, channel multiplier out/group
        multiplier = out_channels // group
        kernel = weight.reshape(group, multiplier, *weight.shape[2:]).transpose(2, 3, 0, 1)
        y = tf.nn.depthwise_conv2d(x, kernel, (1, *strides, 1), padding, dilations=dilations)
    elif out_channels % group == 0 and x.shape[-1] == in_per_group * group:
        # grouped (wav2vec2's positional convolution, ResNeXt): one CONV_2D per group on its slice
        # of the channels, concatenated, so each is the plain CONV_2D every TFLite kernel takes
        # (TensorFlow's CPU Conv2D refuses a grouped filter)
        per_group = out_channels // group
        kernels = weight.transpose(2, 3, 1, 0)
        y = tf.concat([tf.nn.conv2d(part, kernels[..., g * per_group:(g + 1) * per_group], (1, *strides, 1), padding, dilations=(1, *dilations, 1))
                       for g, part in enumerate(tf.split(x, group, axis=-1))], axis=-1)
    else:
        raise InputError(f"node {node.name} (Conv): grouped convolution with group={group} is not supported by the tflite target")
    return _biased(y, node, args)


def _conv1d(node, args, attrs):
    """A 1-D convolution ([N, C, L], audio) as a 2-D one over [N, 1, L, C]: TFLite has no 1-D
    kernel of its own (its converter does the same)."""
    tf = _tf()
    as_2d = {**attrs, "kernel_shape": [1, *attrs.get("kernel_shape", args[1].data.shape[2:])],
             "strides": [1, *attrs.get("strides", [1])], "dilations": [1, *attrs.get("dilations", [1])]}
    if "pads" in attrs:
        begin, end = attrs["pads"]
        as_2d["pads"] = [0, begin, 0, end]
    image = Value(tf.expand_dims(tf.transpose(args[0].data, (0, 2, 1)), 1), nhwc=True)
    weight = Value(args[1].data[:, :, None, :])
    (y,) = _conv(node, [image, weight, *args[2:]], as_2d)
    return [Value(tf.transpose(tf.squeeze(y.data, 1), (0, 2, 1)))]


def _biased(y: Any, node: onnx.NodeProto, args: list) -> list[Value]:
    """A convolution's NHWC result plus its optional constant bias (input 2)."""
    if len(args) > 2 and args[2] is not None:
        y = _tf().nn.bias_add(y, _constant(args[2], node, "the bias"))
    return [Value(y, nhwc=True)]


def _pool(node, args, attrs):
    tf = _tf()
    x = nhwc(_with_static_dims(args[0]))
    kernel = tuple(attrs["kernel_shape"])
    padding, strides, dilations, explicit = _window_args(node, attrs, x, kernel)
    if any(d != 1 for d in dilations):
        raise InputError(f"node {node.name} ({node.op_type}): dilated pooling is not supported by the tflite target")
    if node.op_type == "MaxPool":
        if len(node.output) > 1 and node.output[1]:
            raise InputError(f"node {node.name} (MaxPool): the indices output is not supported by the tflite target")
        if attrs.get("ceil_mode", 0):
            explicit = _ceil_mode_pads(node, x, kernel, attrs)
            padding, explicit = ("SAME", None) if _same_windows(x, kernel, strides, explicit) else ("VALID", explicit)
        y = tf.nn.max_pool2d(_pad(x, explicit, -3.4e38), kernel, strides, padding)
    else:
        if explicit is not None or (padding == "SAME" and attrs.get("count_include_pad", 0)):
            raise InputError(f"node {node.name} (AveragePool): this padding is not supported by the tflite target")
        y = tf.nn.avg_pool2d(x, kernel, strides, padding)
    return [Value(y, nhwc=True)]


def _ceil_mode_pads(node, x: Any, kernel: tuple[int, ...], attrs: dict[str, Any]) -> list[int]:
    """Explicit [top, bottom, left, right] pads that make a VALID max pool produce ONNX's
    ceil_mode output size: the partial last window is padded with -inf at the bottom/right (a
    window that would start beyond the input and its left padding is dropped, as ONNX does)."""
    if _text(attrs.get("auto_pad", b"NOTSET")) != "NOTSET" or None in x.shape[1:3]:
        raise InputError(f"node {node.name} (MaxPool): ceil_mode=1 needs explicit pads and static spatial dims for the tflite target")
    top, left, bottom, right = list(attrs.get("pads", [0, 0, 0, 0]))
    strides = list(attrs.get("strides", (1, 1)))
    extra = []
    for size, k, s, before, after in zip(x.shape[1:3], kernel, strides, (top, left), (bottom, right)):
        padded = size + before + after
        out = -(-(padded - k) // s) + 1
        if (out - 1) * s >= size + before:
            out -= 1
        extra.append(max((out - 1) * s + k - padded, 0))
    return [top, bottom + extra[0], left, right + extra[1]]


def _same_windows(x: Any, kernel: tuple[int, ...], strides: list[int], pads: list[int]) -> bool:
    """Whether TF's SAME padding gives the windows of a VALID pool over `pads` ([top, bottom,
    left, right]): then the pool needs no PADV2 of -inf, which XNNPACK does not run, since a SAME
    max pool ignores its padding."""
    for size, k, s, before, after in zip(x.shape[1:3], kernel, strides, pads[0::2], pads[1::2]):
        out_same = -(-size // s)
        if (size + before + after - k) // s + 1 != out_same or max((out_same - 1) * s + k - size, 0) // 2 != before:
            return False
    return True


def _global_pool(node, args, attrs):
    tf = _tf()
    reduce = tf.reduce_mean if node.op_type == "GlobalAveragePool" else tf.reduce_max
    if args[0].rank != 4:  # [N, C, L...] (a sequence pooled: PyTorch's AdaptiveAvgPool1d(1)): every axis after C
        return [Value(reduce(nchw(args[0]), axis=list(range(2, args[0].rank)), keepdims=True))]
    return [Value(reduce(nhwc(args[0]), axis=[1, 2], keepdims=True), nhwc=True)]


def _reduce(node, args, attrs):
    tf = _tf()
    x = args[0]
    axes = attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = _constant(args[1], node, "the axes").tolist()
    keepdims = bool(attrs.get("keepdims", 1))
    reduce = {"ReduceMean": tf.reduce_mean, "ReduceMax": tf.reduce_max, "ReduceSum": tf.reduce_sum, "ReduceL2": _l2_norm}[node.op_type]
    rank = x.rank
    axes = sorted(a % rank for a in axes) if axes is not None else list(range(rank))
    if x.nhwc and keepdims:
        return [Value(reduce(x.data, axis=[NHWC_AXIS[a] for a in axes], keepdims=True), nhwc=True)]
    if x.nhwc and axes == [2, 3]:  # global pooling that drops H and W: [N,H,W,C] -> [N,C]
        return [Value(reduce(x.data, axis=[1, 2], keepdims=False))]
    return [Value(reduce(nchw(x), axis=axes, keepdims=keepdims))]


def _arg_extreme(node, args, attrs):
    """ArgMax/ArgMin (a segmentation head's class map, a classifier's label): int64 indices along
    one axis; with select_last_index the last of equal values, found on the reversed tensor."""
    tf = _tf()
    x = args[0]
    axis = attrs.get("axis", 0) % x.rank
    data, where = x.data, (NHWC_AXIS[axis] if x.nhwc else axis)
    find = tf.math.argmax if node.op_type == "ArgMax" else tf.math.argmin
    if attrs.get("select_last_index", 0):
        size = tf.shape(data, out_type=tf.int64)[where]
        index = size - 1 - find(tf.reverse(data, [where]), axis=where, output_type=tf.int64)
    else:
        index = find(data, axis=where, output_type=tf.int64)
    if attrs.get("keepdims", 1):
        return [Value(tf.expand_dims(index, where), nhwc=x.nhwc)]
    if x.nhwc:  # [N, H, W] or [N, W, C]...: back to the ONNX order of the remaining axes
        remaining = [a for a in range(4) if a != axis]
        held = [NHWC_AXIS[a] for a in remaining]  # where each remaining ONNX axis sits, in the NHWC order the result keeps
        return [Value(tf.transpose(index, [sorted(held).index(h) for h in held]))]
    return [Value(index)]


def _reverse_sequence(node, args, attrs):
    """ReverseSequence (tf2onnx writes a Keras Bidirectional layer's backward pass with it): each
    sample's first `sequence_lens` steps reversed, as TFLite's REVERSE_SEQUENCE does."""
    lengths = args[1].data if args[1].const else _tf().cast(args[1].data, "int64")
    return [Value(_tf().reverse_sequence(nchw(args[0]), lengths, seq_axis=attrs.get("time_axis", 0), batch_axis=attrs.get("batch_axis", 1)))]


def _l2_norm(x: Any, axis: Any, keepdims: bool) -> Any:
    """ReduceL2: the square root of the sum of squares (a sentence embedding's normalization).
    Squared as x * x: with SQUARE the converter fuses x / norm into L2_NORMALIZATION, which the
    int8 quantizer leaves in float."""
    tf = _tf()
    return tf.sqrt(tf.reduce_sum(x * x, axis=axis, keepdims=keepdims))


def _same_layout(a: Value, b: Value) -> tuple[Any, Any, bool]:
    """Both operands of an elementwise op in one layout (NHWC when either is channel-last)."""
    if not (a.nhwc or b.nhwc):
        return a.data, b.data, False

    def channel_last(v: Value) -> Any:
        if v.nhwc:
            return v.data
        if v.const:
            data = v.data
            if data.ndim == 0 or data.size == 1:
                return data.reshape(()) if data.ndim else data
            data = data.reshape((1,) * (4 - data.ndim) + data.shape)
            return np.ascontiguousarray(data.transpose(TO_NHWC))
        if v.rank == 4:
            return nhwc(v)
        raise InputError("an elementwise op mixes an image tensor with a lower-rank tensor; not supported by the tflite target")

    return channel_last(a), channel_last(b), True


def _binary(node, args, attrs):
    tf = _tf()
    a, b, layout = _same_layout(args[0], args[1])
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):  # folded here (shape arithmetic): ONNX's semantics
        return [Value(np.asarray(_NUMPY_BINARY[node.op_type](a, b)), nhwc=layout)]
    op = {"Add": tf.add, "Sub": tf.subtract, "Mul": tf.multiply, "Div": tf.divide, "Pow": tf.pow,
          "Max": tf.maximum, "Min": tf.minimum}[node.op_type]
    if node.op_type == "Div" and all(np.issubdtype(np.dtype(getattr(v.dtype, "as_numpy_dtype", v.dtype)), np.integer) for v in (a, b)):
        op = _truncating_divide  # tf.divide of integers is a float division; ONNX's truncates
    return [Value(op(a, b), nhwc=layout)]


def _truncating_divide(a: Any, b: Any) -> Any:
    """Integer a / b rounded toward zero from kernels TFLite has (no TRUNCATE_DIV; FLOOR_DIV only
    for int32): the floor quotient in int32, plus one where the remainder is not zero and the
    signs differ. Integer division in a lowered graph is shape arithmetic, which int32 holds."""
    tf = _tf()
    dtype = a.dtype
    a, b = tf.cast(a, "int32"), tf.cast(b, "int32")
    quotient = tf.math.floordiv(a, b)
    inexact = tf.logical_and(tf.not_equal(tf.math.floormod(a, b), 0), tf.not_equal(tf.less(a, 0), tf.less(b, 0)))
    return tf.cast(quotient + tf.cast(inexact, "int32"), dtype)


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX Div: integers divide truncating toward zero (as ONNX Runtime does), keeping their type."""
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        return (np.trunc(a / b)).astype(np.result_type(a, b))
    return np.divide(a, b)


_NUMPY_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _divide, "Pow": np.power,
                 "Max": np.maximum, "Min": np.minimum}


def _unary(fn: Callable[[Any, dict[str, Any]], Any]):
    def lower(node, args, attrs):
        return [Value(fn(args[0].data, attrs), nhwc=args[0].nhwc)]

    return lower


def _clip(node, args, attrs):
    tf = _tf()
    low = attrs.get("min")
    high = attrs.get("max")
    if len(args) > 1 and args[1] is not None:
        low = float(_constant(args[1], node, "min"))
    if len(args) > 2 and args[2] is not None:
        high = float(_constant(args[2], node, "max"))
    x = args[0]
    if low == 0.0 and high == 6.0:
        y = tf.nn.relu6(x.data)
    elif low == 0.0 and high is None:
        y = tf.nn.relu(x.data)
    else:
        y = tf.clip_by_value(x.data, -3.4e38 if low is None else low, 3.4e38 if high is None else high)
    return [Value(y, nhwc=x.nhwc)]


def _hard_swish(x, attrs):
    tf = _tf()
    return x * tf.nn.relu6(x + 3.0) * (1.0 / 6.0)  # the converter fuses this into HARD_SWISH


def _hard_sigmoid(x, attrs):
    tf = _tf()
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    # relu6 of six times the line, over 6: RELU6 and MUL have int8 kernels (the MINIMUM that
    # clip_by_value becomes stays float under the quantizer)
    return tf.nn.relu6(x * np.float32(6 * alpha) + np.float32(6 * beta)) * np.float32(1 / 6)


def _gemm(node, args, attrs):
    tf = _tf()
    a = nchw(args[0])
    if attrs.get("transA", 0):
        a = tf.transpose(a)
    b = args[1].data
    if attrs.get("transB", 0):
        b = b.T if args[1].const else tf.transpose(b)
    if attrs.get("alpha", 1.0) != 1.0:
        b = b * np.float32(attrs["alpha"])
    y = tf.matmul(a, b)
    if len(args) > 2 and args[2] is not None:
        c = args[2].data
        y = y + (c * np.float32(attrs.get("beta", 1.0)) if attrs.get("beta", 1.0) != 1.0 else c)
    return [Value(y)]


def _matmul(node, args, attrs):
    return [Value(_tf().matmul(nchw(args[0]), nchw(args[1])))]


def _einsum(node, args, attrs):
    """tf.einsum on the operands in ONNX's layout: the converter writes BATCH_MATMUL/FULLY_CONNECTED
    with the transposes and reshapes the equation needs (attention written as einsum)."""
    equation = attrs["equation"]
    equation = equation.decode() if isinstance(equation, bytes) else equation
    if all(a.const for a in args):
        return [Value(np.einsum(equation, *(a.data for a in args)))]
    return [Value(_tf().einsum(equation, *(a.data if a.const else nchw(a) for a in args)))]


def _top_k(node, args, attrs):
    """TOPK_V2 along the last axis (another axis is moved there and back); the smallest k as the
    largest of the negated values; indices int64 as in ONNX. Unsorted output may be sorted."""
    tf = _tf()
    x = nchw(args[0])
    k = int(_constant(args[1], node, "k").reshape(-1)[0])
    rank = len(x.shape)
    axis = attrs.get("axis", -1) % rank
    order = [a for a in range(rank) if a != axis] + [axis]
    moved = x if axis == rank - 1 else tf.transpose(x, order)
    largest = attrs.get("largest", 1)
    values, indices = tf.math.top_k(moved if largest else -moved, k=k, sorted=True)
    values = values if largest else -values
    if axis != rank - 1:
        back = np.argsort(order).tolist()
        values, indices = tf.transpose(values, back), tf.transpose(indices, back)
    return [Value(values), Value(tf.cast(indices, tf.int64))]


def _reshape(node, args, attrs):
    tf = _tf()
    x = args[0]
    if not args[1].const:  # a shape computed from Shape/Slice/Concat at run time (a dynamic batch)
        source = nchw(x)
        target = tf.cast(args[1].data, "int32")
        if attrs.get("allowzero", 0):  # a 0 is a zero-sized dim, as in TF (PyTorch's view exports this)
            return [Value(tf.reshape(source, target))]
        dims = tf.shape(source, out_type="int32")
        dims = tf.pad(dims, [[0, tf.maximum(tf.size(target) - tf.size(dims), 0)]])[: tf.size(target)]
        target = tf.where(tf.equal(target, 0), dims, target)  # 0 copies the input's dim
        return [Value(tf.reshape(source, target))]
    shape = _constant(args[1], node, "the target shape").astype(np.int64).tolist()
    if 0 in shape and attrs.get("allowzero", 0):
        raise InputError(f"node {node.name} (Reshape): a zero-sized dim is not supported by the tflite target")
    if x.const:
        dims = x.data.shape
        return [Value(np.reshape(x.data, [dims[i] if s == 0 else s for i, s in enumerate(shape)]))]
    # [N,1,1,C] channel-last has the element order of [N,C,1,1]: reshape it without a transpose
    pooled = x.nhwc and x.data.shape[1] == 1 and x.data.shape[2] == 1 and 0 not in shape[1:]
    source = x.data if pooled else nchw(x)
    if 0 in shape:
        shape = [tf.shape(source)[i] if s == 0 else s for i, s in enumerate(shape)]
    return [Value(tf.reshape(source, shape))]


def _flatten(node, args, attrs):
    tf = _tf()
    x = nchw(args[0])
    axis = attrs.get("axis", 1) % max(len(x.shape), 1)
    inner = x.shape[axis:]
    if None in inner:  # dims known only at run time (a dynamic width): the product is computed
        return [Value(tf.reshape(x, tf.stack([-1, tf.reduce_prod(tf.shape(x)[axis:])])))]
    return [Value(tf.reshape(x, [-1, int(np.prod(inner))]))]


def _transpose(node, args, attrs):
    if args[0].const:  # folded (a traced export's pads: Concat -> Reshape -> Slice -> Transpose)
        return [Value(np.transpose(args[0].data, attrs.get("perm")))]
    return [Value(_tf().transpose(nchw(args[0]), attrs.get("perm")))]


def _softmax(node, args, attrs):
    """Softmax, and LogSoftmax (the output of a PyTorch CTC or NLL model) as LiteRT's LOG_SOFTMAX."""
    tf = _tf()
    x = args[0]
    axis = attrs.get("axis", -1)
    function = tf.nn.log_softmax if node.op_type == "LogSoftmax" else tf.nn.softmax
    if x.nhwc and axis % 4 == 1:
        return [Value(function(x.data, axis=-1), nhwc=True)]
    return [Value(function(nchw(x), axis=axis))]


def _concat(node, args, attrs):
    tf = _tf()
    axis = attrs["axis"]
    if all(a.const for a in args):
        return [Value(np.concatenate([a.data for a in args], axis))]
    known = None
    if all(a.rank == 1 and (a.const or a.known is not None) for a in args):  # a shape put together: what is known of it
        known = tuple(d for a in args for d in (a.data.tolist() if a.const else a.known))
        if None not in known:
            return [Value(np.array(known, np.int64))]
    if all(a.rank == 4 for a in args) and any(a.nhwc for a in args):
        return [Value(tf.concat([nhwc(a) for a in args], NHWC_AXIS[axis % 4]), nhwc=True)]
    return [Value(tf.concat([nchw(a) for a in args], axis), known=known)]


def _split(node, args, attrs):
    """Split into the sizes given (input since opset 13, attribute before) or into equal parts
    (one per output, or `num_outputs` since opset 18): one SPLIT, or a slice per part."""
    tf = _tf()
    x = args[0]
    axis = attrs.get("axis", 0)
    if len(args) > 1 and args[1] is not None:
        sizes = _constant(args[1], node, "the split sizes").astype(np.int64).reshape(-1).tolist()
    else:
        sizes = list(attrs["split"]) if "split" in attrs else None
    count = len(node.output)
    if x.const:
        data = x.data
        edges = np.cumsum(sizes)[:-1] if sizes else count
        return [Value(part) for part in np.split(data, edges, axis=axis)]
    data, layout = (x.data, True) if x.nhwc else (nchw(x), False)
    axis = NHWC_AXIS[axis % 4] if layout else axis % len(data.shape)
    if not sizes or len(set(sizes)) == 1:
        return [Value(part, nhwc=layout) for part in tf.split(data, count, axis=axis)]
    # unequal parts as slices: SPLIT_V has no int8 path in ai-edge-quantizer, STRIDED_SLICE has
    edges = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return [Value(data[(slice(None),) * axis + (slice(start, end),)], nhwc=layout) for start, end in zip(edges, edges[1:])]


def _batch_norm(node, args, attrs):
    scale, bias, mean, var = (_constant(a, node, "batch-norm parameters") for a in args[1:5])
    factor = scale / np.sqrt(var + attrs.get("epsilon", 1e-5))
    shift = bias - mean * factor
    x = args[0]
    shape = (-1,) if x.nhwc else (-1,) + (1,) * (x.rank - 2)
    return [Value(x.data * factor.reshape(shape).astype(np.float32) + shift.reshape(shape).astype(np.float32), nhwc=x.nhwc)]


def _identity(node, args, attrs):
    return [args[0]]


def _space_to_depth(node, args, attrs):
    """ONNX SpaceToDepth orders the new channels (row offset, column offset, channel), as
    TensorFlow's channel-last SPACE_TO_DEPTH does: one op, int8 in TFLite (YOLOX's Focus stem)."""
    return [Value(_tf().nn.space_to_depth(nhwc(_four_d(args[0], node)), attrs["blocksize"]), nhwc=True)]


def _depth_to_space(node, args, attrs):
    """A reshape to [N, H, W, b, b, C] (DCR, the default: channels read as row offset, column
    offset, channel) or [N, H, W, C, b, b] (CRD, PyTorch's PixelShuffle) and a transpose: both
    run on integers in int8, where ai-edge-quantizer leaves a DEPTH_TO_SPACE float."""
    tf, block = _tf(), attrs["blocksize"]
    x = nhwc(_four_d(args[0], node))
    h, w = (tf.shape(x)[axis] if x.shape[axis] is None else x.shape[axis] for axis in (1, 2))
    channels = x.shape[3] // (block * block)
    if _text(attrs.get("mode", b"DCR")) == "DCR":
        split, order = [-1, h, w, block, block, channels], [0, 1, 3, 2, 4, 5]
    else:
        split, order = [-1, h, w, channels, block, block], [0, 1, 4, 2, 5, 3]
    y = tf.transpose(tf.reshape(x, split), order)
    return [Value(tf.reshape(y, [-1, h * block, w * block, channels]), nhwc=True)]


def _four_d(value: Value, node: onnx.NodeProto) -> Value:
    if value.rank != 4:
        raise InputError(f"node {node.name} ({node.op_type}): the tflite target lowers it on 4-D [N, C, H, W] tensors only")
    return value


def _constant_node(node, args, attrs):
    return [Value(numpy_helper.to_array(attrs["value"]))]


def _prelu(node, args, attrs):
    """x + relu(x * (slope - 1)) when every slope is at most 1, else x + relu(-x) * (1 - slope):
    a MUL with a fused RELU and an ADD, which XNNPACK runs in int8 (a standalone int8 RELU, the
    older relu(x) - slope * relu(-x), is not delegated and costs three requantizations more)."""
    tf = _tf()
    x, slope, layout = _same_layout(args[0], args[1])
    if isinstance(slope, np.ndarray) and np.all(slope <= 1.0):
        return [Value(x + tf.nn.relu(x * (slope - np.float32(1.0)).astype(np.float32)), nhwc=layout)]
    return [Value(x + tf.nn.relu(x * np.float32(-1.0)) * (np.float32(1.0) - slope), nhwc=layout)]


def _axes(node, args, attrs, index: int = 1) -> list[int] | None:
    """An op's axes: the attribute (old opsets) or the constant input at `index` (newer ones)."""
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(args) > index and args[index] is not None:
        return _constant(args[index], node, "the axes").astype(np.int64).reshape(-1).tolist()
    return None


def _pad_op(node, args, attrs):
    tf = _tf()
    mode = _text(attrs.get("mode", b"constant"))
    x = args[0]
    pads = list(attrs["pads"]) if "pads" in attrs else _constant(args[1], node, "the pads").astype(np.int64).tolist()
    value = float(_constant(args[2], node, "the pad value").reshape(())) if len(args) > 2 and args[2] is not None else float(attrs.get("value", 0.0))
    rank = x.rank
    axes = _axes(node, args, {}, 3) or list(range(rank))
    if min(pads) < 0 or mode not in ("constant", "reflect"):
        raise InputError(f"node {node.name} (Pad): {mode} padding{' with negative pads' if min(pads) < 0 else ''} is not supported by the tflite target")
    paddings = [[0, 0] for _ in range(rank)]
    for axis, before, after in zip(axes, pads[: len(axes)], pads[len(axes):]):
        paddings[NHWC_AXIS[axis % rank] if x.nhwc else axis % rank] = [before, after]
    if x.const:
        return [Value(np.pad(x.data, paddings, mode="constant" if mode == "constant" else "reflect", **({"constant_values": value} if mode == "constant" else {})))]
    y = tf.pad(x.data, paddings, constant_values=value) if mode == "constant" else tf.pad(x.data, paddings, mode="REFLECT")
    return [Value(y, nhwc=x.nhwc)]


def _squeeze(node, args, attrs):
    tf = _tf()
    x = args[0]
    axes = _axes(node, args, attrs)
    if x.const:
        return [Value(np.squeeze(x.data, axis=None if axes is None else tuple(axes)))]
    if x.nhwc and axes is not None and sorted(a % 4 for a in axes) == [2, 3]:  # [N,1,1,C] -> [N,C] needs no transpose
        return [Value(tf.squeeze(x.data, axis=[1, 2]))]
    y = nchw(x)
    if axes is None:
        return [Value(tf.squeeze(y))]
    for axis in sorted((a % len(y.shape) for a in axes), reverse=True):
        # index 0 of the axis (a STRIDED_SLICE that drops it): the converter refuses some SQUEEZEs
        # of 5-D tensors with dynamic dims (PP-OCRv4 rec's attention: "squeeze_dims ... at most 8")
        y = y[(slice(None),) * axis + (0,)]
    return [Value(y)]


def _unsqueeze(node, args, attrs):
    tf = _tf()
    x = args[0]
    axes = _axes(node, args, attrs)
    rank = x.rank + len(axes)
    data = x.data if x.const else nchw(x)
    for axis in sorted(a % rank for a in axes):
        data = np.expand_dims(data, axis) if x.const else tf.expand_dims(data, axis)
    return [Value(data)]


def _slice(node, args, attrs):
    x = args[0]
    if not (args[1].const and args[2].const):
        return _dynamic_slice(node, args)
    starts, ends = (_constant(args[i], node, "starts/ends").astype(np.int64).tolist() for i in (1, 2))
    axes = _axes(node, args, {}, 3) or list(range(len(starts)))
    steps = _constant(args[4], node, "the steps").astype(np.int64).tolist() if len(args) > 4 and args[4] is not None else [1] * len(starts)
    rank = x.rank
    index = [slice(None)] * rank
    for axis, start, end, step in zip(axes, starts, ends, steps):
        limit = 2**31 - 1
        index[axis % rank] = slice(max(min(start, limit), -limit), max(min(end, limit), -limit - 1) if step < 0 else min(end, limit), step)
    data = x.data if x.const else nchw(x)
    known = tuple(np.array(x.known, dtype=object)[tuple(index)]) if x.known is not None and rank == 1 else None
    if known is not None and None not in known:  # the dims of a run-time Shape that are known now: a constant
        return [Value(np.array(known, np.int64))]
    return [Value(data[tuple(index)], known=known)]


def _dynamic_slice(node, args):
    """Slice whose starts or ends are computed at run time (a sequence length read from a Shape):
    a STRIDED_SLICE with run-time begin/end; the axes and steps must be constants."""
    tf = _tf()
    x = args[0]
    count = int(args[1].data.shape[0])
    axes = [a % x.rank for a in (_axes(node, args, {}, 3) or list(range(count)))]
    steps = _constant(args[4], node, "the steps").astype(np.int64).tolist() if len(args) > 4 and args[4] is not None else [1] * count
    if any(step < 1 for step in steps):
        raise InputError(f"node {node.name} (Slice): run-time starts/ends with a negative step are not supported by the tflite target")
    limit = 2**31 - 1

    def bounds(value: Value) -> Any:  # int64 ends such as INT64_MAX, clamped before the int32 cast
        data = value.data if value.const else tf.clip_by_value(tf.cast(value.data, "int64"), -limit, limit)
        return tf.cast(np.clip(data, -limit, limit) if value.const else data, "int32")

    starts, ends = bounds(args[1]), bounds(args[2])
    begin, end, strides, unmasked = [0] * x.rank, [0] * x.rank, [1] * x.rank, 0
    for index, axis in enumerate(axes):
        begin[axis], end[axis], strides[axis] = starts[index], ends[index], steps[index]
        unmasked |= 1 << axis
    mask = ((1 << x.rank) - 1) & ~unmasked  # the axes not sliced keep their whole extent
    data = x.data if x.const else nchw(x)
    return [Value(tf.strided_slice(data, tf.stack(begin), tf.stack(end), strides, begin_mask=mask, end_mask=mask))]


_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64", 2: "uint8", 3: "int8"}


def _cast(node, args, attrs):
    x = args[0]
    dtype = _ONNX_DTYPES.get(attrs["to"])
    if dtype is None:
        raise InputError(f"node {node.name} (Cast): casting to ONNX type {attrs['to']} is not supported by the tflite target")
    if x.const:
        return [Value(x.data.astype(dtype))]
    return [Value(_tf().cast(x.data, dtype), nhwc=x.nhwc)]


def _shape(node, args, attrs):
    """The NCHW shape, cut to [start, end) (opset 15): a constant where every dim is known; else a
    run-time shape that remembers the dims known now, so that a Gather of those folds (a traced
    PyTorch export computes Swin's window paddings from Shape -> Gather(H) -> Mod, and TFLite's
    PAD needs them constant)."""
    x = args[0]
    data = x.data if x.const else nchw(x)
    window = slice(attrs.get("start", 0), attrs.get("end"))
    dims = tuple(data.shape)
    if x.onnx_dims is not None and len(x.onnx_dims) == len(dims):  # TF lost what ONNX knows behind a run-time Reshape
        dims = tuple(d if d is not None else o for d, o in zip(dims, x.onnx_dims))
    if x.const or None not in dims:
        return [Value(np.array(list(dims), np.int64)[window])]
    return [Value(_tf().cast(_tf().shape(data), "int64")[window], known=dims[window])]


def _gather(node, args, attrs):
    tf = _tf()
    data, indices = args[0], args[1]
    axis = attrs.get("axis", 0)
    if data.const and indices.const:
        return [Value(np.take(data.data, indices.data, axis=axis))]
    if data.known is not None and indices.const:  # dims of a run-time Shape that are known now fold to constants
        picked = np.take(np.array(data.known, dtype=object), indices.data.astype(np.int64), axis=0)
        if all(d is not None for d in np.ravel(picked)):
            return [Value(np.asarray(picked, np.int64))]
    source = data.data if data.const else nchw(data)
    index = indices.data
    if indices.const and np.any(index < 0):  # x[:, -1]: ONNX counts from the end, LiteRT's GATHER refuses it at run time
        rank = len(source.shape)
        size = source.shape[axis % rank]
        index = np.where(index < 0, index + size, index) if size is not None else \
            tf.where(index < 0, index + tf.shape(source, out_type=index.dtype)[axis % rank], index)
    return [Value(tf.gather(source, index, axis=axis))]


def _resize(node, args, attrs):
    """Nearest (asymmetric + floor, or half-pixel) and bilinear (half-pixel, align-corners,
    asymmetric) upsampling on NHWC, by constant scales or sizes."""
    tf = _tf()
    mode = _text(attrs.get("mode", b"nearest"))
    transform = _text(attrs.get("coordinate_transformation_mode", b"half_pixel"))
    nearest_mode = _text(attrs.get("nearest_mode", b"round_prefer_floor"))
    x = nhwc(args[0])
    scales = args[2].data if len(args) > 2 and args[2] is not None and args[2].const and args[2].data.size else None
    sizes = args[3].data if len(args) > 3 and args[3] is not None and args[3].const and args[3].data.size else None
    if sizes is None and len(args) > 3 and args[3] is not None and args[3].known is not None and None not in args[3].known[2:]:
        sizes = np.array(args[3].known, dtype=object)  # sizes read from another tensor's shape, its H and W known now (SegFormer's head)
    if sizes is not None:
        size = [int(sizes[2]), int(sizes[3])]
    elif scales is not None and list(scales[:2]) == [1.0, 1.0]:
        spatial = tf.shape(x)[1:3] if None in x.shape[1:3] else np.array(x.shape[1:3])
        size = tf.cast(tf.floor(tf.cast(spatial, "float32") * np.asarray(scales[2:], np.float32)), "int32") if not isinstance(spatial, np.ndarray) \
            else [int(np.floor(d * s)) for d, s in zip(spatial, scales[2:])]
    else:
        raise InputError(f"node {node.name} (Resize): only constant spatial scales or sizes are supported by the tflite target")
    raw = tf.raw_ops  # the kernels tf.compat.v1.image wraps, without its deprecation lines on the user's terminal
    if mode == "nearest" and transform == "asymmetric" and nearest_mode == "floor":
        y = raw.ResizeNearestNeighbor(images=x, size=size, align_corners=False, half_pixel_centers=False)
    elif mode == "nearest" and transform in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn") and nearest_mode in ("round_prefer_ceil", "floor"):
        y = raw.ResizeNearestNeighbor(images=x, size=size, align_corners=False, half_pixel_centers=True)
    elif mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
        y = raw.ResizeBilinear(images=x, size=size, align_corners=transform == "align_corners", half_pixel_centers=transform.endswith("half_pixel"))
    else:
        raise InputError(f"node {node.name} (Resize): mode {mode} with {transform}/{nearest_mode} is not supported by the tflite target")
    return [Value(y, nhwc=True)]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_transpose(node, args, attrs):
    tf = _tf()
    x = nhwc(args[0])
    weight = _constant(args[1], node, "the weight")
    if weight.ndim != 4 or attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", (1, 1))) or "output_shape" in attrs:
        raise InputError(f"node {node.name} (ConvTranspose): only 2-D, ungrouped, undilated transposed convolutions "
                         "without output_shape are supported by the tflite target")
    if _text(attrs.get("auto_pad", b"NOTSET")) not in ("NOTSET", "VALID"):
        raise InputError(f"node {node.name} (ConvTranspose): auto_pad SAME is not supported by the tflite target")
    kernel = weight.shape[2:]
    strides = list(attrs.get("strides", (1, 1)))
    top, left, bottom, right = list(attrs.get("pads", (0, 0, 0, 0)))
    extra = list(attrs.get("output_padding", (0, 0)))
    shape = tf.shape(x)
    full = [(shape[1 + i] - 1) * strides[i] + kernel[i] for i in range(2)]
    output_shape = tf.stack([shape[0], full[0], full[1], weight.shape[1]])
    y = tf.nn.conv2d_transpose(x, weight.transpose(2, 3, 1, 0), output_shape, (1, *strides, 1), "VALID")
    if top or left or bottom or right or any(extra):
        y = y[:, top: full[0] - bottom + extra[0], left: full[1] - right + extra[1], :]
    return _biased(y, node, args)


def _layer_norm(node, args, attrs):
    """Normalisation over the axes from `axis` to the last, then scale and bias (transformers)."""
    tf = _tf()
    x = nchw(args[0])
    rank = len(x.shape)
    axes = list(range(attrs.get("axis", -1) % rank, rank))
    mean = tf.reduce_mean(x, axis=axes, keepdims=True)
    centered = x - mean
    variance = tf.reduce_mean(tf.square(centered), axis=axes, keepdims=True)
    y = centered * tf.math.rsqrt(variance + np.float32(attrs.get("epsilon", 1e-5)))
    y = y * _constant(args[1], node, "the scale")
    if len(args) > 2 and args[2] is not None:
        y = y + _constant(args[2], node, "the bias")
    return [Value(y)]


def _gelu(node, args, attrs):
    return [Value(_tf().nn.gelu(nchw(args[0]), approximate=_text(attrs.get("approximate", b"none")) == "tanh"))]


def _elementwise(numpy_op: Callable, tf_op: Callable) -> Callable:
    """An elementwise op on NCHW operands: numpy when every operand is a constant (masks,
    positions), TF otherwise."""
    def lower(node, args, attrs):
        values = [a for a in args if a is not None]
        if all(v.const for v in values):
            return [Value(np.asarray(numpy_op(*[v.data for v in values])))]
        return [Value(tf_op(*[v.data if v.const else nchw(v) for v in values]))]

    return lower


def _mod(node, args, attrs):
    """ONNX Mod: fmod 0 (integers) takes the divisor's sign, as FLOOR_MOD does; fmod 1 (C fmod,
    which floats need) the dividend's: a - b * trunc(a / b), from kernels LiteRT has. A traced
    PyTorch export computes window paddings this way (transformers' Swin: height % window)."""
    tf = _tf()
    if not attrs.get("fmod", 0):
        return _elementwise(np.mod, lambda a, b: tf.math.floormod(a, b))(node, args, attrs)

    def truncated(a, b):
        quotient = a / b
        return a - b * tf.where(quotient >= 0, tf.floor(quotient), tf.math.ceil(quotient))

    return _elementwise(np.fmod, truncated)(node, args, attrs)


def _expand(node, args, attrs):
    tf = _tf()
    x, shape = args[0], args[1]
    if x.const and shape.const:
        return [Value(x.data * np.ones(shape.data.astype(np.int64), x.data.dtype))]
    source = x.data if x.const else nchw(x)
    target = tf.broadcast_dynamic_shape(tf.shape(source, out_type="int64"), tf.cast(shape.data, "int64"))
    return [Value(tf.broadcast_to(source, target))]


def _tile(node, args, attrs):
    """Tile with repeats computed at run time (DETR repeats its query embeddings per batch
    sample); constant repeats of a constant tensor are folded before this."""
    x, repeats = args[0], args[1]
    source = x.data if x.const else nchw(x)
    return [Value(_tf().tile(source, _tf().cast(repeats.data, "int32")))]


def _range(node, args, attrs):
    start, limit, delta = args
    if start.const and limit.const and delta.const:
        return [Value(np.arange(start.data, limit.data, delta.data).astype(start.data.dtype))]
    return [Value(_tf().range(start.data, limit.data, delta.data))]


def _gather_nd(node, args, attrs):
    data, indices = args[0], args[1]
    if data.const and indices.const and not attrs.get("batch_dims", 0):
        return [Value(data.data[tuple(np.moveaxis(indices.data, -1, 0))])]
    source = data.data if data.const else nchw(data)
    return [Value(_tf().gather_nd(source, indices.data, batch_dims=attrs.get("batch_dims", 0)))]


def _tf_where(condition, a, b):
    return _tf().where(condition, a, b)


def _pointwise(numpy_op: Callable, tf_op: Callable) -> Callable:
    """A one-input elementwise op that keeps the operand's layout (no transpose around it inside
    an image network); numpy when the operand is a constant."""
    def lower(node, args, attrs):
        x = args[0]
        if x.const:
            return [Value(np.asarray(numpy_op(x.data)).astype(x.data.dtype))]
        return [Value(tf_op(x.data), nhwc=x.nhwc)]

    return lower


def _elu(x: Any, attrs: dict[str, Any]) -> Any:
    """x where positive, alpha * (exp(x) - 1) elsewhere: TFLite's ELU builtin has alpha 1."""
    tf = _tf()
    alpha = float(attrs.get("alpha", 1.0))
    return tf.nn.elu(x) if alpha == 1.0 else tf.where(x > 0, x, np.float32(alpha) * (tf.exp(x) - 1.0))


def _softplus(x: Any, attrs: dict[str, Any]) -> Any:
    """log(1 + exp(x)) as max(x, 0) + log(1 + exp(-|x|)): no overflow for large x, and builtins
    only (TFLite has no SOFTPLUS)."""
    tf = _tf()
    return tf.maximum(x, 0.0) + tf.math.log(1.0 + tf.exp(tf.abs(x) * np.float32(-1.0)))


def _integer_abs(x: Any) -> Any:
    """|x| of an integer tensor as a SELECT: TFLite's ABS has no int64 kernel, and T5's
    relative-position buckets take the absolute distance between int64 positions."""
    return _tf().where(x < 0, -x, x)


def _comparison(numpy_op: Callable, tf_name: str) -> Callable:
    """Greater, Less and their -OrEqual forms (a relative-position bucket, an attention mask)."""
    return _elementwise(numpy_op, lambda a, b: getattr(_tf().math, tf_name)(a, b))


def _constant_of_shape(node, args, attrs):
    """A tensor of one value in the shape of input 0: a constant where the shape is (a constant,
    or a run-time Shape whose dims are all known now), else TF's FILL."""
    fill = numpy_helper.to_array(attrs["value"]).reshape(-1) if "value" in attrs else np.zeros(1, np.float32)
    shape = args[0]
    if shape.const:
        return [Value(np.full(shape.data.astype(np.int64), fill[0], fill.dtype))]
    if shape.known is not None and None not in shape.known:
        return [Value(np.full(np.asarray(shape.known, np.int64), fill[0], fill.dtype))]
    return [Value(_tf().fill(_tf().cast(shape.data, "int32"), _tf().constant(fill[0], dtype=fill.dtype.name)))]


def _cumsum(node, args, attrs):
    """ONNX CumSum along a constant axis (RoBERTa's position ids: a cumulative count of the
    tokens that are not padding); TFLite has CUMSUM with the same exclusive/reverse flags."""
    x, axis = args[0], int(_constant(args[1], node, "the axis").reshape(-1)[0])
    exclusive, reverse = bool(attrs.get("exclusive", 0)), bool(attrs.get("reverse", 0))
    if x.const:
        data = np.flip(x.data, axis) if reverse else x.data
        summed = np.cumsum(data, axis=axis, dtype=data.dtype)
        if exclusive:
            summed = summed - data
        return [Value(np.flip(summed, axis) if reverse else summed)]
    source = nchw(x)
    return [Value(_tf().math.cumsum(source, axis=axis % len(source.shape), exclusive=exclusive, reverse=reverse))]


def _gather_elements(node, args, attrs):
    """ONNX GatherElements (torch.gather): out[i][j][k] = data[i][index[i][j][k]][k] along `axis`,
    as a GATHER_ND whose coordinates are the index's own position with the axis replaced
    (transformers' token-type ids, gathered from a buffer by position)."""
    tf = _tf()
    data, indices = args[0], args[1]
    rank = data.rank
    axis = attrs.get("axis", 0) % rank
    if data.const and indices.const:
        return [Value(np.take_along_axis(data.data, indices.data.astype(np.int64), axis=axis))]
    source = data.data if data.const else nchw(data)
    index = tf.cast(indices.data if indices.const else nchw(indices), "int32")
    index = tf.where(index < 0, index + tf.shape(source)[axis], index)  # ONNX allows negative indices
    grids = tf.meshgrid(*[tf.range(tf.shape(index)[d]) for d in range(rank)], indexing="ij")
    grids[axis] = index
    return [Value(tf.gather_nd(source, tf.stack(grids, axis=-1)))]


def _instance_norm(node, args, attrs):
    """Per sample and channel, normalisation over the spatial axes, then the channel's scale and
    bias (wav2vec2's first feature-extractor layer, on [N, C, L])."""
    tf = _tf()
    x = args[0]
    scale, bias = _constant(args[1], node, "the scale"), _constant(args[2], node, "the bias")
    data = x.data
    axes = [1, 2] if x.nhwc else list(range(2, x.rank))
    shape = (-1,) if x.nhwc else (-1,) + (1,) * (x.rank - 2)
    mean = tf.reduce_mean(data, axis=axes, keepdims=True)
    centered = data - mean
    variance = tf.reduce_mean(tf.square(centered), axis=axes, keepdims=True)
    y = centered * tf.math.rsqrt(variance + np.float32(attrs.get("epsilon", 1e-5)))
    return [Value(y * scale.reshape(shape).astype(np.float32) + bias.reshape(shape).astype(np.float32), nhwc=x.nhwc)]


LOWERINGS: dict[str, Callable] = {
    "Conv": _conv, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool,
    "ReduceMean": _reduce, "ReduceMax": _reduce, "ReduceSum": _reduce, "ReduceL2": _reduce,
    "Add": _binary, "Sub": _binary, "Mul": _binary, "Div": _binary, "Pow": _binary, "Max": _binary, "Min": _binary,
    "Relu": _unary(lambda x, a: _tf().nn.relu(x)),
    "LeakyRelu": _unary(lambda x, a: _tf().nn.leaky_relu(x, a.get("alpha", 0.01))),
    "Sigmoid": _unary(lambda x, a: _tf().sigmoid(x)), "Tanh": _unary(lambda x, a: _tf().tanh(x)),
    "HardSwish": _unary(_hard_swish), "HardSigmoid": _unary(_hard_sigmoid),
    "Clip": _clip, "Gemm": _gemm, "MatMul": _matmul, "Reshape": _reshape, "Flatten": _flatten,
    "Transpose": _transpose, "Softmax": _softmax, "LogSoftmax": _softmax, "Concat": _concat, "Split": _split, "BatchNormalization": _batch_norm,
    "Identity": _identity, "Dropout": _identity, "Constant": _constant_node,
    "PRelu": _prelu, "Pad": _pad_op, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Slice": _slice, "Cast": _cast,
    "Shape": _shape, "Gather": _gather, "Resize": _resize, "ConvTranspose": _conv_transpose,
    "Sqrt": _unary(lambda x, a: _tf().sqrt(x)), "Elu": _unary(_elu), "Softplus": _unary(_softplus),
    "Sign": _pointwise(np.sign, lambda x: _tf().math.sign(x)),
    "Neg": _pointwise(np.negative, lambda x: x * np.float32(-1.0) if x.dtype.is_floating else -x),  # NEG has no int8 kernel
    "LayerNormalization": _layer_norm, "Gelu": _gelu, "Expand": _expand, "Range": _range, "GatherND": _gather_nd,
    "Where": _elementwise(np.where, _tf_where), "Mod": _mod,
    "IsNaN": _elementwise(np.isnan, lambda x: _tf().math.not_equal(x, x)),  # x != x: TFLite has no IS_NAN
    "Equal": _elementwise(np.equal, lambda a, b: _tf().math.equal(a, b)),
    "And": _elementwise(np.logical_and, lambda a, b: _tf().math.logical_and(a, b)),
    "Or": _elementwise(np.logical_or, lambda a, b: _tf().math.logical_or(a, b)),
    "Not": _elementwise(np.logical_not, lambda a: _tf().math.logical_not(a)),
    "Greater": _comparison(np.greater, "greater"), "Less": _comparison(np.less, "less"),
    "GreaterOrEqual": _comparison(np.greater_equal, "greater_equal"), "LessOrEqual": _comparison(np.less_equal, "less_equal"),
    "Abs": _pointwise(np.abs, lambda x: _integer_abs(x) if x.dtype.is_integer else _tf().abs(x)), "Exp": _pointwise(np.exp, lambda x: _tf().exp(x)),
    "Log": _pointwise(np.log, lambda x: _tf().math.log(x)), "Floor": _pointwise(np.floor, lambda x: _tf().floor(x)),
    "Ceil": _pointwise(np.ceil, lambda x: _tf().math.ceil(x)), "Reciprocal": _pointwise(np.reciprocal, lambda x: _tf().math.reciprocal(x)),
    "Tile": _tile, "Sin": _pointwise(np.sin, lambda x: _tf().math.sin(x)), "Cos": _pointwise(np.cos, lambda x: _tf().math.cos(x)),  # sine position embeddings (DETR)
    "ConstantOfShape": _constant_of_shape, "CumSum": _cumsum, "GatherElements": _gather_elements,
    "InstanceNormalization": _instance_norm, "SpaceToDepth": _space_to_depth, "DepthToSpace": _depth_to_space,
    "LSTM": lstm, "GRU": gru, "RNN": rnn, "ArgMax": _arg_extreme, "ArgMin": _arg_extreme, "ReverseSequence": _reverse_sequence,
    "Einsum": _einsum, "TopK": _top_k,
}


def unsupported_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes with no lowering, except those that compute from constants and tensor shapes only:
    those are folded at lowering (`_fold_constant_node`)."""
    shape_only = _shape_only_tensors(model)
    return [n for n in model.graph.node  # node_inputs: a Loop's body reads the data from the enclosing graph too
            if (n.op_type not in LOWERINGS or n.domain not in ("", "ai.onnx")) and not all(name in shape_only for name in node_inputs(n))]


def _shape_only_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed from initializers, Constant nodes and the shapes of other tensors, never
    from an input's values: with the dims fixed at lowering they are constants there (DINOv2
    resizes its position embeddings to the image's size; BEiT builds its relative-position index
    with ScatterND)."""
    found = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Shape" or all(name in found for name in node_inputs(node)):  # a Loop's body reads the enclosing graph
            found.update(node.output)
    return found


def _fold_constant_node(node: onnx.NodeProto, args: list[Value | None], opset: int) -> list[Value]:
    """Evaluate a node whose inputs are all constants with ONNX's reference implementation (for
    ops the lowering has no TF form of, or not for these attributes: a bicubic Resize)."""
    from onnx.reference import ReferenceEvaluator

    names = [name if arg is not None else "" for name, arg in zip(node.input, args)]
    inputs = [_value_info(name, arg.data) for name, arg in zip(names, args) if arg is not None]
    graph = onnx.helper.make_graph([node], "fold", inputs, [onnx.helper.make_empty_tensor_value_info(o) for o in node.output])
    try:
        evaluator = ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)]))
        results = evaluator.run(None, {name: arg.data for name, arg in zip(names, args) if arg is not None})
    except Exception as exc:  # noqa: BLE001 - the reference implementation raises what its op does
        raise InputError(f"node {node.name} ({node.op_type}): the tflite target cannot lower it, and ONNX's reference "
                         f"implementation could not fold it: {one_line(exc)}") from None
    return [Value(np.asarray(r)) for r in results]


def _value_info(name: str, data: np.ndarray) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(data.dtype), data.shape)


def check_lowerable(model: onnx.ModelProto, origin: str) -> None:
    """Refuse, naming op types and nodes, a graph with ops the tflite target cannot lower."""
    missing = unsupported_nodes(model)
    if missing:
        ops = sorted({n.op_type for n in missing})
        nodes = ", ".join(n.name or f"(unnamed, writing {n.output[0]})" for n in missing[:3])
        raise InputError(f"the tflite target cannot lower op{'s' if len(ops) > 1 else ''} {', '.join(ops)} "
                         f"(node{'s' if len(missing) > 1 else ''} {nodes}{', ...' if len(missing) > 3 else ''})", origin)


def run_graph(model: onnx.ModelProto, feeds: dict[str, Any], lowerings: dict[str, Callable] | None = None) -> dict[str, Any]:
    """Evaluate the ONNX graph with TF ops on TF tensors (NCHW in, NCHW out)."""
    tf = _tf()
    lowerings = lowerings or LOWERINGS
    onnx_dims = _inferred_dims(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), onnx.defs.onnx_opset_version())
    values: dict[str, Value] = {t.name: Value(numpy_helper.to_array(t)) for t in model.graph.initializer}
    for name, tensor in feeds.items():
        values[name] = Value(tensor)
    for node in model.graph.node:
        args = [values[name] if name else None for name in node.input]
        outputs = _lower_node(node, args, lowerings.get(node.op_type), opset)
        for name, value in zip(node.output, outputs):
            if not value.const and name in onnx_dims:
                value.onnx_dims = onnx_dims[name]
            values[name] = value
    return {o.name: tf.identity(nchw(values[o.name])) for o in model.graph.output}


def _lower_node(node: onnx.NodeProto, args: list[Value | None], lower: Callable | None, opset: int) -> list[Value]:
    """The node's outputs from its lowering; a node whose inputs are all constants and that has
    no lowering, or one its lowering refuses (a bicubic Resize), is folded instead."""
    constant = all(arg is None or arg.const for arg in args)
    if lower is None and not constant:
        raise InputError(f"node {node.name} ({node.op_type}): the tflite target cannot lower it, and its inputs are not "
                         "constants at lowering: they depend on a dim not known there (a symbolic one, such as the batch); "
                         "with that dim fixed they fold", option="input_shapes")
    try:
        return lower(node, args, _attrs(node)) if lower is not None else _fold_constant_node(node, args, opset)
    except InputError:
        if lower is None or not constant:
            raise
        return _fold_constant_node(node, args, opset)
    except (ValueError, TypeError) as exc:  # TensorFlow refusing shapes or dtypes the lowering produced
        raise InputError(f"node {node.name} ({node.op_type}): the tflite lowering failed: {one_line(exc)}") from None


def _restore_static_dims(value: Value) -> None:
    """A RESHAPE to the dims ONNX knows where TF lost them: after a Reshape to a computed shape
    every dim is unknown to the TFLite converter, which then has no builtin for a convolution
    reading the tensor (SegFormer). Only where at most one dim (the batch) stays unknown, so
    the RESHAPE's shape is a constant."""
    dims = value.onnx_dims
    shape = value.data.shape
    if shape.rank is None or shape.rank != len(dims) or None not in shape.as_list() or sum(d is None for d in dims) > 1:
        return
    if value.nhwc and len(dims) == 4:
        dims = tuple(dims[axis] for axis in TO_NHWC)
    if any(known is not None and known != d for known, d in zip(shape.as_list(), dims)):
        return  # TF and ONNX disagree: TF's own shape stands
    value.data = _tf().reshape(value.data, [-1 if d is None else d for d in dims])


def _with_static_dims(value: Value, channels: int | None = None) -> Value:
    """`value` (an NCHW image a convolution or a pooling reads) with the dims TF lost restored,
    its channel count taken from the weight where ONNX shape inference did not know it either
    (SegFormer turns tokens back into an image with a Reshape to a computed shape; PoolFormer's
    GroupNorm reshapes back to its input's Shape, and its pooling's SAME padding needs the size).
    Only those inputs: a RESHAPE after every op that lost dims made BERT's int8 flatbuffer abort
    in LiteRT."""
    dims = value.onnx_dims
    if value.const or dims is None or len(dims) != 4:
        return value
    completed = dataclasses.replace(value, onnx_dims=(dims[0], channels if dims[1] is None else dims[1], *dims[2:]))
    _restore_static_dims(completed)
    return completed


def _inferred_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Each tensor's dims from ONNX shape inference (None where symbolic): a traced export's
    run-time Reshapes hide from TF static dims that ONNX still knows (SegFormer's decoder reads
    its upsampling sizes from such a tensor's Shape)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # data_prop: through Shape -> Gather -> Concat -> Reshape
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):  # a help here, not a requirement
        return {}
    from enginekit.onnx.graph import value_dims

    return value_dims(inferred)


def to_tf_function(model: onnx.ModelProto, origin: str):
    """A tf.function with the ONNX inputs (symbolic dims become None) returning the outputs by name.
    One lowering serves FP32 and INT8: a HardSwish stays the one HARD_SWISH op, which the INT8
    flatbuffer keeps float inside XNNPACK (delegate_float.py; its int8 kernel is not delegated).
    Written as an int8 (x / 6) * relu6(x + 3), three ops instead, PP-OCR cls INT8 ran 0.94x FP32
    (0.85x on one thread); with the float HARD_SWISH, 1.27x (1.12x)."""
    tf = _tf()
    from enginekit.onnx.graph import graph_inputs, tensor_specs
    from enginekit.core.tf_support import input_signature

    check_lowerable(model, origin)
    specs = tensor_specs(graph_inputs(model))

    @tf.function(input_signature=input_signature(specs), autograph=False)  # plain graph building: our errors pass through as they are
    def function(*tensors):
        return run_graph(model, {s.name: t for s, t in zip(specs, tensors)}, LOWERINGS)

    return function
