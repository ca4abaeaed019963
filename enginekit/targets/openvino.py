"""OpenVINO target: IR (.xml/.bin) for Intel CPUs in FP32, BF16, FP16 (compressed weights) and
INT8 (from the Q/DQ ONNX in the "mixed" encoding), with the executed precision proven.

Precision is never taken on trust: after compiling, the runtime graph says which kernels run
(`runtimePrecision` of every Convolution/MatMul/FullyConnected), and that share goes into the
manifest. FP32 is compiled with INFERENCE_PRECISION_HINT=f32, because without it OpenVINO runs
an "fp32" IR in bf16 on CPUs that have bf16; BF16 is refused on CPUs without it.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.core.errors import InputError, MissingDependencyError, one_line
from enginekit.core.machine import toolchain
from enginekit.core.optional import require
from enginekit.core.tensors import Feeds, TensorSpec
from enginekit.targets.base import STREAMS, Built, BuildInputs, Runner, Serving, Target

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
XML, BIN = "model.xml", "model.bin"
_COMPUTE_LAYERS = ("Convolution", "Deconvolution", "MatMul", "FullyConnected", "RNNSeq", "RNNCell")  # RNN*: GRU/LSTM/RNN, left float
_INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}


def require_openvino():
    """OpenVINO, imported with its telemetry switched off: `import openvino` and every conversion
    would otherwise send usage events to Google Analytics from a helper process and write
    ~/intel. With `openvino_telemetry` unimportable, OpenVINO falls back to its own no-op stub."""
    import sys

    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    return require("openvino", "openvino", "the openvino target")


def device_info() -> dict[str, Any]:
    ov = require_openvino()
    core = ov.Core()
    return {"device": "CPU", "full_name": core.get_property("CPU", "FULL_DEVICE_NAME"),
            "capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")), "openvino": ov.__version__}


def unavailable_reason(precision: str) -> str | None:
    """Why OpenVINO cannot build `precision` here: the library is absent, or bf16 on a CPU without it."""
    try:
        require_openvino()
    except MissingDependencyError as exc:
        return str(exc)
    if precision == "bf16":
        info = device_info()
        if "BF16" not in info["capabilities"]:
            return (f"this CPU ({info['full_name']}) has no bf16 support (OPTIMIZATION_CAPABILITIES: {', '.join(info['capabilities'])}); "
                    "OpenVINO would emulate or fall back, so bf16 is refused")
    return None


def convert(onnx_path: Path, precision: str, folder: Path, made_from: str | Path | None = None, qdq: bool = False) -> None:
    """ONNX -> IR in `folder` (model.xml + model.bin); FP16 compresses the weights. `made_from`:
    the user's model `onnx_path` was made from (the export in the cache, or, with `qdq`, the INT8
    Q/DQ graph in the staging folder), which is what a failure names: the user knows that file."""
    ov = require_openvino()
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO raises its own OpConversionFailure / GeneralFailure types
        what = "the model's INT8 Q/DQ graph" if qdq else "the model"
        raise InputError(f"OpenVINO cannot convert {what}: {_conversion_problem(str(exc), onnx_path)}", made_from or onnx_path) from None
    name_generated_ops(model, onnx_names(onnx_path))
    ov.save_model(model, str(folder / XML), compress_to_fp16=precision == "fp16")


def name_generated_ops(model, kept: set[str]) -> None:
    """Rename the ops OpenVINO named itself. Such a name is an op type and a counter global to
    the process ('Constant_31221'; a folded op's constant keeps its source's, 'Range_40'), so the
    IR's bytes depend on what the process converted before: a build in a matrix worker would
    differ from the same build in one process. Each becomes its type and its place in the graph
    ('Range_ek19'), which depends only on the graph. Names the ONNX file has (`kept`, its node and
    tensor names, which the ONNX frontend carries over) stay as they are."""
    for index, op in enumerate(model.get_ordered_ops()):
        name = op.get_friendly_name()
        match = _GENERATED_NAME.fullmatch(name)
        if match and name not in kept:
            op.set_friendly_name(f"{match.group(1)}_ek{index}")


_GENERATED_NAME = re.compile(r"([A-Za-z][A-Za-z0-9]*)_\d+")


def onnx_names(onnx_path: Path) -> set[str]:
    """Every node and tensor name of an ONNX file."""
    from enginekit.core.loaders import load_onnx

    graph = load_onnx(onnx_path).graph
    names = {node.name for node in graph.node}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names | {t.name for t in graph.initializer} | {v.name for v in graph.input}


def _conversion_problem(text: str, onnx_path: Path) -> str:
    """Name the unsupported op types and the ONNX nodes that use them (OpenVINO names only types)."""
    flat = " ".join(text.split())
    match = re.search(r"No conversion rule found for operations?: ([^\n]+?)(?: --|$)", flat)
    if not match:
        return _failed_conversion(flat)
    from enginekit.core.loaders import load_onnx

    op_names = [o.strip() for o in match.group(1).split(",") if o.strip()]
    nodes = []
    for node in load_onnx(onnx_path).graph.node:
        qualified = f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        if qualified in op_names or node.op_type in op_names:
            nodes.append(node.name or "(unnamed)")
    where = f" (node{'s' if len(nodes) > 1 else ''} {', '.join(nodes[:5])})" if nodes else ""
    return f"no conversion rule for op {', '.join(op_names)}{where}"


# where OpenVINO's C++ raised and checked: "Exception from src/...:117: ", "Check '...' failed at ...:31: "
_EXCEPTION_TRAIL = re.compile(r"Exception from \S+?:\d+: ")
_CHECK_TRAIL = re.compile(r"Check '.*?' failed at \S+?:\d+: ")


def _failed_conversion(flat: str) -> str:
    """The op, its ONNX node (OpenVINO names it by its output) and the reason at the end of
    OpenVINO's nested "Check ... failed at file:line" report, whose first 300 characters ended
    before the reason ("... Conversion failed for AveragePool-20 While valida")."""
    detail = re.search(r"Failed operations detailed log: -- (\S+) with a message: (.*?)(?: Summary:|$)", flat)
    if not detail:
        return flat[:300]
    op, message = detail.groups()
    node = re.search(r"While validating ONNX node '<Node\([^)]*\): ([^>]*)>'", message)
    reason = _CHECK_TRAIL.sub("", message).rsplit("': ", 1)[-1]
    return f"{op.rsplit('-', 1)[0]}{f' (the node writing {node.group(1)})' if node else ''}: {reason}"[:400]


def compile_config(precision: str, hint: str = "LATENCY", streams: int | None = None, threads: int | None = None) -> dict[str, str]:
    config = {"INFERENCE_PRECISION_HINT": _INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": hint}
    if streams:
        config["NUM_STREAMS"] = str(streams)
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def compile_on_cpu(core: Any, model: Any, config: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """The model compiled for the CPU, and the config that compiled it. When the CPU plugin's
    "snippets" code generator fails (OpenVINO 2026.4 on a Softplus -> Tanh -> Mul chain it fuses
    into Mish: "Supported precisions set is not available for Mish operation"), it is compiled
    again with snippets off, which the plugin documents as a supported mode: the same graph, run
    by its regular kernels. Any other failure is one line with OpenVINO's reason."""
    try:
        return core.compile_model(model, "CPU", config), config
    except Exception as first:  # noqa: BLE001 - OpenVINO raises its own failure types
        if config.get("SNIPPETS_MODE") != "DISABLE":
            retry = {**config, "SNIPPETS_MODE": "DISABLE"}
            try:
                compiled = core.compile_model(model, "CPU", retry)
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                pass
            else:
                logger.info("OpenVINO's CPU plugin failed to compile the model with snippets (%s); compiled with SNIPPETS_MODE=DISABLE",
                               compile_failure(first))
                return compiled, retry
        raise InputError(f"OpenVINO's CPU plugin cannot compile the model: {compile_failure(first)}") from None


def compile_failure(exc: Exception) -> str:
    """OpenVINO's reason without its source-file trail ("Exception from src/...:117:", "Check '...' failed at ...:31:")."""
    return _CHECK_TRAIL.sub("", _EXCEPTION_TRAIL.sub("", " ".join(str(exc).split())))[:300]


def executed_precisions(compiled) -> dict[str, Any]:
    """Share of compute layers (Convolution/Deconvolution/MatMul/FullyConnected, recurrent sequences) per executed precision."""
    counts: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" in info and info["layerType"].astype(str) in _COMPUTE_LAYERS:
            counts[info["runtimePrecision"].astype(str) if "runtimePrecision" in info else "?"] += 1
    total = sum(counts.values())
    share = {p: n / total for p, n in counts.items()} if total else {}
    return {
        "compute_layers": total,
        "by_precision": dict(sorted(counts.items())),
        "integer_share": sum(v for p, v in share.items() if p in ("i8", "u8")),
        "bf16_share": share.get("bf16", 0.0),
        "f32_share": share.get("f32", 0.0),
        "f16_share": share.get("f16", 0.0),
    }


SPECIALISED_SHAPES = 4  # static copies kept per runner (each holds its own compiled kernels)


class OpenVinoRunner(Runner):
    """Loads an IR artifact folder (or an .xml path) and runs it synchronously or asynchronously.

    IRs keep a dynamic batch so one artifact serves every batch size, but OpenVINO's CPU plugin
    runs a dynamic-shape model ~8 % slower than the same model reshaped to static shapes (shape
    inference and buffer planning on every call; measured on efficientnet_lite0). So each input
    shape seen is compiled once as a static model, as benchmark_app does with `-shape`; after
    SPECIALISED_SHAPES distinct shapes the dynamic model serves the rest. `specialise=False`
    keeps the dynamic model only.
    """

    def __init__(self, path: str | Path, precision: str = "fp32", hint: str = "LATENCY", streams: int | None = None, threads: int | None = None,
                 specialise: bool = True):
        ov = require_openvino()
        path = Path(path)
        xml = path / XML if path.is_dir() else path
        bin_path = xml.with_name(BIN) if xml.name == XML else xml.with_suffix(".bin")
        if not xml.is_file():
            raise InputError("OpenVINO IR not found (no .xml)", xml)
        if not bin_path.is_file():
            raise InputError(f"OpenVINO IR has no weights file ({bin_path.name} is missing beside it)", xml)
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(xml), str(bin_path))
        except Exception as exc:
            raise InputError(f"OpenVINO cannot load this IR (corrupt or mismatched .xml/.bin?): {one_line(exc)}", xml) from None
        self.compiled, self.config = compile_on_cpu(self.core, self.model, compile_config(precision, hint, streams, threads))
        self.precision = precision
        self.request = self.compiled.create_infer_request()
        self.inputs = [_spec(p) for p in self.compiled.inputs]
        self.outputs = [_spec(p) for p in self.compiled.outputs]
        self.specialise = specialise and not all(p.get_partial_shape().is_static for p in self.compiled.inputs)
        self._static: dict[tuple, Any] = {}

    def compiled_for(self, feeds: Feeds):
        """(compiled model, its infer request) that run `feeds` fastest: static for their shapes if allowed."""
        if not self.specialise:
            return self.compiled, self.request
        key = tuple(sorted((name, np.shape(value)) for name, value in feeds.items()))
        if key not in self._static:
            if len(self._static) >= SPECIALISED_SHAPES:
                return self.compiled, self.request
            try:
                compiled = self.core.compile_model(self._model_for(feeds), "CPU", self.config)
            except Exception:  # noqa: BLE001 - the dynamic model serves these shapes (below)
                # OpenVINO's CPU plugin can fail on the static copy of a graph it compiled dynamic
                # (2026.4, transformers' DETR in INT8: "node_MatMul_745/DequantizationMultiply
                # contains empty child edge"), which aborted the whole build
                self._static[key] = (self.compiled, self.request)
                return self._static[key]
            self._static[key] = (compiled, compiled.create_infer_request())
        return self._static[key]

    def _model_for(self, feeds: Feeds):
        """The model reshaped to the shapes of `feeds` when specialising, else the dynamic one."""
        if not self.specialise:
            return self.model
        model = self.model.clone()
        model.reshape({name: list(np.shape(value)) for name, value in feeds.items()})
        return model

    capabilities = frozenset({STREAMS})

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        compiled, request = self.compiled_for(feeds)
        # share_inputs: the request reads the caller's arrays in place instead of copying them first
        # (the call is synchronous, so they cannot change underneath it); outputs stay copies, valid
        # after the next call
        results = request.infer(feeds, share_inputs=True)
        return [np.asarray(results[port]) for port in compiled.outputs]

    def close(self) -> None:
        self._static.clear()
        self.request = self.compiled = self.model = None

    def throughput(self, feeds: Feeds, requests: int = 0, seconds: float = 2.0) -> float:
        """Inferences per second with an AsyncInferQueue of `requests` (0: the plugin's optimal number)."""
        compiled, _ = self.compiled_for(feeds)
        return _async_rate(compiled, feeds, requests or compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"), seconds)

    def stream_throughput(self, feeds: Feeds, streams: int, seconds: float = 1.0) -> tuple[float, int]:
        """Inferences per second with `streams` CPU streams (THROUGHPUT hint, this runner's threads
        split among them) and the plugin's optimal number of requests in flight; and that number."""
        compiled = self.core.compile_model(self._model_for(feeds), "CPU", {**self.config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": str(streams)})
        requests = compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")
        return _async_rate(compiled, feeds, requests, seconds), requests


def _async_rate(compiled, feeds: Feeds, requests: int, seconds: float) -> float:
    """Inferences per second keeping `requests` asynchronous inferences in flight (after one warm-up round)."""
    import time

    queue = require_openvino().AsyncInferQueue(compiled, requests)
    for _ in range(requests):
        queue.start_async(feeds)
    queue.wait_all()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        queue.start_async(feeds)
        done += 1
    queue.wait_all()
    return done * len(next(iter(feeds.values()))) / (time.perf_counter() - start)


def _spec(port) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), shape, np.dtype(port.get_element_type().to_dtype()).name)


KERNEL_CHECK_SAMPLES = 4  # calibration samples each INT8 build's layers are compared on (openvino_kernels)


def _compile_and_run(graph: "onnx.ModelProto", feeds: Feeds) -> dict[str, np.ndarray]:
    """`graph` converted and compiled as an INT8 build's IR is, run once: every output by name."""
    import tempfile

    import onnx

    ov = require_openvino()
    with tempfile.TemporaryDirectory(prefix="enginekit-ov-check-") as folder:
        source = Path(folder) / "model.onnx"
        onnx.save(graph, str(source))
        try:
            compiled, _ = compile_on_cpu(ov.Core(), ov.convert_model(str(source)), compile_config("int8"))
            results = compiled(dict(feeds))
        except InputError:  # compile_on_cpu's own line
            raise
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own failure types
            raise InputError(f"OpenVINO cannot compile or run the probed graph: {one_line(exc, 300)}") from None
        return {name: np.asarray(results[port]) for port in compiled.outputs for name in port.get_names()}


class OpenVinoTarget(Target):
    name = "openvino"
    precisions = PRECISIONS
    serving = Serving((XML,), triton_backend="openvino", triton_default_file=XML, ovms=True)
    encoding = "mixed"  # u8 zero-point-0 for non-negative tensors, s8 elsewhere: as fast as NNCF's INT8
    encodings = ("mixed", "uint8", "int8")

    def unavailable(self, precision: str) -> str | None:
        return unavailable_reason(precision)

    def key_material(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"toolchain": toolchain("openvino")}

    def build(self, inputs: BuildInputs) -> Built:
        import onnx

        source = inputs.fp32.path
        defects: dict[str, float] = {}
        if inputs.precision == "int8":
            from enginekit.targets.openvino_kernels import dequantize_weights, kernel_defects, scalar_gathers_as_slices

            source = inputs.stage / "model.int8.onnx"
            graph = inputs.qdq(inputs.encoding).model
            if gathers := scalar_gathers_as_slices(graph):
                inputs.notes.append(f"{gathers} Gather(s) of one index from a compute layer run as Slice + Squeeze (OpenVINO's CPU "
                                    "plugin gave such a Gather after an int8 MatMul a wrong shape)")
            try:
                defects = kernel_defects(graph, inputs.calibration_feeds(KERNEL_CHECK_SAMPLES), _compile_and_run, inputs.threads)
            except InputError as exc:  # the probe (the graph with extra outputs) refused: the build itself goes on and says so
                inputs.notes.append(f"the layer check of OpenVINO's int8 kernels did not run: {exc}")
            if defects:
                graph = dequantize_weights(graph, list(defects))
                inputs.notes.append(f"OpenVINO's int8 kernels compute {len(defects)} layer(s) unlike the Q/DQ graph they come from, "
                                    f"with the same input: {', '.join(f'{n} (cosine {c})' for n, c in defects.items())}; "
                                    "they run in float on the int8 grid's values")
            onnx.save(graph, str(source))
        staged = source.parent == inputs.stage  # the INT8 Q/DQ graph, written above
        convert(source, inputs.precision, inputs.stage, made_from=inputs.fp32.origin, qdq=staged)
        if staged:
            source.unlink()  # the IR is the artifact; the Q/DQ ONNX stays reproducible from the table
        runner = OpenVinoRunner(inputs.stage, inputs.precision, threads=inputs.threads)
        executed = executed_precisions(runner.compiled)
        fields: dict[str, Any] = {"openvino": {**device_info(), "compile_config": runner.config, "executed": executed,
                                               **({"float_by_kernel_check": defects} if defects else {})}}
        if inputs.precision == "int8":
            fields["integer_share"] = executed["integer_share"]
        return Built(runner, fields)

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        return OpenVinoRunner(folder, manifest.get("precision", "fp32"), threads=threads, **runtime)

    def candidate_runner(self, candidate: BuildInputs) -> Runner | None:
        """Converted and compiled as `build` does, in the candidate's throwaway folder."""
        import onnx

        source = candidate.stage / "model.int8.onnx"
        onnx.save(candidate.qdq(candidate.encoding).model, str(source))
        convert(source, "int8", candidate.stage)
        return OpenVinoRunner(candidate.stage, "int8", threads=candidate.threads)


TARGET = OpenVinoTarget()
