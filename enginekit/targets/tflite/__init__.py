"""TFLite target: float32, float16 and full-integer int8 flatbuffers run by LiteRT.

Keras sources convert directly (their own graph, traced by TensorFlow); PyTorch and ONNX
sources go through our ONNX -> TensorFlow lowering (lowering.py says why). INT8 takes the
activation ranges from the shared CalibrationTable, mapped onto the TFLite tensors by value
(ranges.py), and the bias-corrected biases of the Q/DQ hub, so every target gets the same
calibration and correction; the layers the build keeps float (exclusions, --auto-fallback) stay
float in the flatbuffer too (float_layers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from enginekit.core.errors import InputError
from enginekit.core.machine import toolchain
from enginekit.targets.base import Built, BuildInputs, Runner, Serving, Target
from enginekit.targets.tflite.convert import IO_TYPES
from enginekit.targets.tflite.hub_float import JUDGE_BATCH, JUDGE_SAMPLES
from enginekit.targets.tflite.ranges import MEASURED_SAMPLES
from enginekit.targets.tflite.runner import MODEL_FILE, TfliteRunner, io_parameters
from enginekit.targets.tflite.smoke import smoke_run

__all__ = ["MODEL_FILE", "TARGET", "TfliteRunner", "build_flatbuffer"]


def build_flatbuffer(precision: str, function, origin: str, *, table=None, reference: onnx.ModelProto | None = None,
                     feeds=None, more_feeds: Iterable = (), io_type: str = IO_TYPES[0], owner: Any = None,
                     float_layers: Sequence[str] = (), output_bits: int = 8, hub_quantized: Collection[str] | None = None,
                     judge_samples: Iterable = (), threads: int | None = None, speed_check: bool = False,
                     smoke: Callable[[bytes, str], None] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The flatbuffer of `function` (a tf.function) at `precision`, with what the manifest records.
    INT8 needs the CalibrationTable, the FP32 ONNX graph `function` computes and calibration feeds
    (`more_feeds`: further calibration batches, for tensors measured in TFLite); `float_layers`:
    ONNX compute layers of `reference` to keep float; `hub_quantized`: the ONNX tensors the Q/DQ
    hub quantizes, to judge on `judge_samples` whether to keep float what it keeps float
    (hub_float.py); `speed_check`: keeps float the layers whose int8 kernel is slower on this CPU
    (speed_float.py); `smoke`: runs an int8 flatbuffer in a child process before this one does
    (smoke.py)."""
    from enginekit.targets.tflite.convert import convert_function, quantize_int8, type_summary
    from enginekit.targets.tflite.delegate_float import keep_delegated
    from enginekit.targets.tflite.float_layers import float_op_outputs, mask_outputs, mixed_concat_outputs, moved_after, recurrence_outputs
    from enginekit.targets.tflite.hub_float import choose, hub_float_tensors
    from enginekit.targets.tflite.ranges import map_ranges
    from enginekit.targets.tflite.speed_float import keep_faster

    if precision in ("fp32", "fp16"):
        model = convert_function(function, origin, precision, owner)
        return model, {"types": type_summary(model)}
    float_model = convert_function(function, origin, "fp32", owner)
    ranges = map_ranges(float_model, reference, table, feeds, more_feeds)
    float_ops, not_found = float_op_outputs(reference, float_layers, ranges)
    recurrence = [t for t in recurrence_outputs(ranges) if t not in float_ops]
    masks = [t for t in mask_outputs(ranges) if t not in float_ops and t not in recurrence]
    taken = {*float_ops, *recurrence, *masks}
    mixed = [t for t in mixed_concat_outputs(ranges) if t not in taken]
    float_ops, layer_ops = [*float_ops, *recurrence, *masks, *mixed], float_ops
    model = quantize_int8(float_model, ranges.ranges, io_type, float_ops, output_bits)
    if smoke is not None:
        smoke(model, precision)
    hub_choice = None
    extra = hub_float_tensors(ranges, hub_quantized, float_ops) if hub_quantized is not None else []
    if extra:
        model, hub_choice = choose(float_model, model, lambda: quantize_int8(float_model, ranges.ranges, io_type, [*float_ops, *extra], output_bits),
                                   extra, judge_samples, threads, smoke)
    kept_float = [*float_ops, *(extra if hub_choice and hub_choice["chosen"] else [])]
    requantize = _Requantizer(lambda tensors: quantize_int8(float_model, ranges.ranges, io_type, tensors, output_bits), kept_float)
    model, delegate_choice = keep_delegated(float_model, model, requantize, smoke)
    if delegate_choice and delegate_choice["chosen"]:
        requantize.kept = requantize.last
    speed_choice = None
    if speed_check:
        model, speed_choice = keep_faster(float_model, model, lambda slow: requantize([*slow, *moved_after(slow, ranges)]), threads, feeds, smoke)
        if speed_choice and speed_choice["chosen"]:
            requantize.kept = requantize.last
    model, pass_through = _without_idle_pairs(model, requantize, smoke)
    info: dict[str, Any] = {"io": io_parameters(model), "ranges": ranges.summary(), "types": type_summary(model)}
    if hub_choice is not None:
        info["hub_float_ops"] = hub_choice
    if delegate_choice is not None:
        info["float_for_xnnpack"] = delegate_choice
    if speed_choice is not None:
        info["float_for_speed"] = speed_choice
    if pass_through:
        info["float_pass_through"] = pass_through
    if recurrence:
        info["recurrence_float_ops"] = len(recurrence)
    if masks:
        info["mask_float_ops"] = len(masks)
    if mixed:
        info["mixed_concat_float_ops"] = len(mixed)
    if float_layers:
        info["float_layers"] = {"kept_float": [n for n in float_layers if n not in not_found], "ops": layer_ops,
                                "not_found_in_tflite": not_found}
    return model, info


IDLE_PAIR_PASSES = 3


def _without_idle_pairs(model: bytes, requantize: "_Requantizer", smoke: Callable[[bytes, str], None] | None) -> tuple[bytes, list[str]]:
    """`model` with the data movement that only carries a QUANTIZE's values to DEQUANTIZEs kept
    float (float_layers.dequantized_only), and the tensors it moved to float."""
    from enginekit.targets.tflite.delegate_float import float_candidate
    from enginekit.targets.tflite.float_layers import dequantized_only

    moved: list[str] = []
    for _ in range(IDLE_PAIR_PASSES):  # a chain kept float can leave the one before it idle
        idle = [t for t in dequantized_only(model) if t not in moved]
        candidate = float_candidate(requantize, [*moved, *idle], smoke, "int8", {}) if idle else None
        if candidate is None:  # none left, or the quantizer or LiteRT refusing this placement: the file stays as it was
            break
        model, moved = candidate, [*moved, *idle]
    return model, moved


class _Requantizer:
    """Quantizes the float flatbuffer again with `kept` and further tensors float, remembering the
    last list it was given (what a choice that took its flatbuffer keeps float from then on)."""

    def __init__(self, quantize: Callable[[Sequence[str]], bytes], kept: Sequence[str]):
        self.quantize, self.kept, self.last = quantize, list(kept), list(kept)

    def __call__(self, more: Sequence[str]) -> bytes:
        self.last = [*self.kept, *(t for t in more if t not in self.kept)]
        return self.quantize(self.last)


def speed_notes(choice: Mapping[str, Any] | None) -> list[str]:
    """What the speed check (speed_float.py) kept float, or measured and left int8, in one line."""
    if not choice:
        return []
    ops = ", ".join(f"{op} x{count}" for op, count in choice["ops"].items())
    if not ops:
        return [f"the speed check did not run ({choice['why']}): every layer stays int8"]
    if not choice["chosen"]:
        return [f"int8 kernels slower than float on this CPU ({ops}) stay int8: "
                + (choice.get("why") or f"the file with them float was not faster ({choice['integer_us']} vs {choice['with_float_us']} us)")]
    return [f"kept float where the int8 kernel is slower on this CPU: {ops}; the file runs in {choice['with_float_us']} us "
            f"instead of {choice['integer_us']} us (measured here: other CPUs may differ)"]


def io_notes(io: Mapping[str, Mapping[str, Any]], io_type: str, output_bits: int) -> list[str]:
    """Where an int8 flatbuffer's input or output type is not the one asked for: the op reading
    that input or computing that output runs in float (kept float as the Q/DQ hub keeps it, or
    because XNNPACK runs only its float kernel, such as a 16x8 FULLY_CONNECTED), so there is no
    integer tensor to give that type to. Said, not silent: a caller feeding uint8 would be wrong."""
    notes = []
    for name, parameters in io.items():
        wanted = "int16" if parameters["role"] == "output" and output_bits == 16 else io_type
        if parameters["dtype"] == "float32" and wanted != "float32":  # (an int8 output of an elementwise op under 16 bits is by design)
            op = "reading" if parameters["role"] == "input" else "computing"
            notes.append(f"{parameters['role']} '{name}' is {parameters['dtype']}, not {wanted}: the op {op} it runs in float")
    return notes


def unavailable_reason() -> str | None:
    """Why .tflite files cannot be built here (TensorFlow's converter or LiteRT absent), or None."""
    from enginekit.core.errors import MissingDependencyError
    from enginekit.core.tf_support import require_tensorflow
    from enginekit.targets.tflite.runner import require_litert

    try:
        require_tensorflow()
        require_litert()
    except MissingDependencyError as exc:
        return str(exc)
    return None


RECURRENT_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}


def _from_keras(fp32) -> bool:
    """Whether TFLite converts the Keras source itself. Not where it has a recurrent layer: its
    converter meets the layer's loop as TensorList ops with no TFLite builtin, while the exported
    ONNX LSTM/GRU is unrolled by the lowering (recurrent.py)."""
    return fp32.is_keras and not any(node.op_type in RECURRENT_OPS for node in fp32.proto.graph.node)


class TfliteTarget(Target):
    name = "tflite"
    precisions = ("fp32", "fp16", "int8")
    serving = Serving((MODEL_FILE,), ovms=True)  # Triton has no TFLite backend
    encoding = "mixed"  # its bias correction is that of the "mixed" Q/DQ graph (shared with OpenVINO)
    float_layers = True  # full-integer but for the layers a build keeps float (float_layers.py)
    # io: int8 .tflite input/output type, one of IO_TYPES (float32: QUANTIZE/DEQUANTIZE inside the
    # flatbuffer); output_bits: 16 runs the ops computing the outputs with int16 activations (16x8)
    # and gives int16 outputs, 8 keeps them int8; speed_check: layers whose int8 kernel is slower
    # than their float one on the building CPU stay float (speed_float.py), False keeps them int8
    option_defaults = {"io": IO_TYPES[0], "output_bits": 8, "speed_check": True}

    def unavailable(self, precision: str) -> str | None:
        return unavailable_reason()

    def check_options(self, options: Mapping[str, Any]) -> None:
        from enginekit.targets.tflite.convert import check_io

        check_io(options["io"], options["output_bits"])

    def preflight(self, fp32, precision: str) -> InputError | None:
        """ONNX sources are lowered op by op: an op without a lowering is known before any work."""
        if _from_keras(fp32):
            return None
        from enginekit.targets.tflite.lowering import check_lowerable

        try:
            check_lowerable(fp32.proto, fp32.origin)
        except InputError as exc:
            return exc
        return None

    def key_material(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return {"options": dict(options), "toolchain": toolchain("tensorflow", "keras", "ai-edge-litert", "ai-edge-quantizer")}

    def build(self, inputs: BuildInputs) -> Built:
        """Keras sources are traced by TensorFlow directly; others lowered from the (bias-corrected) ONNX."""
        precision, fp32 = inputs.precision, inputs.fp32
        reference, notes = fp32.proto, []
        hub_quantized = None  # the activations the Q/DQ hub quantizes (ONNX route, INT8): hub_float.py
        keras_model = fp32.keras_model() if _from_keras(fp32) else None
        if keras_model is not None:
            from enginekit.exporter.keras_export import tf_function

            function, route, owner = tf_function(keras_model), "keras (traced by TensorFlow)", keras_model.owner
            if precision == "int8":
                notes.append("Keras source converted directly: the ranges are the table's, bias correction and weight rounding are not carried over")
                hub_quantized = set(inputs.quantized_tensors())  # the hub's float ops are a choice here too
        else:
            from enginekit.targets.tflite.lowering import to_tf_function

            if precision == "int8":
                from enginekit.quantization.bias_correction import corrected_float_model

                # the hub's biases (bias correction) and weight integers (GPTQ rounding), as floats
                hub = inputs.qdq(inputs.encoding)
                hub_quantized = set(hub.activations)
                reference = corrected_float_model(fp32.proto, hub, biases=inputs.bias_correction)
            function, route, owner = to_tf_function(reference, fp32.origin), "onnx lowered to TensorFlow ops", None
        int8 = precision == "int8"
        model, info = build_flatbuffer(precision, function, fp32.origin, table=inputs.table() if int8 else None,
                                       reference=reference, feeds=inputs.calibration_feeds(2) if int8 else None,
                                       more_feeds=inputs.calibration_samples(MEASURED_SAMPLES, 2) if int8 else (),
                                       io_type=inputs.options["io"], owner=owner, float_layers=inputs.float_layers() if int8 else (),
                                       output_bits=inputs.options["output_bits"], threads=inputs.threads,
                                       speed_check=inputs.options["speed_check"],
                                       hub_quantized=hub_quantized,
                                       judge_samples=inputs.calibration_samples(JUDGE_SAMPLES, JUDGE_BATCH) if hub_quantized is not None else (),
                                       smoke=lambda flatbuffer, what: smoke_run(flatbuffer, inputs.calibration_feeds(2), inputs.stage, what))
        delegated = info.get("float_for_xnnpack") or {}
        if delegated.get("chosen"):
            notes.append("kept float where XNNPACK runs only the float op: "
                         + ", ".join(f"{op} x{count}" for op, count in delegated["ops"].items()))
        notes += speed_notes(info.get("float_for_speed"))
        notes += io_notes(info["io"], inputs.options["io"], inputs.options["output_bits"]) if int8 else []
        missing = info.get("float_layers", {}).get("not_found_in_tflite")
        if missing:
            notes.append(f"layers kept float on the other targets but not found in the TFLite graph (they stay int8): {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
        (inputs.stage / MODEL_FILE).write_bytes(model)
        runner = TfliteRunner(model, threads=inputs.threads)
        fields: dict[str, Any] = {"tflite": {"route": route, **info, "notes": notes}}
        if int8:
            fields["integer_share"] = info["types"]["integer_share"]
        return Built(runner, fields)

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        return TfliteRunner(folder / MODEL_FILE, threads=threads, io=manifest.get("tflite", {}).get("io"))

    def candidate_runner(self, candidate: BuildInputs) -> Runner | None:
        """Built as `build` builds it (a whole conversion: about 7 s for efficientnet_lite0). Only
        LiteRT can judge a float set for TFLite: its full-integer graph also quantizes what the
        Q/DQ graph leaves float (residual adds, gates, normalisation internals), and a set that
        passed on the Q/DQ graph failed on LiteRT (efficientnet_lite0 at top-1 agreement 0.96)."""
        return self.build(candidate).runner


TARGET = TfliteTarget()
