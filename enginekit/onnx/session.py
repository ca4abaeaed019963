"""The reference executor: ONNX Runtime on the CPU, the FP32 truth every stage measures against
(parity, calibration, bias correction, the layer report, TFLite range matching, accuracy gates).

Sessions are created only from checked bytes: a path is parsed by the loaders module (external
data confined to the model's folder) and never opened by ONNX Runtime itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from enginekit.core.errors import InputError, one_line
from enginekit.core.interrupt import run_limit, stoppable_run
from enginekit.core.tensors import TensorSpec

if TYPE_CHECKING:
    import onnx

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def model_bytes(model: "str | Path | bytes | onnx.ModelProto") -> bytes:
    """Serialized model bytes; a path is read and checked by the loaders module first."""
    if isinstance(model, bytes):
        return model
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    from enginekit.core.loaders import load_onnx

    return load_onnx(model).SerializeToString()


class Session:
    """One CPU InferenceSession with an explicit thread count; feeds and outputs are numpy arrays.

    `spinning=False` stops idle intra-op threads from spinning: two sessions that take turns in
    one process (reference and candidate of an accuracy check) then do not slow each other.

    `exact_qdq` (the default: the reference executor) runs a Q/DQ graph as written, each
    DequantizeLinear -> float op -> QuantizeLinear (ONNX Runtime's QDQ fusion off): quantization
    simulated exactly, as every target computes it. ORT's fused integer kernels are what its own
    INT8 artifact runs (`exact_qdq=False`), but on an x86 CPU without VNNI their u8 x s8 pair
    sums saturate in int16 with int8 weights: the reference then judged TFLite's and TensorRT's
    int8 encodings by ORT's saturation (efficientnet_lite0 all-INT8 scored 0.818 top-1 agreement
    in the fallback search on an AVX2 EPYC, where the TFLite artifact itself reaches 0.92)."""

    def __init__(self, model: "str | Path | bytes | onnx.ModelProto", threads: int | None = None,
                 optimized_model_path: str | Path | None = None, memory_arena: bool = True, spinning: bool = True,
                 basic_optimizations_only: bool = False, exact_qdq: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # failures become enginekit's one-line errors, not ORT's log lines
        options.enable_cpu_mem_arena = memory_arena  # off where many large outputs would pin arena memory
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if exact_qdq:
            options.add_session_config_entry("session.disable_quant_qdq", "1")
        if optimized_model_path is not None:
            options.optimized_model_filepath = str(optimized_model_path)
        if basic_optimizations_only:  # semantics-preserving rewrites into standard ONNX ops only
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        data = model_bytes(model)
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise InputError(f"ONNX Runtime cannot load the model: {one_line(exc, 300)}") from None
        self.threads = threads
        self._run_options = ort.RunOptions
        self._stop = self._fresh_run_options()
        self.inputs = [_spec(v) for v in self.session.get_inputs()]
        self.outputs = [_spec(v) for v in self.session.get_outputs()]
        self.output_names = [o.name for o in self.outputs]

    def _fresh_run_options(self):
        options = self._run_options()
        options.log_severity_level = 4
        return options

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Outputs by name (all of them, or `names`). Ctrl-C stops the run even inside native code,
        and a run longer than the time limit (core.interrupt.run_time_limit) is stopped and fails."""
        names = list(names) if names is not None else self.output_names
        if self._stop.terminate:  # a stopped run leaves its flag set
            self._stop = self._fresh_run_options()
        with stoppable_run(self._stop, "an ONNX Runtime run", run_limit()):
            try:
                values = self.session.run(names, dict(feeds), self._stop)
            except Exception as exc:  # ORT's Fail/InvalidArgument/RuntimeException at inference time
                raise InputError(f"ONNX Runtime failed to run the model: {one_line(exc, 300)}") from None
        return dict(zip(names, values))


def optimized_graph(model: "str | Path | bytes | onnx.ModelProto", basic_only: bool = False) -> "onnx.ModelProto":
    """The graph ONNX Runtime makes of `model` when it loads it (all optimizations: the kernels
    it will really run; `basic_only`: only its semantics-preserving rewrites into standard ops)."""
    from enginekit.core.artifacts import scratch_dir
    from enginekit.core.loaders import load_onnx

    with scratch_dir("ort") as tmp:
        path = Path(tmp) / "optimized.onnx"
        Session(model, optimized_model_path=path, basic_optimizations_only=basic_only, exact_qdq=False)
        return load_onnx(path)


def _spec(node) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in node.shape)
    return TensorSpec(node.name, shape, _ORT_TYPES.get(node.type, node.type))
