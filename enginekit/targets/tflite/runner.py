"""Run a .tflite artifact with the LiteRT interpreter (XNNPACK, configurable threads).

Feeds and outputs are float, as for every other target: an int8 (or uint8) input is quantized
with the scale and zero point recorded in the manifest, and integer outputs are dequantized the
same way, so accuracy compares like with like.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.errors import InputError, MissingDependencyError, one_line
from enginekit.core.tensors import Feeds, TensorSpec
from enginekit.targets.base import Runner

MODEL_FILE = "model.tflite"
_INTEGER_TYPES = (np.int8, np.uint8, np.int16)
# elements from which one np.clip pass beats np.maximum + np.minimum, which propagate NaN at a third
# of clip's speed (a 224x224x3 image: 0.24 -> 0.13 ms a call, of about 3.5 ms for efficientnet_lite0's int8 run)
LARGE_IO = 4096


def require_litert():
    try:
        from ai_edge_litert import interpreter
    except ImportError:
        raise MissingDependencyError("running .tflite files needs the 'tflite' extra (pip install 'enginekit[tflite]')") from None
    return interpreter


def undelegated_interpreter(model: bytes, **options: Any):
    """A LiteRT interpreter of the flatbuffer as written: builtin kernels, no XNNPACK delegate
    folding ops away, so every op and tensor the file holds is there to read (and `options`,
    such as experimental_preserve_all_tensors)."""
    litert = require_litert()
    return litert.Interpreter(model_content=model, experimental_op_resolver_type=litert.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, **options)


def quantize(values: np.ndarray, scale: float, zero_point: int, dtype: Any) -> np.ndarray:
    """round(values / scale) + zero_point, saturated to `dtype`. In place on one temporary: the
    runner does this on every call, and on a sub-millisecond model four temporaries (each a fresh
    allocation) cost as much as the int8 kernels save."""
    info = np.iinfo(dtype)
    scaled = np.asarray(np.divide(values, scale))  # a 0-d input divides into a numpy scalar
    np.rint(scaled, out=scaled)
    scaled += zero_point
    if scaled.size >= LARGE_IO:
        np.clip(scaled, info.min, info.max, out=scaled)
    else:  # np.clip's Python wrapper alone costs microseconds
        np.maximum(scaled, info.min, out=scaled)
        np.minimum(scaled, info.max, out=scaled)
    return scaled.astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    restored = np.asarray(np.subtract(values, zero_point, dtype=np.float32))
    restored *= np.float32(scale)
    return restored


def io_parameters(model: bytes) -> dict[str, dict[str, Any]]:
    """Dtype, scale and zero point of each signature input and output, by name (for the manifest)."""
    from enginekit.core.quiet import quiet_stderr

    with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        interpreter = require_litert().Interpreter(model_content=model)
    runner = interpreter.get_signature_runner()
    params = {}
    for kind, details in (("input", signature_inputs(runner)), ("output", runner.get_output_details())):
        for name, detail in details.items():
            scale, zero_point = detail["quantization"]
            params[name] = {"role": kind, "dtype": np.dtype(detail["dtype"]).name, "scale": float(scale), "zero_point": int(zero_point)}
    return params


def signature_inputs(signature: Any) -> dict[str, dict[str, Any]]:
    """A signature runner's input details by the model's own input names (signature_name undone)."""
    from enginekit.core.tf_support import model_input_name

    return {model_input_name(name): detail for name, detail in signature.get_input_details().items()}


def allocate(interpreter: Any) -> None:
    """Allocate an interpreter's tensors (again, after a resize). The XNNPACK delegate prepares its
    kernels here and refuses a quantization it does not take here (a SPLIT whose outputs' scales
    differ): the model's problem, so one line naming it, as a kernel failing at run time is."""
    from enginekit.core.quiet import quiet_stderr

    try:
        with quiet_stderr():  # (re-)allocating creates the XNNPACK delegate, which says so on stderr
            interpreter.allocate_tensors()
    except RuntimeError as exc:
        raise InputError(f"LiteRT cannot prepare the model: {one_line(exc, 300)}") from None


def _spec(name: str, detail: dict[str, Any]) -> TensorSpec:
    """A signature tensor as the runner presents it: LiteRT's -1 (the dynamic batch) becomes
    'batch', and integer-quantized I/O is float32 (the runner scales it)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.type in _INTEGER_TYPES and detail["quantization"][0]:
        dtype = np.dtype(np.float32)
    return TensorSpec(name, tuple(int(d) if d >= 0 else "batch" for d in detail["shape_signature"]), dtype.name)


class TfliteRunner(Runner):
    """One LiteRT interpreter; inputs resized when the batch changes (the model keeps a dynamic batch).
    Integer inputs and outputs are quantized and dequantized with the flatbuffer's own scale and
    zero point, so callers feed and read float32 like on every other target."""

    def __init__(self, model: str | Path | bytes, threads: int | None = None, io: dict[str, dict[str, Any]] | None = None):
        litert = require_litert()
        if not isinstance(model, bytes):
            from enginekit.core.loaders import check_tflite

            model = check_tflite(model)
        self.threads = threads or os.cpu_count() or 1
        from enginekit.core.quiet import quiet_stderr

        try:
            with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter = litert.Interpreter(model_content=model, num_threads=self.threads)
            signature = self.interpreter.get_signature_runner()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"LiteRT cannot load the model: {one_line(exc, 300)}") from None
        self._inputs = signature_inputs(signature)
        self._outputs = signature.get_output_details()
        del signature  # it pins tensor buffers, which would forbid resizing inputs
        self.io = io or {}
        for name, detail in {**self._inputs, **self._outputs}.items():
            recorded = self.io.get(name)
            actual = detail["quantization"]
            if recorded and recorded.get("scale") and not np.isclose(recorded["scale"], actual[0], rtol=1e-6):
                raise InputError(f"manifest scale of '{name}' ({recorded['scale']}) differs from the flatbuffer's ({actual[0]})")
        self.inputs = [_spec(name, detail) for name, detail in self._inputs.items()]
        self.outputs = [_spec(name, detail) for name, detail in self._outputs.items()]
        self._shapes: dict[str, tuple[int, ...]] = {}
        allocate(self.interpreter)

    def _prepare(self, feeds: Feeds) -> None:
        changed = False
        for name, detail in self._inputs.items():
            shape = feeds[name].shape
            if self._shapes.get(name) != shape:
                self.interpreter.resize_tensor_input(detail["index"], shape, strict=True)
                self._shapes[name] = shape
                changed = True
        if changed:
            allocate(self.interpreter)

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        self._prepare(feeds)
        for name, detail in self._inputs.items():
            value = feeds[name]
            dtype = detail["dtype"]
            if dtype in _INTEGER_TYPES and detail["quantization"][0] and value.dtype.kind == "f":
                scale, zero_point = detail["quantization"]
                value = quantize(value, scale, zero_point, dtype)
            self.interpreter.set_tensor(detail["index"], np.asarray(value, dtype=dtype, order="C"))  # ascontiguousarray makes scalars 1-D
        try:
            self.interpreter.invoke()
        except RuntimeError as exc:  # a kernel's check (an index out of bounds, a shape it refuses): this cell fails, the build goes on
            raise InputError(f"LiteRT failed running the model: {one_line(exc, 300)}") from None
        results = []
        for name in self._outputs:
            detail = self._outputs[name]
            value = self.interpreter.get_tensor(detail["index"])
            if detail["dtype"] in _INTEGER_TYPES and detail["quantization"][0]:
                value = dequantize(value, *detail["quantization"])
            results.append(value)
        return results

    def close(self) -> None:
        self.interpreter = None
