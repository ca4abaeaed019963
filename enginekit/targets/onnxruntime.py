"""ONNX Runtime target: the FP32 ONNX, or the Q/DQ INT8 ONNX (uint8 encoding: ORT's fast u8 x s8
kernels), run on the CPU execution provider. Which kernels really run is read from ORT's own
optimized graph (`integer_op_report`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from enginekit.core.errors import InputError
from enginekit.core.machine import toolchain
from enginekit.core.tensors import Feeds
from enginekit.onnx.session import Session
from enginekit.quantization.placement import COMPUTE_OPS, RECURRENT_OPS
from enginekit.targets.base import Built, BuildInputs, Runner, Serving, Target

if TYPE_CHECKING:
    import onnx

ONNX_FILES = ("model.int8.onnx", "model.onnx")
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm",
               "DynamicQuantizeMatMul", "QLinearConvTranspose"}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv", "ConvTranspose", *RECURRENT_OPS}
CHANNEL_ALIGNMENT = 4  # MLAS's symmetric int8 convolution (x86) takes input channels in multiples of 4


class OrtRunner(Runner):
    """A CPU InferenceSession (from checked bytes) behind the Runner contract: ORT's own fused
    integer kernels, as deployed (not the reference executor's exact Q/DQ simulation)."""

    def __init__(self, model: "str | Path | bytes | onnx.ModelProto", threads: int | None = None, **session: Any):
        self.session = Session(model, threads=threads, exact_qdq=False, **session)
        self.threads = threads
        self.inputs, self.outputs = self.session.inputs, self.session.outputs

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        values = self.session.run(feeds)
        return [values[name] for name in self.output_names]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def integer_op_report(path: str | Path, fp32: "onnx.ModelProto") -> dict:
    """Which kernels ONNX Runtime actually runs: the op types of its optimized graph, and how many
    of the FP32 graph's compute ops became integer ops (QLinearConv, QGemm, MatMulInteger...)."""
    from collections import Counter

    from enginekit.onnx.session import optimized_graph

    nodes = list(optimized_graph(path).graph.node)
    ops = Counter(node.op_type for node in nodes)
    compute = sum(1 for node in fp32.graph.node if node.op_type in COMPUTE_OPS | RECURRENT_OPS)
    integer = sum(count for op, count in ops.items() if op in INTEGER_OPS)
    floating = sum(count for op, count in ops.items() if op in FLOAT_COMPUTE_OPS)
    return {"compute_ops": compute, "integer_compute_ops": integer, "float_compute_ops": floating,
            "integer_share": integer / compute if compute else 0.0, "optimized_op_types": dict(sorted(ops.items())),
            "float_islands": float_islands(nodes)}


def float_islands(nodes: "list[onnx.NodeProto]") -> dict[str, int]:
    """Op types that run in float on dequantized integers (what an INT8 model that is not faster
    than FP32 spends its time on, besides the DequantizeLinear/QuantizeLinear around them)."""
    from collections import Counter

    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    islands = Counter(n.op_type for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                      and n.op_type not in INTEGER_OPS and any(i in dequantized for i in n.input))
    return dict(islands.most_common())


def align_input_channels(model: "onnx.ModelProto") -> int:
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
    from onnx import helper, numpy_helper

    from enginekit.onnx.nodes import attribute, tensor_producers

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
        position = list(graph.node).index(conv)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(position + offset, node)
        padded += 1
    if padded:
        _drop_unread(model)
    return padded


def _drop_unread(model: "onnx.ModelProto") -> None:
    """Remove Q/DQ nodes nothing reads any more, and the initializers only they read."""
    from enginekit.onnx.graph import drop_unused_initializers

    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unread = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not read & set(n.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    drop_unused_initializers(model)


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    precisions = ("fp32", "int8")
    encoding = "uint8"
    encodings = ("uint8", "int8", "mixed")  # ORT runs every encoding; uint8 is its fastest on x86
    placement = "outputs"  # ORT fuses QLinearConv/QLinearAdd/... only where the node's output is quantized too
    aliases = ("onnx",)  # export artifacts are plain ONNX, opened the same way
    serving = Serving(ONNX_FILES, triton_platform="onnxruntime_onnx", triton_default_file="model.onnx", ovms=True)

    def key_material(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"toolchain": toolchain("onnxruntime")}

    def build(self, inputs: BuildInputs) -> Built:
        if inputs.precision == "fp32":
            path = inputs.stage / "model.onnx"
            path.write_bytes(inputs.fp32.path.read_bytes())
            return Built(OrtRunner(path, threads=inputs.threads))
        import onnx

        path = inputs.stage / "model.int8.onnx"
        graph = onnx.ModelProto()
        graph.CopyFrom(inputs.qdq(inputs.encoding).model)
        align_input_channels(graph)
        onnx.save(graph, str(path))
        report = integer_op_report(path, inputs.fp32.proto)
        return Built(OrtRunner(path, threads=inputs.threads), {"integer_ops": report, "integer_share": report["integer_share"]})

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        path = next((folder / name for name in ONNX_FILES if (folder / name).is_file()), None)
        if path is None:
            raise InputError("artifact has no ONNX model", folder)
        return OrtRunner(path, threads=threads)

    def candidate_runner(self, candidate: BuildInputs) -> Runner | None:
        # its artifact is the Q/DQ graph itself, run by ORT's fused kernels
        return OrtRunner(candidate.qdq(candidate.encoding).model, threads=candidate.threads)


TARGET = OnnxRuntimeTarget()
