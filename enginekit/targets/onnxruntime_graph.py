"""What the ONNX Runtime target changes in the Q/DQ hub's graph before saving its artifact, so
that ORT's CPU kernels run integer where the hub's graph alone leaves float islands: aligned
input channels for the first convolutions, integer gates (hard sigmoid, sigmoid), integer
PReLUs, and channels-last integer max pooling. Each rewrite keeps the graph readable as a
pre-quantized model (onnx/prequantized.py): plain Q/DQ pairs, but for ORT's NhwcMaxPool, which
the reader turns back into the MaxPool it stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from enginekit.onnx.graph import drop_unused_initializers, value_dims
from enginekit.onnx.nodes import attribute, graph_reads, tensor_producers, tensor_readers
from enginekit.onnx.prequantized import MICROSOFT_DOMAIN, NHWC_MAX_POOL, NHWC_POOLED_SUFFIX, activation_grid
from enginekit.quantization.placement import SAME_SCALE_OPS

NHWC_POOL_ATTRIBUTES = ("auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides")  # NhwcMaxPool's attributes
INTEGER_KEEPING_OPS = frozenset(SAME_SCALE_OPS | {"Identity"})  # ops whose output has their input's integer type
CHANNEL_ALIGNMENT = 4  # MLAS's symmetric int8 convolution (x86) takes input channels in multiples of 4
GRID_STEPS = 255  # an 8-bit grid's steps from its lowest to its highest integer


def align_input_channels(model: onnx.ModelProto) -> int:
    """Pad, in place, the input channels of every ungrouped 2-D Q/DQ Conv that reads a graph
    input with signed symmetric weights to a multiple of CHANNEL_ALIGNMENT: zero weights for the
    new channels, zeros for the float input before its QuantizeLinear (0 quantizes to the zero
    point and dequantizes to exactly 0). The outputs are bit-identical and the graph stays plain
    Q/DQ pairs (it can be read back as a pre-quantized model). Why: MLAS runs such a QLinearConv
    in its fast indirect "symmetric" kernels (AVX2, AVX-VNNI, AVX-512) only when the input
    channels are a multiple of 4, else on the generic im2col path: an image model's first Conv (3
    channels) ran 2x slower in INT8 than in FP32 (efficientnet_lite0: 0.30 ms of 2.8 ms). Only
    graph inputs: inside the graph the Pad would sit between the producer and its QuantizeLinear
    and break the producer's own integer fusion (PP-OCR cls: 7 Convs left float). Returns how
    many Convs were padded."""
    graph = model.graph
    producers = tensor_producers(graph)
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    padded = 0
    for conv in [n for n in graph.node if n.op_type == "Conv" and attribute(n, "group", 1) == 1]:
        activation_dq, weight_dq = producers.get(conv.input[0]), producers.get(conv.input[1])
        quantize = producers.get(activation_dq.input[0]) if activation_dq is not None and activation_dq.op_type == "DequantizeLinear" else None
        if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] not in graph_inputs \
                or len(activation_dq.input) < 3 or weight_dq is None or weight_dq.op_type != "DequantizeLinear" \
                or len(weight_dq.input) < 3 or not {weight_dq.input[0], weight_dq.input[2]} <= initializers.keys():
            continue
        weights = numpy_helper.to_array(initializers[weight_dq.input[0]])
        missing = -weights.shape[1] % CHANNEL_ALIGNMENT if weights.ndim == 4 else 0
        if not missing or weights.dtype != np.int8 or np.any(numpy_helper.to_array(initializers[weight_dq.input[2]]) != 0):
            continue
        stem = f"{conv.name or conv.output[0]}_aligned"
        wide = np.concatenate([weights, np.zeros((weights.shape[0], missing, *weights.shape[2:]), weights.dtype)], axis=1)
        graph.initializer.extend([numpy_helper.from_array(wide, f"{weight_dq.input[0]}_aligned"),
                                  numpy_helper.from_array(np.array([0, 0, 0, 0, 0, missing, 0, 0], np.int64), f"{stem}_pads")])
        new_nodes = [helper.make_node("Pad", [quantize.input[0], f"{stem}_pads"], [f"{stem}_float"], name=f"{stem}_pad", mode="constant"),
                     helper.make_node("QuantizeLinear", [f"{stem}_float", *quantize.input[1:]], [f"{stem}_q"], name=f"{stem}_q"),
                     helper.make_node("DequantizeLinear", [f"{stem}_q", *activation_dq.input[1:]], [f"{stem}_input"], name=f"{stem}_dq"),
                     helper.make_node("DequantizeLinear", [f"{weight_dq.input[0]}_aligned", *weight_dq.input[1:]], [f"{stem}_weight_dq"],
                                      name=f"{stem}_weight_dq", axis=attribute(weight_dq, "axis", 1))]
        conv.input[0], conv.input[1] = f"{stem}_input", f"{stem}_weight_dq"
        _insert_at(graph, list(graph.node).index(conv), new_nodes)
        padded += 1
    if padded:
        _drop_unread(model)
    return padded


def channels_last_max_pools(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every 2-D MaxPool between a per-tensor DequantizeLinear and a
    QuantizeLinear on the same grid that ORT would run as a channels-first 8-bit MaxPool
    (`channels_first_8bit_pools`) as Transpose -> NhwcMaxPool -> Transpose of the integers.
    The values are the same bit for bit (a max commutes with the monotonic (q - z) * s).

    Why: ORT fuses DequantizeLinear -> MaxPool -> QuantizeLinear into an 8-bit MaxPool, and its
    channels-first 8-bit MaxPool is a slow generic loop; its layout pass makes it NhwcMaxPool
    only next to a QLinearConv. Measured (ORT 1.32, one thread): 170 us against 20 us
    channels-last on PP-OCR cls's last pool (after a hard swish, 15 % of its INT8 time), 5.1 ms
    against 0.12 ms for a YOLO SPPF-sized 5x5 pool (256 x 20 x 20, after a swish). A pool ORT
    already runs channels-last stays as the hub wrote it: the graph stays plain Q/DQ where
    nothing is gained (OpenVINO Model Server and TensorRT read no ONNX Runtime op).
    Returns how many pools were rewritten."""
    slow = channels_first_8bit_pools(model)
    if not slow:
        return 0
    graph = model.graph
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    rewritten = 0
    for pool in [n for n in graph.node if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx") and n.name in slow]:
        dequantize, after = producers.get(pool.input[0]), readers.get(pool.output[0], [])
        if len(pool.output) > 1 and pool.output[1] or attribute(pool, "storage_order", 0) != 0 or len(attribute(pool, "kernel_shape", [])) != 2 \
                or dequantize is None or dequantize.op_type != "DequantizeLinear" or pool.output[0] in outputs \
                or len(after) != 1 or after[0].op_type != "QuantizeLinear" or not _same_grid(dequantize, after[0], initializers):
            continue
        quantize, stem = after[0], pool.name or pool.output[0]
        pooling = {a.name: helper.get_attribute_value(a) for a in pool.attribute if a.name in NHWC_POOL_ATTRIBUTES}
        pooled = pool.output[0] + NHWC_POOLED_SUFFIX  # named so that the reader restores the pool's own output name
        nodes = [helper.make_node("Transpose", [dequantize.input[0]], [f"{stem}_nhwc_input"], name=f"{stem}_to_nhwc", perm=[0, 2, 3, 1]),
                 helper.make_node(NHWC_MAX_POOL, [f"{stem}_nhwc_input"], [pooled], name=pool.name, domain=MICROSOFT_DOMAIN, **pooling),
                 helper.make_node("Transpose", [pooled], [quantize.output[0]], name=f"{stem}_to_nchw", perm=[0, 3, 1, 2])]
        position = list(graph.node).index(pool)
        graph.node.remove(pool)
        graph.node.remove(quantize)
        _insert_at(graph, position, nodes)
        rewritten += 1
    if rewritten:
        if not any(o.domain == MICROSOFT_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
        _drop_unread(model)
    return rewritten


def channels_first_8bit_pools(model: onnx.ModelProto) -> set[str]:
    """The names of the MaxPool nodes ORT runs channels-first on 8-bit integers once it has
    optimized `model` (read from its own optimized graph, not guessed from the neighbours)."""
    from enginekit.onnx.session import optimized_graph

    if not any(n.op_type == "MaxPool" for n in model.graph.node):
        return set()
    optimized = optimized_graph(model).graph
    integers = {o for n in optimized.node if n.op_type == "QuantizeLinear" or n.op_type.startswith("QLinear") for o in n.output}
    integers |= {i.name for i in optimized.input if i.type.tensor_type.elem_type in (TensorProto.UINT8, TensorProto.INT8)}
    for node in optimized.node:  # in graph order: data movement and pooling keep their input's type
        if node.op_type in INTEGER_KEEPING_OPS and node.input and node.input[0] in integers:
            integers.update(node.output)
    return {n.name for n in optimized.node if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx") and n.name and n.input[0] in integers}


def _same_grid(dequantize: onnx.NodeProto, quantize: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """Whether both nodes use one per-tensor 8-bit grid, with their zero points given."""
    grid = activation_grid(dequantize, initializers)
    return len(dequantize.input) > 2 and len(quantize.input) > 2 and grid is not None and grid == activation_grid(quantize, initializers)


@dataclass(frozen=True)
class ClippedShift:
    """k * clip(x + c, 0, m) on a dequantized x: a hard sigmoid in any of its spellings."""

    x: str  # a DequantizeLinear's output
    shift: float  # c
    top: float  # m > 0
    gain: float  # k > 0
    replaced: tuple[onnx.NodeProto, ...]  # the float nodes it is, in graph order
    output: str


def integer_gates(model: onnx.ModelProto) -> dict[str, int]:
    """Make, in place, the gates of hard-swish, swish and squeeze-excitation blocks and the PReLUs
    integer for ORT (`integer_hard_sigmoids`, `integer_sigmoids`, `integer_prelus`); then a Mul or Add whose output is
    quantized but which reads one float tensor that a Q/DQ pair also carries reads the pair's
    output instead (`_read_quantized_twins`), so ORT fuses it too: x * gate, where x is a hard
    swish's or swish's output. Returns how many gates of each kind were rewritten."""
    counts = {"hard_sigmoids": integer_hard_sigmoids(model), "sigmoids": integer_sigmoids(model), "prelus": integer_prelus(model)}
    if any(counts.values()):
        _read_quantized_twins(model.graph)
        drop_unused_initializers(model)
    return counts


def integer_hard_sigmoids(model: onnx.ModelProto) -> int:
    """Rewrite, in place, the hard sigmoids and hard swishes that read a dequantized tensor into
    integer ops ORT fuses: k * clip(x + c, 0, m) becomes an Add of the constant c (QLinearAdd)
    whose QuantizeLinear has the grid [0, m], so saturation is the clip, read back by a
    DequantizeLinear with k times that step (the same integers stand for k * clip(...)); a
    HardSwish x * hard_sigmoid(x) becomes that and a Mul (QLinearMul).

    Why: ORT has no integer HardSigmoid/HardSwish, and inlines HardSwish as HardSigmoid x Mul,
    so each hard-swish block of a MobileNetV3 or PP-LCNet ran DequantizeLinear, HardSigmoid,
    Mul, QuantizeLinear in float between integer convolutions (PP-OCR cls: 27 of them, 40 % of
    its INT8 time; Keras MobileNetV3Small INT8 0.99x FP32, 1.29x with these rewrites). The
    clip's grid has 255 steps over [0, m] (m / 255 = 0.024 for hard swish's m = 6), finer
    than the hub's grid of x in every model tried. Returns how many were rewritten."""
    graph = model.graph
    rewritten = 0
    producers = tensor_producers(graph)
    initializers = {t.name: t for t in graph.initializer}
    for found in _clipped_shifts(graph):
        integer, highest = _grid_top(producers[found.x], initializers)
        low = _lowest(integer)
        stem = f"{found.replaced[0].name or found.output}_integer"
        # x + c never exceeds x's largest grid value + c: a grid up to there is finer and clips the same
        step = (min(found.top, highest + found.shift) if highest + found.shift > 0 else found.top) / GRID_STEPS
        result = found.output if found.replaced[-1].op_type != "HardSwish" else f"{stem}_gate"
        graph.initializer.extend([
            # c = (q - z) * |c| with q - z = sign(c): exact whatever c is
            _scalar(f"{stem}_c", low + (found.shift > 0), integer), _scalar(f"{stem}_c_zero", low + (found.shift < 0), integer),
            _scalar(f"{stem}_c_scale", abs(found.shift) or 1.0, TensorProto.FLOAT), _scalar(f"{stem}_zero", low, integer),
            _scalar(f"{stem}_step", step, TensorProto.FLOAT), _scalar(f"{stem}_gain_step", found.gain * step, TensorProto.FLOAT)])
        nodes = [helper.make_node("DequantizeLinear", [f"{stem}_c", f"{stem}_c_scale", f"{stem}_c_zero"], [f"{stem}_shift"], name=f"{stem}_shift"),
                 helper.make_node("Add", [found.x, f"{stem}_shift"], [f"{stem}_sum"], name=f"{stem}_add"),
                 helper.make_node("QuantizeLinear", [f"{stem}_sum", f"{stem}_step", f"{stem}_zero"], [f"{stem}_q"], name=f"{stem}_q"),
                 helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_gain_step", f"{stem}_zero"], [result], name=f"{stem}_dq")]
        if result != found.output:  # HardSwish: x * hard_sigmoid(x)
            nodes.append(helper.make_node("Mul", [found.x, result], [found.output], name=f"{stem}_mul"))
        _insert_at(graph, list(graph.node).index(found.replaced[0]), nodes)
        for node in found.replaced:
            graph.node.remove(node)
        rewritten += 1
    return rewritten


def integer_sigmoids(model: onnx.ModelProto) -> int:
    """Give, in place, every Sigmoid that reads a dequantized tensor, and whose output is neither
    quantized nor a graph output, a Q/DQ pair on [0, 1] (255 steps: a sigmoid's range, whatever
    the data), which ORT fuses with it into a QLinearSigmoid. Why: the hub keeps a swish's
    (x * sigmoid(x): EfficientNet, YOLO's SiLU) and a squeeze-excitation's gate float, so ORT
    ran DequantizeLinear, Sigmoid, Mul, QuantizeLinear in float between integer convolutions
    (a Keras EfficientNetB0: 65 Sigmoids and 49 Muls, INT8 0.86x FP32; none left and 1.16x with
    this). Returns how many Sigmoids it quantized."""
    graph = model.graph
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    initializers = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    quantized = 0
    for node in list(graph.node):
        source = producers.get(node.input[0]) if node.op_type == "Sigmoid" else None
        gate = node.output[0]
        if source is None or source.op_type != "DequantizeLinear" or gate in outputs \
                or any(r.op_type == "QuantizeLinear" for r in readers.get(gate, [])):
            continue
        integer, _ = _grid_top(source, initializers)
        stem = f"{node.name or gate}_integer"
        graph.initializer.extend([_scalar(f"{stem}_step", 1 / GRID_STEPS, TensorProto.FLOAT),
                                  _scalar(f"{stem}_zero", _lowest(integer), integer)])
        for reader in readers.get(gate, []):
            for i, name in enumerate(reader.input):
                if name == gate:
                    reader.input[i] = f"{stem}_dq"
        _insert_at(graph, list(graph.node).index(node) + 1, [
            helper.make_node("QuantizeLinear", [gate, f"{stem}_step", f"{stem}_zero"], [f"{stem}_q"], name=f"{stem}_q"),
            helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_step", f"{stem}_zero"], [f"{stem}_dq"], name=f"{stem}_dq")])
        quantized += 1
    return quantized


def integer_prelus(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every PRelu between a per-tensor DequantizeLinear and a quantized
    output whose slope is one constant per channel of a channel-first tensor into ops ORT runs in
    integer: prelu(x) = x + (slope - 1) * min(x, 0), the product a depthwise 1x1 Conv
    (QLinearConv, its per-channel int8 weight exactly +-127 steps of its factor), the sum a
    QLinearAdd that reads x's own integers. Where every slope is on one side of 1 the product's
    grid does the min: it ends at 0 and saturates what x > 0 gives ((slope - 1) * x has one sign
    there); with slopes on both sides x is first requantized onto its grid's negative half.

    Why: ORT has no integer PRelu, and its INT8 graph runs channels-last, where a float PRelu
    broadcasts its slope over rows of C values: MTCNN's P-Net spent 240 us of its 590 us INT8
    run in three PRelus that take 70 us in FP32 (channels-first). Why this form: x passes on its
    own grid and only the negative side is scaled, so the sum is about as exact as the float
    PRelu (slope * x + (1 - slope) * relu(x), two full-range products, cost MTCNN O-Net's box
    output 4 dB of SQNR), in two kernels where the float PRelu ran three. A PRelu with one slope
    is a LeakyRelu, which ORT runs as QLinearLeakyRelu (a lookup table). Returns how many were
    rewritten."""
    graph = model.graph
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    initializers = {t.name: t for t in graph.initializer}
    ranks: dict[str, int] | None = None
    rewritten = 0
    for node in list(graph.node):
        source = producers.get(node.input[0]) if node.op_type == "PRelu" and len(node.input) == 2 else None
        if source is None or source.op_type != "DequantizeLinear" or node.input[1] not in initializers \
                or not _quantized_later(node.output[0], readers):
            continue
        values = numpy_helper.to_array(initializers[node.input[1]])
        if not np.isfinite(values).all():
            continue
        if values.size == 1:  # one slope (nn.PReLU()'s default): a LeakyRelu, QLinearLeakyRelu in ORT
            node.CopyFrom(helper.make_node("LeakyRelu", [node.input[0]], list(node.output), name=node.name, alpha=float(values.ravel()[0])))
            rewritten += 1
            continue
        integer, top = _grid_top(source, initializers)
        bottom = _grid_bottom(source, initializers, top)
        if not np.isfinite(top) or not bottom < 0:
            continue
        if ranks is None:
            ranks = {name: len(dims) for name, dims in value_dims(onnx.shape_inference.infer_shapes(model)).items()}
        slope = _channel_slope(values, ranks.get(node.input[0], 0))
        if slope is None:
            continue
        stem, factor = f"{node.name or node.output[0]}_integer", slope - 1
        lane = _IntegerLane(graph, integer, ranks[node.input[0]] - 2)
        reach = factor * bottom  # (slope - 1) * min(x, 0) for each channel at x's lowest value
        if np.all(factor <= 0) or np.all(factor >= 0):
            product = lane.depthwise(f"{stem}_negative", node.input[0], factor, float(min(reach.min(), 0.0)), float(max(reach.max(), 0.0)))
        else:
            negative = lane.requantize(f"{stem}_min", node.input[0], bottom, 0.0)
            product = lane.depthwise(f"{stem}_negative", negative, factor, float(reach.min()), float(reach.max()))
        lane.nodes.append(helper.make_node("Add", [node.input[0], product], [node.output[0]], name=f"{stem}_add"))
        _insert_at(graph, list(graph.node).index(node), lane.nodes)
        graph.node.remove(node)
        rewritten += 1
    return rewritten


@dataclass
class _IntegerLane:
    """Builds Q/DQ pairs on chosen grids and per-channel products (depthwise 1x1 Convs)."""

    graph: onnx.GraphProto
    integer: int  # the activations' 8-bit type
    spatial: int  # spatial dims of the tensors
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    def requantize(self, name: str, x: str, low: float, high: float) -> str:
        """x on a grid over [low, high] (low <= 0 <= high; values outside saturate), dequantized."""
        step = (high - low) / GRID_STEPS or 1.0
        zero = _lowest(self.integer) + int(np.clip(round(-low / step), 0, GRID_STEPS))
        self.graph.initializer.extend([_scalar(f"{name}_step", step, TensorProto.FLOAT), _scalar(f"{name}_zero", zero, self.integer)])
        self.nodes += [helper.make_node("QuantizeLinear", [x, f"{name}_step", f"{name}_zero"], [f"{name}_q"], name=f"{name}_q"),
                       helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_step", f"{name}_zero"], [f"{name}_dq"], name=f"{name}_dq")]
        return f"{name}_dq"

    def depthwise(self, name: str, x: str, factor: np.ndarray, low: float, high: float) -> str:
        """x times one factor per channel, on a grid over [low, high] (values outside saturate)."""
        weight_step = np.where(factor != 0, np.abs(factor) / 127, 1.0).astype(np.float32)
        weights = np.round(factor / weight_step).astype(np.int8).reshape(-1, 1, *[1] * self.spatial)
        self.graph.initializer.extend([
            numpy_helper.from_array(weights, f"{name}_w"), numpy_helper.from_array(weight_step, f"{name}_w_step"),
            numpy_helper.from_array(np.zeros(len(factor), np.int8), f"{name}_w_zero")])
        self.nodes += [helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_w_step", f"{name}_w_zero"], [f"{name}_w_dq"],
                                        name=f"{name}_w_dq", axis=0),
                       helper.make_node("Conv", [x, f"{name}_w_dq"], [f"{name}_product"], name=f"{name}_conv", group=len(factor),
                                        kernel_shape=[1] * self.spatial)]
        return self.requantize(name, f"{name}_product", low, high)


def _quantized_later(tensor: str, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether a QuantizeLinear reads `tensor`, directly or after ops that only move data (ORT
    moves such a QuantizeLinear up to the tensor)."""
    return any(r.op_type == "QuantizeLinear" or (r.op_type in SAME_SCALE_OPS and _quantized_later(r.output[0], readers))
               for r in readers.get(tensor, []))


def _channel_slope(slope: np.ndarray, rank: int) -> np.ndarray | None:
    """A PRelu slope of several values as one value per channel of a rank-`rank` channel-first
    input ([C, 1, ...] or [1, C, 1, ...] broadcast from the right), or None."""
    if rank < 3 or slope.ndim > rank or slope.dtype != np.float32:
        return None
    shape = (1,) * (rank - slope.ndim) + slope.shape
    return slope.reshape(-1) if all(d == 1 for i, d in enumerate(shape) if i != 1) else None


def _clipped_shifts(graph: onnx.GraphProto) -> list[ClippedShift]:
    """Every HardSigmoid (alpha > 0), HardSwish, and Mul(Clip(Add(x, c), 0, m), k) chain (tf2onnx's
    Keras hard sigmoid) whose x is a DequantizeLinear's output and whose inner nodes nothing else
    reads."""
    producers, readers = tensor_producers(graph), tensor_readers(graph)
    outputs = {o.name for o in graph.output}
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if not t.dims or int(np.prod(t.dims)) == 1}

    def dequantized(name: str) -> bool:
        return name in producers and producers[name].op_type == "DequantizeLinear"

    def only_reader(name: str) -> onnx.NodeProto | None:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and name not in outputs else None

    def scalar(name: str) -> float | None:
        return float(constants[name].reshape(())) if name in constants else None

    found = []
    for node in graph.node:
        if node.op_type in ("HardSigmoid", "HardSwish") and dequantized(node.input[0]):
            alpha, beta = (attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)) if node.op_type == "HardSigmoid" else (1 / 6, 0.5)
            if alpha > 0:
                found.append(ClippedShift(node.input[0], beta / alpha, 1 / alpha, alpha, (node,), node.output[0]))
        elif node.op_type == "Add" and len(node.input) == 2:
            x, c = node.input if scalar(node.input[1]) is not None else node.input[::-1]
            clip = only_reader(node.output[0])
            if not dequantized(x) or scalar(c) is None or clip is None or clip.op_type != "Clip" or len(clip.input) != 3 \
                    or scalar(clip.input[1]) != 0.0 or not (scalar(clip.input[2]) or 0) > 0:
                continue
            mul = only_reader(clip.output[0])
            gain = next((scalar(b) for a, b in (mul.input, mul.input[::-1]) if a == clip.output[0]), None) \
                if mul is not None and mul.op_type == "Mul" else None
            if gain is not None and gain > 0:
                found.append(ClippedShift(x, scalar(c), scalar(clip.input[2]), gain, (node, clip, mul), mul.output[0]))
    return found


def _read_quantized_twins(graph: onnx.GraphProto) -> None:
    """A Mul or Add whose output is quantized and whose other inputs are dequantized, but which
    reads one float tensor that a QuantizeLinear -> DequantizeLinear pair also carries, reads the
    pair's output instead (ORT fuses DequantizeLinear -> Mul/Add -> QuantizeLinear only): a
    squeeze-excitation's x * gate, where x is a hard swish's output. PP-OCR cls INT8 on ORT: 1.25
    ms without it (16 Muls left float), 1.09 ms with it; PP-OCRv4 det map cosine 0.9903 -> 0.9901
    (x's quantization noise, which x's other readers see already)."""
    producers, readers = tensor_producers(graph), tensor_readers(graph)

    def twin(name: str) -> str | None:
        for quantize in readers.get(name, []):
            if quantize.op_type == "QuantizeLinear":
                dequantize = next((r for r in readers.get(quantize.output[0], []) if r.op_type == "DequantizeLinear"), None)
                if dequantize is not None:
                    return dequantize.output[0]
        return None

    for node in graph.node:
        if node.op_type not in ("Mul", "Add") or not any(r.op_type == "QuantizeLinear" for r in readers.get(node.output[0], [])):
            continue
        floating = [i for i, name in enumerate(node.input) if name not in producers or producers[name].op_type != "DequantizeLinear"]
        if len(floating) == 1 and node.input[floating[0]] in producers and (replacement := twin(node.input[floating[0]])):
            node.input[floating[0]] = replacement


def _grid_top(dequantize: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> tuple[int, float]:
    """A per-tensor DequantizeLinear's integer type and the largest value its grid stands for
    (infinity where its scale is not a scalar constant)."""
    zero = initializers.get(dequantize.input[2]) if len(dequantize.input) > 2 else None
    integer = zero.data_type if zero is not None else TensorProto.UINT8
    scale = initializers.get(dequantize.input[1])
    if scale is None or int(np.prod(scale.dims)) != 1:
        return integer, float("inf")
    z = float(numpy_helper.to_array(zero).ravel()[0]) if zero is not None else 0.0
    return integer, ((127 if integer == TensorProto.INT8 else 255) - z) * float(numpy_helper.to_array(scale).ravel()[0])


def _grid_bottom(dequantize: onnx.NodeProto, initializers: dict[str, onnx.TensorProto], highest: float) -> float:
    """The lowest value a per-tensor DequantizeLinear's grid stands for, given its highest
    (`_grid_top`; -inf where that is not finite: the scale is not a scalar constant)."""
    if not np.isfinite(highest):
        return float("-inf")
    scale = float(numpy_helper.to_array(initializers[dequantize.input[1]]).ravel()[0])
    return highest - GRID_STEPS * scale


def _lowest(integer: int) -> int:
    """The lowest integer of an 8-bit grid of this type: a zero point that puts 0.0 at the grid's
    bottom, for ranges that start at zero (a clip's, a sigmoid's)."""
    return -128 if integer == TensorProto.INT8 else 0


def _scalar(name: str, value: float, data_type: int) -> onnx.TensorProto:
    return helper.make_tensor(name, data_type, [], [value])


def _insert_at(graph: onnx.GraphProto, position: int, nodes: list[onnx.NodeProto]) -> None:
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def _drop_unread(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes nothing reads any more, and the initializers only they read."""
    graph = model.graph
    while True:
        read = graph_reads(graph) | {o.name for o in graph.output}
        unread = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not read & set(n.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    drop_unused_initializers(model)
