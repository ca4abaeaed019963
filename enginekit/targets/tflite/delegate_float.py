"""TFLite keeps float the int8 ops XNNPACK would leave out while it runs their float twins.

LiteRT's XNNPACK delegate takes fewer int8 ops than float ones: no int8 BATCH_MATMUL between two
activations, SOFTMAX, GELU, RSQRT or SQUARED_DIFFERENCE (a transformer's attention and
LayerNorm), and no int8 ADD whose input and output scales are too far apart (a Keras
MobileNetV3Small's untrained hard-swish and residual ADDs: 17). Each such op splits the graph:
the delegate stops, LiteRT's reference kernel runs, the delegate starts again; a small model
spent more time there than in its integer convolutions (MobileNetV3Small INT8 0.31x FP32, the
BERT encoder 0.42x). Kept float, the same op runs inside the delegate between a DEQUANTIZE and
a QUANTIZE, which it runs too. The ops are found by running both flatbuffers' delegate
partitioning (no timing: ratios on this machine drift by tens of percent), and the flatbuffer
with them float is taken when fewer ops are left outside the delegate; float ops are never less
accurate than their int8 twins, and the cell's gate still judges the result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from enginekit.core.errors import one_line
from enginekit.targets.tflite.convert import outside_xnnpack_outputs


def undelegated_int8_ops(float_model: bytes, integer_outside: dict[str, str]) -> dict[str, str]:
    """Of the integer flatbuffer's ops outside XNNPACK (`integer_outside`, as
    `outside_xnnpack_outputs` gives them), those whose twin in the float flatbuffer (the op
    writing the same tensor) runs inside it: output tensor name -> op type. An op whose name is
    one part of another op's ";"-joined name is left out unless that other op is kept float too
    (the quantizer's recipe finds an op by the parts of its name, and would take the other op
    float with it): a LayerNorm's SUB `sub_5` goes with its SQUARED_DIFFERENCE `Square_3;sub_5`."""
    float_outside, written = outside_xnnpack_outputs(float_model), op_output_names(float_model)
    slow = {name: op for name, op in integer_outside.items() if name in written and name not in float_outside}

    def alone(name: str) -> bool:
        return not any(f";{name};" in f";{other};" for other in written if other != name and other not in slow)

    return {name: op for name, op in slow.items() if alone(name)}


def keep_delegated(float_model: bytes, integer: bytes, requantize: Callable[[Sequence[str]], bytes],
                   smoke: Callable[[bytes, str], None] | None = None) -> tuple[bytes, dict[str, Any] | None]:
    """`integer`, or the flatbuffer `requantize(tensors)` builds with `undelegated_int8_ops` float
    where that leaves fewer ops outside the delegate; with the record for the manifest (None when
    every int8 op that can run in XNNPACK does)."""
    outside = outside_xnnpack_outputs(integer)  # one XNNPACK interpreter per flatbuffer
    slow = undelegated_int8_ops(float_model, outside)
    if not slow:
        return integer, None
    record: dict[str, Any] = {"ops": dict(Counter(slow.values()).most_common()), "chosen": False}
    candidate = float_candidate(requantize, list(slow), smoke, "int8 (the ops outside XNNPACK kept float)", record)
    if candidate is None:
        return integer, record
    before, after = len(outside), len(outside_xnnpack_outputs(candidate))
    record.update(outside_before=before, outside_after=after, chosen=after < before)
    return (candidate if after < before else integer), record


def float_candidate(requantize: Callable[[Sequence[str]], bytes], tensors: Sequence[str], smoke: Callable[[bytes, str], None] | None,
                    what: str, record: dict[str, Any]) -> bytes | None:
    """The flatbuffer `requantize(tensors)` builds, run by `smoke` as `what`; None, with the reason
    in `record["why"]`, where the quantizer or LiteRT refuses that mix (the caller keeps its own)."""
    try:
        candidate = requantize(tensors)
        if smoke is not None:
            smoke(candidate, what)
    except Exception as exc:  # the quantizer or LiteRT refusing this mix: the flatbuffer stays as it was
        record["why"] = f"the flatbuffer with them float failed: {one_line(exc)}"
        return None
    return candidate


def op_output_names(model: bytes) -> set[str]:
    """The names of the tensors the flatbuffer's ops write (as written, no delegate)."""
    from enginekit.targets.tflite.runner import undelegated_interpreter

    interpreter = undelegated_interpreter(model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    return {names[index] for op in interpreter._get_ops_details() for index in op["outputs"] if index in names}
