"""Where Q/DQ pairs go in an FP32 graph.

Quantized nodes are the compute ops targets run in integer (Conv, Gemm, MatMul, and ungrouped
ConvTranspose inside an integer region where the placement is "inputs"), pooling ops
whose integer kernels fuse with them, and residual Adds that sit inside an integer region (their
output feeds a compute op). A tensor gets one Q/DQ pair when any quantized node reads it as an
activation; weights (initializers of Conv/Gemm/MatMul) are quantized per output channel. Ops
that only move data (MaxPool, Reshape, Flatten, Transpose...) reuse their input's scale so
targets can run them on integers without requantizing.

Two placements, chosen by the target:
- "inputs": Q/DQ only where a quantized node reads a tensor; float readers keep the float tensor.
  OpenVINO and TensorRT fuse the requantization into the producer themselves.
- "outputs": also a Q/DQ pair on the output of every quantized Conv, Add and average pooling
  (after a Relu/Clip that is its only reader), read by all its readers. ONNX Runtime fuses
  DQ -> Conv -> Q into QLinearConv (likewise QLinearAdd, QLinearAveragePool) only when the node's
  output is quantized; with inputs only, a Conv feeding an Add, PReLU or HardSwish runs as float
  behind a DequantizeLinear and the INT8 model is slower than FP32. MatMul and Gemm have integer
  kernels with float output (MatMulIntegerToFloat, QGemm), so their outputs stay float and lose
  nothing. Graph outputs stay float.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import onnx

from enginekit.core.errors import InputError
from enginekit.onnx.nodes import attribute, tensor_producers, tensor_readers

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Compute ops the hub leaves float (no Q/DQ placement for a recurrent cell here): an INT8 artifact's
# integer share counts them, so a GRU model whose only quantized layer is its head is not "100 %".
RECURRENT_OPS = {"GRU", "LSTM", "RNN"}
# Quantized only under the "inputs" placement: OpenVINO runs a Q/DQ ConvTranspose as an int8
# Deconvolution (TensorRT and TFLite have int8 transposed convolutions too), while ONNX Runtime's
# CPU provider (1.32) fuses no Q/DQ ConvTranspose and would run it in float behind a DequantizeLinear.
INPUTS_PLACEMENT_ONLY_OPS = {"ConvTranspose"}
# Quantized only inside an integer region (its output, through a Relu/Clip, reaches a compute op
# this placement quantizes, as for residual Adds; a ConvTranspose reader counts even when its own
# output leaves the region and it stays float, as in the head below). Measured on PP-OCRv4 det's head in OpenVINO (AMX Xeon): the
# ConvTranspose whose output feeds the next one ran 2x faster in int8 (259 -> 125 us), the last
# one, writing the float 320x320 map, 1.9x slower (358 -> 681 us): the model 3-5 % slower with
# both in int8. The output layer of a dense head is also where int8 costs the most accuracy.
INTEGER_REGION_ONLY_OPS = {"ConvTranspose"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean"}
SAME_SCALE_OPS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"}
PLACEMENTS = ("inputs", "outputs")
INTEGER_OUTPUT_OPS = {"Conv", "Add", "AveragePool", "GlobalAveragePool"}  # "outputs" placement: integer only with a quantized output
_FUSED_ACTIVATIONS = {"Relu", "Clip"}  # integer kernels clamp to the output range: these vanish behind a Q


@dataclass(frozen=True)
class WeightSpec:
    tensor: str  # initializer name
    node: str
    axis: int  # output-channel axis of the weight


@dataclass
class QuantPlan:
    nodes: list[str] = field(default_factory=list)  # names of quantized nodes, topological order
    activations: list[str] = field(default_factory=list)  # tensors that get a Q/DQ pair
    weights: list[WeightSpec] = field(default_factory=list)
    same_scale: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose scale it reuses
    consumers: dict[str, list[str]] = field(default_factory=dict)  # tensor -> quantized nodes reading it
    outputs: set[str] = field(default_factory=set)  # quantized at the producer: every reader reads the DQ

    def read_quantized(self, tensor: str, node: str) -> bool:
        return tensor in self.outputs or node in self.consumers.get(tensor, ())


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name (exclusions and reports refer to nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def excluded_node_names(graph: onnx.GraphProto, names: Iterable[str]) -> set[str]:
    """The nodes `names` keep float: a node's name, or the name of a tensor a node writes (what
    a failed gate's message names: "the layers adding the most error"). A name that is neither
    is refused: it had kept nothing float without a word (a user passing the tensor names of the
    gate's message got the same all-INT8 graph and the same message back)."""
    nodes = {n.name for n in graph.node}
    writers = tensor_producers(graph)
    unknown = [name for name in names if name not in nodes and name not in writers]
    if unknown:
        raise InputError(f"no node or node output of the model is named {', '.join(map(repr, unknown[:3]))}"
                         f"{f' (and {len(unknown) - 3} more)' if len(unknown) > 3 else ''}", option="exclude_nodes")
    return {name if name in nodes else writers[name].name for name in names}


def plan_quantization(
    model: onnx.ModelProto,
    exclude_nodes: Iterable[str] = (),
    exclude_ops: Iterable[str] = (),
    keep_first_last_float: bool = False,
    exclude_after: Iterable[str] = (),
    placement: str = "inputs",
) -> QuantPlan:
    """`exclude_after` keeps in float every compute op that reads the output of one of these op
    types (e.g. "Gelu": the FFN down-projection of a transformer, whose input has outliers).
    `placement`: "inputs" or "outputs" (see the module's docstring)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {PLACEMENTS}")
    ensure_node_names(model)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = set(initializers) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    readers = tensor_readers(graph)
    excluded_names, excluded_ops = excluded_node_names(graph, exclude_nodes), set(exclude_ops)
    compute = [n for n in graph.node if is_quantizable_compute(n, placement)]
    if keep_first_last_float and compute:
        excluded_names |= {compute[0].name, compute[-1].name}
    after = set(exclude_after)
    if after:
        producers = {o: n for n in graph.node for o in n.output}
        excluded_names |= {n.name for n in compute if _source_op(n.input[0], producers) in after}

    def allowed(node: onnx.NodeProto) -> bool:
        return node.name not in excluded_names and node.op_type not in excluded_ops

    def feeds_compute(tensor: str, depth: int = 0, through: frozenset[str] = frozenset()) -> bool:
        """True if `tensor` reaches a quantized compute op, directly or through data movement
        (and the op types in `through`)."""
        for reader in readers.get(tensor, []):
            if is_quantizable_compute(reader, placement) and allowed(reader):
                return True
            if reader.op_type in SAME_SCALE_OPS | POOL_OPS and reader.input[0] != tensor:
                continue  # a Reshape's shape: not the data it moves
            if (depth < 4 and reader.op_type in SAME_SCALE_OPS | POOL_OPS | {"Add"} | through
                    and any(feeds_compute(output, depth + 1, through) for output in reader.output if output)):
                return True
        return False

    plan = QuantPlan()
    for node in graph.node:
        if not allowed(node):
            continue
        activation_inputs = [i for i in node.input[:2] if i and i not in constants]
        if node.op_type in COMPUTE_OPS:
            if not is_quantizable_compute(node, placement):
                continue
            if node.op_type in INTEGER_REGION_ONLY_OPS and not feeds_compute(node.output[0], through=frozenset(_FUSED_ACTIVATIONS)):
                continue
            weights = [i for i in node.input[:2] if i in initializers]
            if not activation_inputs:
                continue
            for weight in weights:
                plan.weights.append(WeightSpec(weight, node.name, _channel_axis(node, weight, initializers[weight])))
        elif node.op_type in POOL_OPS:
            if not feeds_compute(node.output[0]):
                continue
        elif node.op_type == "Add":  # a ResNet's Add -> Relu -> Conv is inside the region as much as MobileNet's Add -> Conv
            if len(activation_inputs) != 2 or not feeds_compute(node.output[0], through=frozenset(_FUSED_ACTIVATIONS)):
                continue
        else:
            continue
        plan.nodes.append(node.name)
        for tensor in activation_inputs:
            plan.consumers.setdefault(tensor, []).append(node.name)
            if tensor not in plan.activations:
                plan.activations.append(tensor)
    if placement == "outputs":
        _quantize_outputs(plan, graph, readers)
    producers = {o: n for n in graph.node for o in n.output}
    activations = set(plan.activations)
    for tensor in plan.activations:
        # back through ops that keep their input's grid (Reshape -> Transpose -> a compute op's
        # input) to the nearest quantized tensor: ORT drops a pair around such an op only where
        # both sides are on one grid
        producer, source = producers.get(tensor), None
        while producer is not None and producer.op_type in SAME_SCALE_OPS and producer.input and source is None:
            source = producer.input[0] if producer.input[0] in activations else None
            producer = producers.get(producer.input[0])
        if source is not None:
            plan.same_scale[tensor] = source
    for tensor in plan.same_scale:  # a chain (YOLO's SPPF: MaxPool -> MaxPool -> MaxPool) shares its first tensor's grid
        while plan.same_scale[tensor] in plan.same_scale and plan.same_scale[tensor] != tensor:
            plan.same_scale[tensor] = plan.same_scale[plan.same_scale[tensor]]
    return plan


def is_quantizable_compute(node: onnx.NodeProto, placement: str) -> bool:
    """Whether the plan quantizes this compute node under `placement`: a ConvTranspose only
    ungrouped (its weight is [C_in, C_out / group, kH, kW], so a per-output-channel scale exists
    only for group 1) and only where the placement is "inputs" (INPUTS_PLACEMENT_ONLY_OPS)."""
    if node.op_type not in COMPUTE_OPS:
        return False
    if node.op_type in INPUTS_PLACEMENT_ONLY_OPS:
        return placement == "inputs" and attribute(node, "group", 1) == 1
    return True


def _source_op(tensor: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    """The op type that computed `tensor`, looking through ops that only move data (a Softmax
    whose output is reshaped before the attention MatMul is still the Softmax)."""
    node = source_node(tensor, producers)
    return node.op_type if node is not None else None


def source_node(tensor: str, producers: dict[str, onnx.NodeProto], through: Iterable[str] = SAME_SCALE_OPS) -> onnx.NodeProto | None:
    """The node that computed `tensor`, looking back through the op types in `through`."""
    through = set(through)
    node = producers.get(tensor)
    while node is not None and node.op_type in through and node.input:
        node = producers.get(node.input[0])
    return node


def _quantize_outputs(plan: QuantPlan, graph: onnx.GraphProto, readers: dict[str, list[onnx.NodeProto]]) -> None:
    """A Q/DQ pair on the output of each quantized node of INTEGER_OUTPUT_OPS (after a Relu/Clip
    that is its only reader), unless it is a graph output."""
    graph_outputs = {o.name for o in graph.output}
    by_name = {n.name: n for n in graph.node}
    for name in list(plan.nodes):
        node = by_name[name]
        if node.op_type not in INTEGER_OUTPUT_OPS:
            continue
        tensor = node.output[0]
        following = readers.get(tensor, [])
        if len(following) == 1 and following[0].op_type in _FUSED_ACTIVATIONS and tensor not in graph_outputs:
            tensor = following[0].output[0]
        if tensor in graph_outputs or not readers.get(tensor):
            continue
        plan.outputs.add(tensor)
        if tensor not in plan.activations:
            plan.activations.append(tensor)


def _channel_axis(node: onnx.NodeProto, weight: str, tensor: onnx.TensorProto) -> int:
    return weight_channel_axis(node, list(node.input).index(weight), len(tensor.dims))


def weight_channel_axis(node: onnx.NodeProto, input_index: int, rank: int) -> int:
    """The axis of a weight that indexes the op's output channels (its per-channel scale axis),
    for the weight at `input_index` of `node`: Conv OIHW -> 0; ConvTranspose IOHW -> 1; Gemm B -> 0 with transB else 1,
    Gemm A -> 1 with transA else 0; MatMul B (..., K, N) -> the last axis, MatMul A (..., M, K)
    -> the second to last (its rows are the output's rows). The TensorRT rule check asks this
    same function, so the two can never disagree."""
    attributes = {a.name: a.i for a in node.attribute}
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        if input_index == 1:
            return 0 if attributes.get("transB", 0) else 1
        return 1 if attributes.get("transA", 0) else 0
    return rank - 1 if input_index == 1 else max(rank - 2, 0)
