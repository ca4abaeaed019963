"""TFLite keeps float what the Q/DQ hub keeps float, where that pays: the choice per model.

TFLite's quantizer makes every op it can int8, the arithmetic around the compute layers included;
the Q/DQ hub (what ONNX Runtime, OpenVINO and TensorRT run) keeps float what it does not place
Q/DQ pairs around: LayerNormalization and Softmax, a transformer's residual stream, hard-swish and
the other activations between integer layers. Measured (corpus, 128 held-out samples):
vit_classifier's TFLite top-1 agreement 0.81 full-integer, 0.91 with the hub's float ops (ONNX
Runtime and OpenVINO: 0.98); PP-OCRv4 det's map cosine 0.974 -> 0.983; MTCNN P-Net 0.994 ->
0.9999. But on PP-OCR cls the same choice cost 25 % of the speed for the same accuracy (its int8
arithmetic loses nothing there). So both flatbuffers are quantized from the one float conversion
and judged on calibration samples against the float flatbuffer: the hub's float ops are kept only
where the full-integer one loses more than NEGLIGIBLE_ERROR of cosine and the hub's choice
divides the mean error by HUB_GAIN with no part of the samples worse by more than
NEGLIGIBLE_ERROR (float islands cost speed: they must buy a clear gain, not noise; a part worse
by less is noise too: PP-OCRv4 rec's hub choice divided the mean error by 3.5 and lost 0.001 on
one part of four, and "better on every part" kept it full-integer at cosine 0.966, gate 0.98).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import numpy as np

from enginekit.core.errors import one_line
from enginekit.accuracy.metrics import DETECTION_COSINES, detection_metrics, infer_kind
from enginekit.core.tensors import Feeds
from enginekit.exporter.parity import cosine_similarity
from enginekit.targets.tflite.convert import COMPUTE_OPS, DATA_MOVEMENT_OPS
from enginekit.targets.tflite.float_layers import moved_after
from enginekit.targets.tflite.ranges import RangeMap

NEGLIGIBLE_ERROR = 0.002  # 1 - cosine to the float flatbuffer below which full-integer is kept as it is
HUB_GAIN = 1.5  # the hub's float ops must divide the mean error at least by this (and be better on every part)
JUDGE_SAMPLES, JUDGE_BATCH = 32, 8  # calibration samples, in parts of JUDGE_BATCH


def hub_float_tensors(ranges: RangeMap, hub_quantized: Collection[str], already_float: Sequence[str]) -> list[str]:
    """The TFLite tensors to keep float so that the flatbuffer is integer where the Q/DQ hub is:
    outputs of every op that is neither a compute layer nor data movement, unless the tensor's
    ONNX twin is one the hub quantizes (a residual Add inside an integer region, a pooling); then
    the data movement after them that no compute layer reads.

    A float op whose output a compute layer reads stays float too: a QUANTIZE then writes the
    layer's int8 input, which is the hub's own order (float op, then the Q/DQ pair at the layer's
    input). Why it matters: the converter folds a LayerNorm's scale and shift into the next
    FULLY_CONNECTED, which then reads the normalisation's MUL; as an int8 MUL, its input x - mean
    was quantized with one step for rows whose spread differs tenfold (vit_classifier: 31 dB where
    the hub's quantized LayerNorm output has 40), top-1 agreement 0.898; float, 0.914."""
    compute_inputs = {ranges.inputs_of[t][0] for t, op in ranges.producers.items() if op in COMPUTE_OPS and ranges.inputs_of.get(t)}
    # the quantizer finds an op by the ;-separated names of its output: a float op named like a part
    # of a fused layer's name ("Mul_2" of "Mul_2;MatMul;Add_31") would take that layer float with it
    compute_names = {part for t, op in ranges.producers.items() if op in COMPUTE_OPS for part in t.split(";")}
    extra = [tensor for tensor, op in ranges.producers.items()
             if op not in COMPUTE_OPS and op not in DATA_MOVEMENT_OPS and ranges.matched.get(tensor) not in hub_quantized
             and tensor not in already_float and tensor not in compute_names]
    if not extra:
        return []
    # an op reading such a float tensor runs float in the hub whatever its output: the Q/DQ pair
    # comes after it (silero's magnitude: Sqrt of a float sum of squares, then the pair at the
    # Conv's input; as an int8 SQRT, the squares, whose range spans the quiet and the loud chunks,
    # were quantized first)
    floating_inputs = set(extra)
    extra += [tensor for tensor, op in ranges.producers.items()
              if op not in COMPUTE_OPS and op not in DATA_MOVEMENT_OPS and tensor not in floating_inputs and tensor not in already_float
              and tensor not in compute_names and any(source in floating_inputs for source in ranges.inputs_of.get(tensor, ()))]
    floating = [*already_float, *extra]
    # data movement a layer reads moves int8 (the QUANTIZE before it, not after: the same values)
    return extra + [t for t in moved_after(floating, ranges) if t not in floating and t not in compute_inputs and t not in compute_names]


def outputs_on(model: bytes, samples: Sequence[Feeds], threads: int | None = None) -> list[list[np.ndarray]]:
    """The flatbuffer's outputs (dequantized) on each batch of `samples`."""
    from enginekit.targets.tflite.runner import TfliteRunner

    runner = TfliteRunner(model, threads=threads)
    try:
        return [runner.run(feeds) for feeds in samples]
    finally:
        runner.close()


def cosine_errors(reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]]) -> list[float]:
    """Per batch, the worst output's error against `reference`: 1 - cosine (each output compared
    whole: its batch axis need not be known), or, for a classifier's output of probabilities, the
    share of rows whose top-1 class differs if that is larger (what its gate measures). Why: LiteRT's int8 SOFTMAX writes on a fixed
    1/256 grid, and a near-flat distribution over many classes (a Keras DenseNet121 with fresh
    weights: 1000 classes near 0.001) keeps cosine 0.99995 while every row has its top classes
    tied, so argmax takes the lowest index: top-1 agreement 0.00, where the float SOFTMAX of the
    hub's choice gives 1.00."""
    return [round(max((output_error(expected, got) for expected, got in zip(expected_batch, got_batch)), default=0.0), 6)
            for expected_batch, got_batch in zip(reference, candidate)]


def output_error(expected: np.ndarray, got: np.ndarray) -> float:
    """1 - cosine, or the share of top-1 disagreements of a classifier's probabilities where larger
    (see cosine_errors); a detection output's boxes and scores each count (its gate's cosines)."""
    error = 1.0 - cosine_similarity(expected, got)
    kind = infer_kind("", expected)
    if kind == "detection":
        parts = detection_metrics(expected, got)
        return max(error, *(1.0 - parts[name] for name in DETECTION_COSINES if name in parts))
    if kind == "classification":  # rows of probabilities or log-probabilities (no name: raw logits are not judged by argmax here; a sequence's gate is its cosine)
        rows, got_rows = expected.reshape(-1, expected.shape[-1]), got.reshape(-1, expected.shape[-1])
        error = max(error, float(np.mean(rows.argmax(1) != got_rows.argmax(1))))
    return error


def choose(float_model: bytes, integer: bytes, make_hub: Callable[[], bytes], extra: Sequence[str], samples: Iterable[Feeds],
           threads: int | None = None, smoke: Callable[[bytes, str], None] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The full-integer flatbuffer, or the one with the hub's float ops (`make_hub()`), as the
    module docstring says; with the record for the manifest. `smoke` runs a flatbuffer in a child
    process first (LiteRT aborts the process on some int8 graphs): the full-integer one has passed
    it already; the other, failing it, is not used."""
    record: dict[str, Any] = {"tensors": len(extra), "chosen": False}
    samples = list(samples)
    if not samples:
        record["why"] = "no calibration samples to judge on"
        return integer, record
    reference = outputs_on(float_model, samples, threads)
    record["errors_integer"] = cosine_errors(reference, outputs_on(integer, samples, threads))
    if max(record["errors_integer"]) <= NEGLIGIBLE_ERROR:
        record["why"] = f"full-integer within {NEGLIGIBLE_ERROR} cosine of float"
        return integer, record
    try:
        hub = make_hub()
        if smoke is not None:
            smoke(hub, "int8 (the hub's float ops)")
        record["errors_hub"] = cosine_errors(reference, outputs_on(hub, samples, threads))
    except Exception as exc:  # the quantizer or LiteRT refusing this mix: full-integer stays, and the record says why
        record["why"] = f"the flatbuffer with the hub's float ops failed: {one_line(exc)}"
        return integer, record
    hub_errors, integer_errors = record["errors_hub"], record["errors_integer"]
    gains = all(h < i + NEGLIGIBLE_ERROR for h, i in zip(hub_errors, integer_errors)) and np.mean(hub_errors) * HUB_GAIN <= np.mean(integer_errors)
    record["chosen"] = bool(gains)
    record["why"] = (f"the hub's float ops {'are' if gains else 'are not'} within {NEGLIGIBLE_ERROR} of full-integer or better on every "
                     f"part with the mean error divided by {HUB_GAIN} or more ({np.mean(integer_errors):.5f} -> {np.mean(hub_errors):.5f})")
    return (hub if gains else integer), record
