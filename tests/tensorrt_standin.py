"""A recording stand-in for the `tensorrt` and cuda-python modules, modelled on TensorRT 10.16 and
11.1's Python bindings (pyCore.cpp) and cuda.bindings.runtime: only names those versions have,
the flag values of each version (STRONGLY_TYPED is 1 in 10.x and 0 in 11.x, EXPLICIT_BATCH gone
in 11.x, no precision builder flags), `bool`/`None` results where the bindings return them, and
cuda-python's `(error, value)` tuples. Every call is recorded, so a test checks the adapter's
whole call sequence; the "engine" runs the ONNX graph it was built from with ONNX Runtime,
reading and writing the "device" buffers the runner allocated, so results are real numbers."""

from __future__ import annotations

import ctypes
import enum
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class CudaError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2
    cudaErrorInsufficientDriver = 35


@dataclass
class Behaviour:
    """What the stand-in does differently from a healthy install."""

    version: str = "11.1.0"
    parse_ok: bool = True
    cache_accepted: bool = True  # set_timing_cache's result (False: the cache header does not match the device)
    cache_missing: bool = False  # get_timing_cache() returns None
    context_fails: bool = False  # create_execution_context() returns None (out of memory)
    data_dependent: bool = False  # output shapes stay -1 after the input shapes are set
    stream_error: CudaError = CudaError.cudaSuccess  # what cudaStreamCreate reports
    driver_cuda: int = 13000
    runtime_cuda: int = 13000
    max_batch: int | None = None  # the profile's max batch the stand-in builder records (None: as asked)


@dataclass
class StandIn:
    behaviour: Behaviour
    calls: list[tuple] = field(default_factory=list)
    built_profiles: dict[str, tuple] = field(default_factory=dict)
    memory: dict[int, Any] = field(default_factory=dict)  # address -> ctypes buffer (host and "device" alike)

    def names(self) -> list[str]:
        return [call[0] for call in self.calls]


def make(behaviour: Behaviour | None = None) -> tuple[types.SimpleNamespace, types.SimpleNamespace, StandIn]:
    """(tensorrt module, cuda runtime module, recorder) stand-ins."""
    behaviour = behaviour or Behaviour()
    state = StandIn(behaviour)
    calls = state.calls
    major = int(behaviour.version.split(".")[0])
    flags = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2} if major >= 11 else \
        {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3}

    class DataType(enum.Enum):
        FLOAT = 0
        INT64 = 1

    class TensorIOMode(enum.Enum):
        INPUT = 1
        OUTPUT = 2

    class Logger:
        WARNING = 2

        def __init__(self, level):
            calls.append(("Logger", level))

    class Cache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return b"cache:" + self.data

    class Profile:
        def set_shape(self, name, low, opt, high):
            calls.append(("set_shape", name, tuple(low), tuple(opt), tuple(high)))
            high = tuple(high)
            if behaviour.max_batch is not None:
                high = (behaviour.max_batch, *high[1:])
            state.built_profiles[name] = (tuple(low), tuple(opt), high)

    class Config:
        builder_optimization_level = 3

        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("set_memory_pool_limit", pool, size))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.data, ignore_mismatch))
            accepted = behaviour.cache_accepted or cache.data == b""
            if accepted:
                self.cache = cache
            return accepted

        def get_timing_cache(self):
            calls.append(("get_timing_cache",))
            return None if behaviour.cache_missing else self.cache

    class Network:
        def __init__(self):
            self.source = None

    class Parser:
        def __init__(self, network, logger):
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path):
            calls.append(("parse_from_file", str(path)))
            if not behaviour.parse_ok:
                self.num_errors = 1
                return False
            with open(path, "rb") as fh:
                self.network.source = fh.read()
            return True

        def get_error(self, index):
            return types.SimpleNamespace(node_name=lambda: "conv_7", node_operator=lambda: "FancyConv", desc=lambda: "unsupported attribute")

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return network.source

    class Engine:
        def __init__(self, onnx_bytes: bytes):
            import onnxruntime as ort

            self.session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.io = [(i.name, TensorIOMode.INPUT, i) for i in self.session.get_inputs()] + \
                      [(o.name, TensorIOMode.OUTPUT, o) for o in self.session.get_outputs()]
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, index):
            return self.io[index][0]

        def get_tensor_mode(self, name):
            return next(mode for n, mode, _ in self.io if n == name)

        def get_tensor_shape(self, name):
            node = next(info for n, _, info in self.io if n == name)
            return [d if isinstance(d, int) else -1 for d in node.shape]

        def get_tensor_dtype(self, name):
            node = next(info for n, _, info in self.io if n == name)
            return DataType.INT64 if "int64" in node.type else DataType.FLOAT

        def get_tensor_profile_shape(self, name, profile_index):
            return state.built_profiles[name]

        def create_execution_context(self):
            calls.append(("create_execution_context",))
            return None if behaviour.context_fails else Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            calls.append(("set_input_shape", name, tuple(shape)))
            low, _, high = state.built_profiles[name]
            if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, address):
            calls.append(("set_tensor_address", name))
            self.addresses[name] = address
            return True

        def infer_shapes(self):
            calls.append(("infer_shapes",))
            return [n for n, mode, _ in self.engine.io if mode is TensorIOMode.INPUT and n not in self.shapes]

        def get_tensor_shape(self, name):
            calls.append(("get_tensor_shape", name))
            node = next(info for n, _, info in self.engine.io if n == name)
            batch = next(iter(self.shapes.values()))[0]
            if behaviour.data_dependent:
                return [-1 for _ in node.shape]
            return [d if isinstance(d, int) else batch for d in node.shape]

        def execute_async_v3(self, stream_handle):
            calls.append(("execute_async_v3", stream_handle))
            feeds = {}
            for name, mode, info in self.engine.io:
                if mode is TensorIOMode.INPUT:
                    dtype = np.int64 if "int64" in info.type else np.float32
                    count = int(np.prod(self.shapes[name]))
                    feeds[name] = np.frombuffer(state.memory[self.addresses[name]], dtype=dtype, count=count).reshape(self.shapes[name])
            outputs = self.engine.session.run(None, feeds)
            for (name, mode, _), value in zip([io for io in self.engine.io if io[1] is TensorIOMode.OUTPUT], outputs):
                data = np.ascontiguousarray(value, np.float32).tobytes()
                ctypes.memmove(self.addresses[name], data, len(data))
            return True

    class Runtime:
        def __init__(self, logger):
            calls.append(("Runtime",))

        def deserialize_cuda_engine(self, plan):
            calls.append(("deserialize_cuda_engine",))
            try:
                return Engine(bytes(plan))
            except Exception:
                return None

    def nptype(dtype):
        return {DataType.FLOAT: np.float32, DataType.INT64: np.int64}[dtype]

    trt = types.SimpleNamespace(
        __version__=behaviour.version, Logger=Logger, Builder=Builder, OnnxParser=Parser, Runtime=Runtime,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(**flags), MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"),
        BuilderFlag=types.SimpleNamespace(), TensorIOMode=TensorIOMode, DataType=DataType, nptype=nptype,
    )

    def allocate(kind: str):
        def malloc(nbytes):
            calls.append((kind, nbytes))
            buffer = (ctypes.c_byte * nbytes)()
            state.memory[ctypes.addressof(buffer)] = buffer
            return CudaError.cudaSuccess, ctypes.addressof(buffer)

        return malloc

    def free(kind: str):
        def release(pointer):
            calls.append((kind, pointer))
            state.memory.pop(pointer, None)
            return (CudaError.cudaSuccess,)

        return release

    def memcpy(dst, src, nbytes, kind, stream):
        calls.append(("cudaMemcpyAsync", kind))
        ctypes.memmove(dst, src, nbytes)
        return (CudaError.cudaSuccess,)

    handles = iter(range(1000, 2000))
    cudart = types.SimpleNamespace(
        cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H"),
        cudaStreamCreate=lambda: (calls.append(("cudaStreamCreate",)) or behaviour.stream_error,
                                  next(handles) if behaviour.stream_error == CudaError.cudaSuccess else None),
        cudaEventCreate=lambda: (calls.append(("cudaEventCreate",)) or CudaError.cudaSuccess, next(handles)),
        cudaEventRecord=lambda event, stream: (calls.append(("cudaEventRecord",)) or CudaError.cudaSuccess,),
        cudaEventElapsedTime=lambda start, end: (calls.append(("cudaEventElapsedTime",)) or CudaError.cudaSuccess, 0.25),
        cudaStreamSynchronize=lambda stream: (calls.append(("cudaStreamSynchronize",)) or CudaError.cudaSuccess,),
        cudaEventDestroy=lambda event: (calls.append(("cudaEventDestroy",)) or CudaError.cudaSuccess,),
        cudaStreamDestroy=lambda stream: (calls.append(("cudaStreamDestroy",)) or CudaError.cudaSuccess,),
        cudaMalloc=allocate("cudaMalloc"), cudaMallocHost=allocate("cudaMallocHost"),
        cudaFree=free("cudaFree"), cudaFreeHost=free("cudaFreeHost"), cudaMemcpyAsync=memcpy,
        cudaDriverGetVersion=lambda: (CudaError.cudaSuccess, behaviour.driver_cuda),
        cudaRuntimeGetVersion=lambda: (CudaError.cudaSuccess, behaviour.runtime_cuda),
    )
    return trt, cudart, state
