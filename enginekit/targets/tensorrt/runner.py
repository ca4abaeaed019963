"""Run a TensorRT plan: I/O bound by tensor name, CUDA through cuda-python, pinned host buffers,
CUDA-event timing of the GPU work apart from the copies.

A plan is specific to the TensorRT version and the GPU it was built on (and deserializing one is
running native code: load only plans you built). The manifest says which; a mismatch is a
clear error instead of a crash or a silently slow engine.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.artifacts import read_manifest
from enginekit.core.errors import EnginekitError, InputError
from enginekit.core.machine import gpu_info
from enginekit.core.tensors import Feeds, TensorSpec
from enginekit.targets.base import GPU_TIMING, Runner

PLAN_FILE = "model.plan"


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _native_handle(handle: Any) -> int:
    """The integer behind a cuda-python stream/event handle (int() is deprecated from 12.9.1)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(handle)
    return get_cuda_native_handle(handle)


class CudaError(EnginekitError):
    """A CUDA runtime call failed (one line naming the call and the error)."""


def _check(result: Any, call: str = "a CUDA call") -> Any:
    """cuda-python returns (error, value...) tuples; a failure becomes one line naming the call,
    and a driver older than the CUDA runtime says which versions do not match."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        name = getattr(error, "name", str(error))
        if "InsufficientDriver" in name:
            raise CudaError(f"{call} failed: the NVIDIA driver is too old for this CUDA runtime ({driver_versions()}); "
                            "use the TensorRT extra of your driver's CUDA major (tensorrt-cu12 for drivers r535+, tensorrt-cu13 for r580+)")
        raise CudaError(f"{call} failed: {name}")
    return values[0] if len(values) == 1 else tuple(values)


def driver_versions() -> str:
    """'driver supports CUDA X.Y, runtime is CUDA A.B' as far as cuda-python can tell."""
    cudart = _cudart()
    parts = []
    for label, function in (("the driver supports CUDA", "cudaDriverGetVersion"), ("the runtime is CUDA", "cudaRuntimeGetVersion")):
        try:
            error, version = getattr(cudart, function)()
            parts.append(f"{label} {version // 1000}.{version % 1000 // 10}" if int(error) == 0 else f"{label} unknown")
        except Exception:  # a broken binding must not hide the original error
            parts.append(f"{label} unknown")
    return ", ".join(parts)


def _host_array(pointer: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A numpy view of pinned host memory at `pointer` (no copy)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_byte * nbytes).from_address(pointer), dtype=dtype).reshape(shape)


def _numpy_dtype(trt: Any, dtype: Any) -> np.dtype:
    """trt.nptype raises TypeError for bf16/fp8/int4/fp4 I/O, which enginekit graphs never expose."""
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError:
        raise InputError(f"engine I/O type {dtype} has no numpy equivalent; enginekit engines keep float32/int I/O") from None


def check_compatible(built: dict[str, Any], trt_version: str, gpu: dict[str, Any] | None, folder: Path) -> None:
    if built.get("version") != trt_version:
        raise InputError(f"engine was built with TensorRT {built.get('version')}, this machine has {trt_version}; rebuild it here", folder)
    here = (gpu or {}).get("compute_capability")
    if built.get("compute_capability") != here or built.get("gpu") != (gpu or {}).get("name"):
        raise InputError(f"engine was built for {built.get('gpu')} (compute capability {built.get('compute_capability')}), "
                         f"this machine has {(gpu or {}).get('name')} ({here}); rebuild it here", folder)


class TensorRTRunner(Runner):
    """One engine and execution context, I/O by tensor name. Inputs must fit the engine's
    optimization profile (`max_batch` says how large a batch it takes); an engine whose output
    shapes depend on the data is refused (enginekit allocates outputs from inferred shapes)."""

    capabilities = frozenset({GPU_TIMING})

    def __init__(self, folder: str | Path, built: dict[str, Any] | None = None):
        """`built` is the manifest's `tensorrt` section (read from the folder when not given)."""
        from enginekit.targets.tensorrt.support import require_tensorrt

        trt = require_tensorrt()
        self.trt = trt
        self.cudart = _cudart()
        self._device: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)
        self._host: dict[str, tuple[int, int]] = {}
        self.stream = self.start_event = self.end_event = None
        folder = Path(folder)
        check_compatible(built or read_manifest(folder).get("tensorrt", {}), trt.__version__, gpu_info(), folder)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine((folder / PLAN_FILE).read_bytes())
        if self.engine is None:
            raise InputError("TensorRT could not deserialize the plan (corrupt, or built by another version)", folder / PLAN_FILE)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise CudaError("TensorRT could not create an execution context (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._output_tensors = [n for n in names if n not in self.input_names]
        self.inputs = [self._spec(n) for n in self.input_names]
        self.outputs = [self._spec(n) for n in self._output_tensors]
        self.max_batch = self._max_batch()
        try:
            self.stream = _check(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
            self.start_event = _check(self.cudart.cudaEventCreate(), "cudaEventCreate")
            self.end_event = _check(self.cudart.cudaEventCreate(), "cudaEventCreate")
        except BaseException:
            self.close()
            raise
        self.last_gpu_ms = 0.0

    def _spec(self, name: str) -> TensorSpec:
        shape = tuple(d if d >= 0 else "?" for d in self.engine.get_tensor_shape(name))
        return TensorSpec(name, shape, _numpy_dtype(self.trt, self.engine.get_tensor_dtype(name)).name)

    def _max_batch(self) -> int | None:
        """The largest leading dim every input's profile (profile 0) allows, where it is dynamic."""
        limits = []
        for name in self.input_names:
            if self.engine.get_tensor_shape(name)[0] < 0:
                _, _, largest = self.engine.get_tensor_profile_shape(name, 0)
                limits.append(int(largest[0]))
        return min(limits) if limits else None

    def _profile(self, name: str) -> str:
        low, _, high = self.engine.get_tensor_profile_shape(name, 0)
        return f"{list(low)}..{list(high)}"

    def _buffer(self, pool: dict, name: str, nbytes: int, pinned: bool) -> int:
        pointer, size = pool.get(name, (0, 0))
        if size < nbytes:
            if pointer:
                _check(self.cudart.cudaFreeHost(pointer) if pinned else self.cudart.cudaFree(pointer), "freeing a buffer")
                pool.pop(name)
            pointer = _check(self.cudart.cudaMallocHost(nbytes) if pinned else self.cudart.cudaMalloc(nbytes),
                             "cudaMallocHost" if pinned else "cudaMalloc")
            pool[name] = (pointer, nbytes)
        return pointer

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        cudart, kinds = self.cudart, self.cudart.cudaMemcpyKind
        if self.context is None:
            raise InputError("this TensorRT runner was closed")
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name], dtype=_numpy_dtype(self.trt, self.engine.get_tensor_dtype(name)))
            if not self.context.set_input_shape(name, array.shape):
                raise InputError(f"input '{name}' of shape {list(array.shape)} is outside the engine's optimization profile "
                                 f"{self._profile(name)}; rebuild it with a wider profile", option="profiles")
            host = self._buffer(self._host, name, array.nbytes, pinned=True)
            _host_array(host, array.dtype, array.shape)[...] = array
            device = self._buffer(self._device, name, array.nbytes, pinned=False)
            _check(cudart.cudaMemcpyAsync(device, host, array.nbytes, kinds.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync to the GPU")
            self.context.set_tensor_address(name, device)
        missing = self.context.infer_shapes()
        if missing:
            raise InputError(f"inputs {list(missing)} have no shape set (the feeds lack them?)")
        shapes = {}
        for name in self._output_tensors:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise InputError(f"output '{name}' has a shape that depends on the data ({list(shape)}); "
                                 "engines with data-dependent output shapes are not supported")
            dtype = _numpy_dtype(self.trt, self.engine.get_tensor_dtype(name))
            nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
            self.context.set_tensor_address(name, self._buffer(self._device, name, nbytes, pinned=False))
            shapes[name] = (shape, dtype, nbytes)
        _check(cudart.cudaEventRecord(self.start_event, self.stream), "cudaEventRecord")
        if not self.context.execute_async_v3(_native_handle(self.stream)):
            raise CudaError("TensorRT execute_async_v3 failed (its log above says why)")
        _check(cudart.cudaEventRecord(self.end_event, self.stream), "cudaEventRecord")
        outputs = []
        for name in self._output_tensors:
            shape, dtype, nbytes = shapes[name]
            host = self._buffer(self._host, name, nbytes, pinned=True)
            _check(cudart.cudaMemcpyAsync(host, self._device[name][0], nbytes, kinds.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync from the GPU")
            outputs.append((host, shape, dtype))
        _check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.last_gpu_ms = float(_check(cudart.cudaEventElapsedTime(self.start_event, self.end_event), "cudaEventElapsedTime"))
        return [_host_array(pointer, dtype, shape).copy() for pointer, shape, dtype in outputs]

    def close(self) -> None:
        """Free the device and pinned host buffers, the CUDA events and stream, and the engine's
        context (GPU memory is released here, deterministically, not whenever Python collects)."""
        cudart = getattr(self, "cudart", None)
        if cudart is None:
            return
        for pointer, _ in self._device.values():
            cudart.cudaFree(pointer)
        for pointer, _ in self._host.values():
            cudart.cudaFreeHost(pointer)
        self._device.clear()
        self._host.clear()
        for event in (self.start_event, self.end_event):
            if event is not None:
                cudart.cudaEventDestroy(event)
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
        self.stream = self.start_event = self.end_event = None
        self.context = self.engine = self.runtime = None
        self.cudart = None
