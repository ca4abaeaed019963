"""`--calib-method auto`: the calibration method chosen per model, by what each does to the
quantized model's outputs.

One calibration pass yields all four tables (min-max, percentile, entropy, MSE come from the same
histograms); each table's Q/DQ graph, for every (encoding, placement) the build's INT8 targets
use, runs in the reference executor on calibration samples against the FP32 model, and min-max is
replaced only by a table that agrees better with FP32 both on average and on its worst part of
those samples (see `choose_table`). Chosen on
calibration data, never on the evaluation data the gate then judges. Why per model: no method wins
everywhere (measured here: percentile lifts PP-OCRv4 det on ONNX Runtime from cosine 0.950 to
0.981 and rec from 0.959 to 0.986, where entropy is far worse; MSE costs minilm_l6 0.994 -> 0.983
against min-max). The per-tensor table (tensor_choice.py, `--calib-method per-tensor`) is not a
candidate: in the corpus it lost a cell's gate on TFLite (ViT top-1 0.914 -> 0.883; the Q/DQ
graph it is judged on does not quantize what LiteRT's full-integer graph does) while winning one
crop on ONNX Runtime, and it gave nothing on efficientnet_lite0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from enginekit.accuracy import compare_outputs
from enginekit.accuracy.metrics import lowest_cosine
from enginekit.calibration.methods import METHODS
from enginekit.calibration.table import CalibrationTable
from enginekit.core.tensors import batch_size, take
from enginekit.quantization.pipeline import build_qdq

AUTO = "auto"
CHOICE_SAMPLES = 64  # calibration samples each candidate table is judged on
FOLDS = 4  # equal parts of them; a method must beat min-max's mean and its worst part to replace it


def choose_table(session: Any, graph: Any, tables: Mapping[str, CalibrationTable], pairs: Sequence[tuple[str, str]]) -> CalibrationTable:
    """The table whose Q/DQ graphs of `graph` (the FP32 model the tables were calibrated
    through; every pair) agree best with FP32 on calibration samples; its
    `parameters["auto"]` records every method's scores and the samples it was judged on.

    Scored by the lowest output cosine against FP32 (every output kind reports it, and unlike a
    top-1 agreement on a few dozen samples it moves smoothly), worst encoding first, on FOLDS
    equal parts of the samples: a method replaces min-max only if it scores higher on average and
    on its worst part than min-max on its own (a gain on average bought with a worse tail is not
    one; equal scores keep min-max). It had to win on every part: on 128 scikit-image and
    scikit-learn photos, a real YOLOv8n's detection scores then kept min-max (parts 0.953 /
    0.991 / 0.982 / 0.917) over MSE (0.984 / 0.983 / 0.987 / 0.963), one part 0.008 behind, and
    failed the gate on ONNX Runtime (0.980) where MSE gives 0.990."""
    fp32, threads = graph, session.options.threads
    batches = list(session.calibration_samples(CHOICE_SAMPLES, 32))
    reference = session.outputs_of(fp32.proto, batches)
    axes = {name: axis for name, axis in session.output_axes.items() if axis is not None}
    samples = sum(batch_size(b, session.input_axes) for b in batches)
    folds = [(i * samples // FOLDS, (i + 1) * samples // FOLDS) for i in range(FOLDS)] if samples >= FOLDS else [(0, samples)]
    settings = dataclasses.replace(session.options.quantize, bias_correction=False)
    candidates = [m for m in METHODS if m in tables]
    scores: dict[str, list[float]] = {}
    for method in candidates:
        worst = [float("inf")] * len(folds)
        for encoding, placement in pairs:
            graph, _ = build_qdq(fp32, tables[method], settings, encoding, (), threads, placement)
            candidate = session.outputs_of(graph.model, batches)
            for index, (start, stop) in enumerate(folds):
                metrics = compare_outputs(take(reference, start, stop, session.output_axes), take(candidate, start, stop, session.output_axes),
                                          None, session.options.output_kinds, axes)
                worst[index] = min(worst[index], lowest_cosine(metrics))
        scores[method] = worst
    baseline = METHODS[0]
    better = [m for m in scores if m == baseline or (np.mean(scores[m]) > np.mean(scores[baseline]) and min(scores[m]) > min(scores[baseline]))]
    chosen = max(better, key=lambda m: (float(np.mean(scores[m])), -candidates.index(m)))
    table = tables[chosen]
    table.parameters = {**table.parameters, AUTO: {
        "chosen": chosen, "scores": {m: [round(v, 5) for v in folds_scores] for m, folds_scores in scores.items()},
        "judged_on": f"{samples} calibration samples in {len(folds)} parts: lowest output cosine vs FP32, worst encoding; "
                     f"a method replaces {baseline} only if it scores higher on average and on its worst part"}}
    return table

