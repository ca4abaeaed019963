"""TFLite keeps float the compute layers whose int8 kernel is slower than their float one on this CPU.

An int8 kernel is not always the faster one. Measured with XNNPACK on a CPU with AMX (a Xeon with
amx_int8), where the int8 convolutions use 16x64 tiles with input channels padded to blocks of
4: a 3-to-10-channel 3x3 convolution at 64x64 (MTCNN P-Net's first layer) took 163 us in int8
and 42 us in float; a 1-channel convolution with a 256-wide kernel (silero VAD's STFT) 118 us
and 10.5 us; the same CPU runs a 64-channel 3x3 convolution 12x faster in int8. Whole models
followed their first layer: P-Net INT8 0.63x its FP32 twin, silero 0.35x. On a CPU without AMX
the same layers were faster in int8. So the choice is measured on the machine that builds, not
written as a rule about channel counts.

Each int8 compute op and its float twin (the op writing the same tensor in the float flatbuffer)
are cut out into flatbuffers of their own and timed interleaved with XNNPACK; an op is kept float
when its int8 kernel is slower by more than SLOWER (timings of single ops drift: a margin is
there so that noise does not take layers float). The flatbuffer with those ops float is then
timed against the full-integer one, interleaved, and taken only when it is faster by more than
FASTER. A float layer is never less accurate than its int8 twin, and the cell's gate still
judges the result. The choice and every timing go into the manifest: the artifact is fastest on
CPUs like the one that built it (the manifest's `machine`).
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from enginekit.core.errors import one_line
from enginekit.targets.tflite.delegate_float import float_candidate

PROBED_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED", "CONV_3D"}
SLOWER = 1.25  # an op's int8 kernel must take this many times its float kernel's time to be kept float
FASTER = 1.05  # the flatbuffer with those ops float must be this much faster than the full-integer one
ROUNDS, MIN_SECONDS = 5, 0.02  # interleaved rounds; each round runs a model at least this long


def single_op_models(model: bytes, names: Sequence[str] | None = None) -> dict[str, tuple[str, bytes]]:
    """Output tensor name -> (op type, a flatbuffer holding only that op) for every PROBED_OPS op
    of the main subgraph (only those writing one of `names`, when given). Each flatbuffer keeps
    only that op's tensors and constant buffers; its other inputs become the graph's inputs."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    from enginekit.targets.tflite.convert import op_types

    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    graph = tree.subgraphs[0]
    found: dict[str, tuple[str, bytes]] = {}
    for op, kind in zip(graph.operators, [each["op"] for each in op_types(model)]):  # the main subgraph's ops, in order
        output = _text(graph.tensors[op.outputs[0]].name) if len(op.outputs) else ""
        if kind not in PROBED_OPS or (names is not None and output not in names) or output in found:
            continue
        single = schema.ModelT()
        single.version, single.operatorCodes, single.buffers = tree.version, tree.operatorCodes, [schema.BufferT()]
        sub, remap = schema.SubGraphT(), {}
        sub.tensors, sub.inputs = [], []
        for index in [*op.inputs, *op.outputs]:
            if index < 0 or index in remap:
                continue
            tensor = copy.copy(graph.tensors[index])
            data = _buffer_data(model, tree.buffers[tensor.buffer]) if tensor.buffer < len(tree.buffers) else None
            if data is not None:
                constant = schema.BufferT()
                constant.data = data
                single.buffers.append(constant)
                tensor.buffer = len(single.buffers) - 1
            else:
                tensor.buffer = 0
                if index in op.inputs:
                    sub.inputs.append(len(sub.tensors))
            remap[index] = len(sub.tensors)
            sub.tensors.append(tensor)
        lone = copy.copy(op)
        lone.inputs = [remap[i] if i >= 0 else -1 for i in op.inputs]
        lone.outputs = [remap[i] for i in op.outputs]
        sub.operators, sub.outputs = [lone], [remap[i] for i in op.outputs]
        single.subgraphs = [sub]
        found[output] = (kind, bytes(flatbuffer_utils.convert_object_to_bytearray(single)))
    return found


def _buffer_data(model: bytes, buffer: Any) -> np.ndarray | None:
    """A constant's bytes: inside the buffer, or (as ai-edge-quantizer writes them) at an offset
    after the flatbuffer. Missed, the weights of an int8 layer became inputs of its probe, which
    XNNPACK runs unpacked: ResNet50's int8 convolutions timed 1.5x their float twins that way."""
    if buffer.data is not None and len(buffer.data):
        return np.asarray(buffer.data, np.uint8)
    if getattr(buffer, "offset", 0) > 1 and getattr(buffer, "size", 0):
        return np.frombuffer(model, np.uint8, buffer.size, buffer.offset)
    return None


def _text(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def running_shapes(model: bytes, feeds: Mapping[str, Any] | None) -> dict[str, list[int]]:
    """Every tensor's shape, by name, when `model` runs one sample of `feeds`: the dims the file
    leaves dynamic (an OCR detector's height and width) take the data's sizes, the batch 1, so
    that layers are timed at the size they run at and not at the placeholder size of the file
    (PP-OCRv4 det's layers were timed at 1 x 1 pixels first). Empty without feeds."""
    from enginekit.targets.tflite.runner import signature_inputs, undelegated_interpreter

    if not feeds:
        return {}
    interpreter = undelegated_interpreter(model)
    inputs = signature_inputs(interpreter.get_signature_runner())
    for name, detail in inputs.items():
        if name in feeds:
            signature, sizes = detail["shape_signature"], np.shape(feeds[name])
            shape = [(1 if axis == 0 else sizes[axis]) if size < 0 and axis < len(sizes) else int(detail["shape"][axis])
                     for axis, size in enumerate(signature)]
            interpreter.resize_tensor_input(detail["index"], shape)
    interpreter.allocate_tensors()
    for detail in interpreter.get_input_details():
        interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
    interpreter.invoke()  # shapes computed from data (a RESHAPE reading a SHAPE) are known only now
    return {detail["name"]: [int(n) for n in detail["shape"]] for detail in interpreter.get_tensor_details()}


class _Timed:
    """One flatbuffer in an XNNPACK interpreter, its inputs at `shapes` (by tensor name) where
    given, fed zeros (a kernel's time does not depend on its values)."""

    def __init__(self, model: bytes, threads: int | None, shapes: Mapping[str, list[int]]):
        from enginekit.core.quiet import quiet_stderr
        from enginekit.targets.tflite.runner import require_litert

        with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
            self.interpreter = require_litert().Interpreter(model_content=model, num_threads=threads or os.cpu_count() or 1)
        for detail in self.interpreter.get_input_details():
            if detail["name"] in shapes and list(detail["shape"]) != shapes[detail["name"]]:
                self.interpreter.resize_tensor_input(detail["index"], shapes[detail["name"]])
        with quiet_stderr():
            self.interpreter.allocate_tensors()
        for detail in self.interpreter.get_input_details():
            self.interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        self.interpreter.invoke()  # the delegate's first run packs weights
        self.seconds: list[float] = []

    def round(self) -> None:
        runs, started = 0, time.perf_counter()
        while True:
            self.interpreter.invoke()
            runs += 1
            spent = time.perf_counter() - started
            if spent >= MIN_SECONDS and runs >= 3:
                break
        self.seconds.append(spent / runs)

    def microseconds(self) -> float:
        return float(np.median(self.seconds)) * 1e6


def interleaved_microseconds(models: Sequence[bytes], threads: int | None, shapes: Mapping[str, list[int]] | None = None) -> list[float]:
    """Median time per run of each flatbuffer (inputs at `shapes`), the rounds interleaved so that
    drift hits all alike."""
    timed = [_Timed(model, threads, shapes or {}) for model in models]
    for _ in range(ROUNDS):
        for each in timed:
            each.round()
    return [each.microseconds() for each in timed]


def slower_int8_ops(float_model: bytes, integer: bytes, threads: int | None, shapes: Mapping[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
    """The integer flatbuffer's compute ops whose kernel is slower than their float twin's by more
    than SLOWER (each probe's input at its size in `shapes`): output tensor name -> op type and
    both times (us)."""
    integer_ops = single_op_models(integer)
    float_ops = single_op_models(float_model, list(integer_ops))
    slow = {}
    for name, (kind, probe) in integer_ops.items():
        if name not in float_ops:
            continue
        try:
            int8_us, float_us = interleaved_microseconds([probe, float_ops[name][1]], threads, shapes)
        except (RuntimeError, ValueError):  # an op LiteRT does not run on its own: not judged
            continue
        if int8_us > SLOWER * float_us:
            slow[name] = {"op": kind, "int8_us": round(int8_us, 1), "float_us": round(float_us, 1)}
    return slow


def keep_faster(float_model: bytes, integer: bytes, requantize: Callable[[Sequence[str]], bytes], threads: int | None,
                feeds: Mapping[str, Any] | None = None, smoke: Callable[[bytes, str], None] | None = None) -> tuple[bytes, dict[str, Any] | None]:
    """`integer`, or the flatbuffer `requantize(tensors)` builds with `slower_int8_ops` float where
    it is faster by more than FASTER, all timed at the sizes one sample of `feeds` runs at; with
    the record for the manifest (None when every int8 compute op is at least as fast as its
    float twin)."""
    try:
        shapes = {**running_shapes(float_model, feeds), **running_shapes(integer, feeds)}
        slow = slower_int8_ops(float_model, integer, threads, shapes)
    except Exception as exc:  # a speed measurement must not fail the build: the file stays as it was
        return integer, {"ops": {}, "chosen": False, "why": _failed("the layers could not be timed", exc)}
    if not slow:
        return integer, None
    record: dict[str, Any] = {"ops": dict(Counter(s["op"] for s in slow.values()).most_common()), "layers": slow, "chosen": False}
    candidate = float_candidate(requantize, list(slow), smoke, "int8 (the layers with slower int8 kernels kept float)", record)
    if candidate is None:
        return integer, record
    try:
        before, after = interleaved_microseconds([integer, candidate], threads, shapes)
    except Exception as exc:
        record["why"] = _failed("the two files could not be timed", exc)
        return integer, record
    chosen = before > FASTER * after
    record.update(integer_us=round(before, 1), with_float_us=round(after, 1), chosen=chosen)
    return (candidate if chosen else integer), record


def _failed(what: str, exc: Exception) -> str:
    return f"{what}: {one_line(exc)}"
