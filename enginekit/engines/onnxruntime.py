"""ONNX Runtime target: runs an ONNX file (FP32 or Q/DQ INT8) on the CPU execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from enginekit.models.spec import Feeds, TensorSpec

if TYPE_CHECKING:
    import onnx


class OrtRunner:
    """A CPU InferenceSession with explicit thread count; feeds and outputs are numpy arrays."""

    def __init__(self, model: str | Path | bytes, threads: int | None = None, optimized_model_path: str | Path | None = None,
                 memory_arena: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.enable_cpu_mem_arena = memory_arena  # off where many large outputs would pin arena memory
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if optimized_model_path is not None:
            options.optimized_model_filepath = str(optimized_model_path)
        if not isinstance(model, bytes):
            from enginekit.loaders import load_onnx

            model = load_onnx(model).SerializeToString()  # external data checked, never read by ORT itself
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            from enginekit.errors import InputError

            raise InputError(f"ONNX Runtime cannot load the model: {' '.join(str(exc).split())[:300]}") from None
        self.threads = threads
        self.inputs = [_spec(v) for v in self.session.get_inputs()]
        self.outputs = [_spec(v) for v in self.session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def infer(self, feeds: Feeds) -> list[np.ndarray]:
        return self.session.run(self._output_names, feeds)


_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_TYPES.get(node.type, node.type))


INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger", "QGemm",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
               "DynamicQuantizeMatMul"}
FLOAT_COMPUTE_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv"}


def integer_op_report(path: str | Path, fp32: "onnx.ModelProto") -> dict:
    """Which kernels ONNX Runtime actually runs: the op types of its optimized graph, and how many
    of the FP32 graph's compute ops became integer ops (QLinearConv, QGemm, MatMulInteger...)."""
    import tempfile
    from collections import Counter

    from enginekit.loaders import load_onnx

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        OrtRunner(path, optimized_model_path=optimized)
        ops = Counter(node.op_type for node in load_onnx(optimized).graph.node)
    compute = sum(1 for node in fp32.graph.node if node.op_type in ("Conv", "Gemm", "MatMul"))
    integer = sum(count for op, count in ops.items() if op in INTEGER_OPS and op not in ("QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat"))
    floating = sum(count for op, count in ops.items() if op in FLOAT_COMPUTE_OPS)
    return {"compute_ops": compute, "integer_compute_ops": integer, "float_compute_ops": floating,
            "integer_share": integer / compute if compute else 0.0, "optimized_op_types": dict(sorted(ops.items()))}
