"""`--calib-method auto`: the calibration method chosen per model, by what each does to the
quantized model's outputs.

One calibration pass yields all four tables (min-max, percentile, entropy, MSE come from the same
histograms); each table's Q/DQ graph, for every (encoding, placement) the build's INT8 targets
use, runs in the reference executor on calibration samples against the FP32 model, and the table
whose worst encoding clears the task-aware gate by the widest margin is used. Chosen on
calibration data, never on the evaluation data the gate then judges. Why per model: no method wins
everywhere (measured here: percentile lifts PP-OCRv4 det on ONNX Runtime from cosine 0.950 to
0.981 and rec from 0.959 to 0.986, where entropy is far worse; MSE costs minilm_l6 0.994 -> 0.983
against min-max).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from enginekit.accuracy import collect_outputs, compare_outputs, gate_margin
from enginekit.calibration.methods import METHODS
from enginekit.calibration.table import CalibrationTable
from enginekit.onnx.session import Session
from enginekit.quantization.pipeline import build_qdq

AUTO = "auto"
CHOICE_SAMPLES = 64  # calibration samples each candidate table is judged on


def choose_table(session: Any, tables: Mapping[str, CalibrationTable], pairs: Sequence[tuple[str, str]]) -> CalibrationTable:
    """The table whose Q/DQ graphs (every pair) agree best with FP32 on calibration samples; its
    `parameters["auto"]` records every method's margin and the samples it was judged on."""
    fp32, threads = session.fp32, session.options.threads
    batches = list(session.calibration_samples(CHOICE_SAMPLES, 32))
    reference = collect_outputs(Session(fp32.proto, threads=threads, spinning=False).run, batches, None, session.input_axes, session.output_axes)
    axes = {name: axis for name, axis in session.output_axes.items() if axis is not None}
    settings = dataclasses.replace(session.options.quantize, bias_correction=False)
    margins: dict[str, float] = {}
    for method in (m for m in METHODS if m in tables):
        worst = float("inf")
        for encoding, placement in pairs:
            graph, _ = build_qdq(fp32, tables[method], settings, encoding, (), threads, placement)
            candidate = collect_outputs(Session(graph.model, threads=threads, spinning=False).run, batches, None, session.input_axes,
                                        session.output_axes)
            metrics = compare_outputs(reference, candidate, None, session.options.output_kinds, axes)
            worst = min(worst, gate_margin(metrics, None, "int8"))  # the task-aware gate: agreement with FP32 needs no labels
        margins[method] = worst
    chosen = max(margins, key=lambda m: (margins[m], -METHODS.index(m)))  # a tie goes to the earlier (simpler) method
    table = tables[chosen]
    samples = sum(len(next(iter(b.values()))) for b in batches) if batches else 0
    table.parameters = {**table.parameters, AUTO: {"chosen": chosen, "margins": {m: round(v, 5) for m, v in margins.items()},
                                                   "judged_on": f"{samples} calibration samples, task-aware gate margin, worst encoding"}}
    return table
