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
from enginekit.quantization.encoding import TARGET_ENCODING
from enginekit.quantization.placement import COMPUTE_OPS, RECURRENT_OPS
from enginekit.targets.onnxruntime_channels import align_output_channels
from enginekit.targets.onnxruntime_graph import align_input_channels, channels_last_max_pools, integer_gates
from enginekit.targets.base import Built, BuildInputs, Runner, Serving, Target

if TYPE_CHECKING:
    import onnx

ONNX_FILES = ("model.int8.onnx", "model.onnx")
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm",
               "DynamicQuantizeMatMul", "QLinearConvTranspose"}
TENSORRT_ENCODING = TARGET_ENCODING["tensorrt"]
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv", "ConvTranspose", *RECURRENT_OPS}


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
    floating = sum(count for op, count in ops.items() if op in FLOAT_COMPUTE_OPS)
    # the artifact's own integer ops (a PReLU's depthwise product) are not compute ops of the model
    integer = min(sum(count for op, count in ops.items() if op in INTEGER_OPS), max(compute - floating, 0))
    return {"compute_ops": compute, "integer_compute_ops": integer, "float_compute_ops": floating,
            "integer_share": integer / compute if compute else 0.0, "optimized_op_types": dict(sorted(ops.items())),
            "float_islands": float_islands(nodes), "requantizing_ops": requantizing_ops(ops)}


def requantizing_ops(ops: Mapping[str, int]) -> dict[str, int]:
    """The optimized graph's integer ops that are not compute ops (QLinearAdd, QLinearMul,
    QLinearSigmoid, pools...) and its QuantizeLinear/DequantizeLinear: each reads 8-bit values
    and requantizes them onto another grid, a pass over the tensor that FP32 fuses into its
    convolutions or skips (PP-OCR cls's hard swishes and SE products: QLinearAdd x34, QLinearMul
    x27, the reason its all-integer INT8 is slower than FP32 in ONNX Runtime)."""
    found = {op: count for op, count in ops.items()
             if (op.startswith("QLinear") and op not in INTEGER_OPS) or op in ("QuantizeLinear", "DequantizeLinear")}
    return dict(sorted(found.items(), key=lambda item: (-item[1], item[0])))


def float_islands(nodes: "list[onnx.NodeProto]") -> dict[str, int]:
    """Op types that run in float on dequantized integers (what an INT8 model that is not faster
    than FP32 spends its time on, besides the DequantizeLinear/QuantizeLinear around them)."""
    from collections import Counter

    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    islands = Counter(n.op_type for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                      and n.op_type not in INTEGER_OPS and any(i in dequantized for i in n.input))
    return dict(islands.most_common())


def artifact_graph(qdq: "onnx.ModelProto", encoding: str = "uint8") -> "tuple[onnx.ModelProto, dict[str, Any]]":
    """The INT8 artifact's graph: a copy of the Q/DQ hub's with the first convolutions' input
    channels aligned, narrow convolutions widened to 16 output channels (onnxruntime_channels.py),
    the gates of hard-swish, swish and squeeze-excitation blocks made integer and 8-bit max pools
    channels-last (onnxruntime_graph.py), and what it rewrote: {"integer_gates": {kind: count},
    "widened_convolutions": count, "channels_last_max_pools": count}. Neither the widening nor
    the pools in TensorRT's symmetric "int8" encoding: that graph is the one a TensorRT engine is
    built from (deploy --plan-tensorrt), and TensorRT's parser reads no ONNX Runtime op."""
    import onnx

    graph = onnx.ModelProto()
    graph.CopyFrom(qdq)
    align_input_channels(graph)
    ort_only = encoding != TENSORRT_ENCODING
    widened = align_output_channels(graph) if ort_only else 0
    gates = integer_gates(graph)
    pools = channels_last_max_pools(graph) if ort_only else 0
    return graph, {"integer_gates": gates, "widened_convolutions": widened, "channels_last_max_pools": pools}


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
        graph, rewrites = artifact_graph(inputs.qdq(inputs.encoding).model, inputs.encoding)
        onnx.save(graph, str(path))
        report = integer_op_report(path, inputs.fp32.proto)
        report.update(rewrites)
        return Built(OrtRunner(path, threads=inputs.threads), {"integer_ops": report, "integer_share": report["integer_share"]})

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        path = next((folder / name for name in ONNX_FILES if (folder / name).is_file()), None)
        if path is None:
            raise InputError("artifact has no ONNX model", folder)
        return OrtRunner(path, threads=threads)

    def candidate_runner(self, candidate: BuildInputs) -> Runner | None:
        # its artifact is the Q/DQ graph as `build` rewrites it, run by ORT's fused kernels
        return OrtRunner(artifact_graph(candidate.qdq(candidate.encoding).model, candidate.encoding)[0], threads=candidate.threads)


TARGET = OnnxRuntimeTarget()
