"""Accuracy against the FP32 reference, on every output, with the metric that fits the output.

Output kinds (inferred from shape, values and name where that is unambiguous; set per output
with `output_kinds`):
- classification ([batch, classes]): top1_agreement (arg-max matches FP32's), top5_overlap
  (|top-5 & top-5| / 5, with >= 5 classes), cosine; accuracy / fp32_accuracy against labels.
- embedding ([batch, dim] or [batch, tokens, dim]): cosine per vector, cosine_min.
- dense (maps of rank >= 4, e.g. segmentation or detection heat maps): cosine over the whole
  evaluation set and per sample (near-empty samples, whose energy is a speck of the mean, are
  left out of cosine_min: a blank crop's map is noise on both sides), sqnr_db, and iou: the
  intersection over union of the maps thresholded at half the reference's range (both empty:
  1.0).
- sequence ([batch, positions, classes] scores: CTC, token classification): position_agreement
  (arg-max per position matches FP32's), cosine.
  Log-probabilities (a LogSoftmax output) are read as classification or sequence scores and
  compared as the probabilities they stand for.
- detection ([batch, features, anchors] or [batch, anchors, features]: 4 box coordinates, then
  scores in [0, 1], then maybe extras such as mask coefficients or keypoints, as a YOLO-style
  head concatenates them): box_cosine, score_cosine and extra_cosine, each over its own
  features, and detection_agreement (anchors whose best score reaches
  DETECTION_CONFIDENCE on either side that both keep with the same class). Over the whole
  tensor, cosine is the box coordinates' (hundreds of pixels against scores below 1): a real
  YOLOv8n whose INT8 scores moved by 0.10 at the anchors it detects scored 0.9997.
- generic (anything else): cosine over the set, cosine_min, sqnr_db.
Every kind reports `finite`; NaN or Inf in an output fails any gate.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from enginekit.core.errors import InputError
from enginekit.core.tensors import Feeds, batch_size, join, take

KINDS = ("classification", "embedding", "dense", "sequence", "detection", "labels", "generic")
_CLASSIFICATION_NAMES = re.compile(r"logit|prob|score|class|cls|pred|softmax", re.I)
_EMBEDDING_NAMES = re.compile(r"embed|pool|hidden|feature|sentence|vector|encod", re.I)
# quantities a head regresses (YOLOS's pred_boxes, a depth model's predicted_depth): a "pred" in
# the name does not make them class scores, and an arg-max over box coordinates means nothing
_REGRESSION_NAMES = re.compile(r"box|coord|depth|offset|regress|landmark|keypoint|disparit|flow", re.I)
NEAR_EMPTY = 1e-3  # a sample whose energy is below this share of the mean sample's is "near empty"
BOX_COORDINATES = 4  # a detection row starts with its box: (cx, cy, w, h) or (x1, y1, x2, y2)
DETECTION_CONFIDENCE = 0.25  # the score a YOLO-style predictor keeps by default (Ultralytics' conf)
DETECTION_COSINES = ("box_cosine", "score_cosine", "extra_cosine")  # a detection's parts, each gated on its own


def collect_outputs(run: Callable[[Feeds], Mapping[str, np.ndarray]], batches: Iterable[Feeds], max_batch: int | None = None,
                    input_axes: Mapping[str, int | None] | None = None, output_axes: Mapping[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """Every output of `run` over the batches, joined along each output's batch axis, by name;
    batches larger than `max_batch` (what a runtime's profile allows) are fed in slices."""
    parts: list[Mapping[str, np.ndarray]] = []
    for feeds in batches:
        size = batch_size(feeds, input_axes)
        step = max_batch or size
        for start in range(0, size, step):
            piece = feeds if step >= size else take(feeds, start, start + step, input_axes)
            parts.append({name: np.asarray(value) for name, value in run(piece).items()})
    return join(parts, output_axes) if parts else {}


def aligned(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, reference, candidate) per reference output: matched by name, else by position (a
    runtime that renames outputs keeps their order)."""
    if all(name in candidate for name in reference):
        return [(name, reference[name], candidate[name]) for name in reference]
    if len(candidate) != len(reference):
        raise InputError(f"the artifact has outputs {sorted(candidate)}, the FP32 model {sorted(reference)}")
    return [(name, ref, got) for (name, ref), got in zip(reference.items(), candidate.values())]


def infer_kind(name: str, reference: np.ndarray) -> str:
    """The output's kind from its dtype, its shape, its values and (for ambiguous shapes) its name."""
    if np.asarray(reference).dtype.kind in "biu":  # class ids, arg-max masks, flags: right or wrong, never near
        return "labels"
    ref = np.asarray(reference, np.float64)
    if ref.ndim >= 4 and np.prod(ref.shape[2:]) > 1:
        return "dense"
    if ref.ndim not in (2, 3) or ref.shape[-1] < 2:
        return "generic"
    rows = ref.reshape(-1, ref.shape[-1])
    probabilities = bool(np.all(rows >= -1e-6) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3)) or log_probabilities(ref)
    if not probabilities and looks_like_detections(ref):  # before the name: a YOLO head's "pred" is no class score
        return "detection"
    unit_norm = bool(np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3))
    if probabilities or (_CLASSIFICATION_NAMES.search(name) and not _EMBEDDING_NAMES.search(name) and not _REGRESSION_NAMES.search(name)):
        return "classification" if ref.ndim == 2 else "sequence"
    if unit_norm or _EMBEDDING_NAMES.search(name):
        return "embedding"
    return "generic"


def detection_rows(values: np.ndarray) -> np.ndarray:
    """[batch, anchors, features] of a detection output in either layout: the features are the
    shorter of the two axes after the batch (YOLOv8's [1, 84, 8400], YOLOv5's [1, 25200, 85])."""
    values = np.asarray(values)
    if values.ndim != 3 or min(values.shape[1:]) <= BOX_COORDINATES:
        raise InputError(f"a detection output is [batch, features, anchors] or [batch, anchors, features] with more than "
                         f"{BOX_COORDINATES} features (box, then scores); this one has shape {list(values.shape)}",
                         option="output_kinds")
    return np.swapaxes(values, 1, 2) if values.shape[1] < values.shape[2] else values


def score_features(rows: np.ndarray) -> int:
    """How many features after the box are scores: the run of them that never leaves [0, 1] in
    the reference. What follows are extras (YOLOv8-seg's mask coefficients, -pose's keypoints)."""
    after = rows[..., BOX_COORDINATES:].reshape(-1, rows.shape[-1] - BOX_COORDINATES)
    inside = (after.min(axis=0) >= 0.0) & (after.max(axis=0) <= 1.0)
    return int(np.argmin(inside)) if not inside.all() else len(inside)


def looks_like_detections(reference: np.ndarray) -> bool:
    """Rows of box coordinates that leave [0, 1] (pixels) followed by scores that never do (and
    maybe extras): the layout a YOLO-style detector's single output concatenates. A tensor all
    in [0, 1] (per-frame sigmoids) or with unbounded features after the first 4 (hidden states)
    is not one."""
    values = np.asarray(reference, np.float64)
    if values.ndim != 3 or min(values.shape[1:]) <= BOX_COORDINATES or not np.isfinite(values).all():
        return False
    rows = detection_rows(values)
    return bool(np.abs(rows[..., :BOX_COORDINATES]).max() > 1.0 and score_features(rows) > 0)


def log_probabilities(values: np.ndarray) -> bool:
    """Rows along the last axis that are log-probabilities (a LogSoftmax: a PyTorch CTC or NLL
    model's output): none above 0, and each row's exponentials sum to 1."""
    values = np.asarray(values, np.float64)
    if values.ndim < 2 or values.size == 0 or values.shape[-1] < 2:
        return False
    rows = values.reshape(-1, values.shape[-1])
    if not np.isfinite(rows).all() or np.any(rows > 1e-6):
        return False
    top = rows.max(axis=1)
    return bool(np.allclose(top + np.log(np.exp(rows - top[:, None]).sum(axis=1)), 0.0, atol=1e-3))


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine of each row; rows that are zero on both sides agree exactly (1.0)."""
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(got, axis=1) == 0)
    safe = np.where(norms > 0, norms, 1.0)
    return np.where(norms > 0, np.sum(ref * got, axis=1) / safe, np.where(both_zero, 1.0, 0.0))


def _global_cosine(ref: np.ndarray, got: np.ndarray) -> float:
    return float(_cosines(ref.reshape(1, -1), got.reshape(1, -1))[0])


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref - got) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def kind_metrics(kind: str, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """The metrics of one output of the given kind (both arrays batch-first, same shape)."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    metrics: dict[str, float] = {"samples": float(len(ref)), "finite": float(np.isfinite(got).all())}
    if ref.shape != got.shape:
        raise InputError(f"an output has shape {list(got.shape)} where the FP32 model's has {list(ref.shape)}")
    if not metrics["finite"] or ref.size == 0:
        return metrics
    if kind in ("classification", "sequence") and log_probabilities(ref):
        # compared as the probabilities they stand for: over log-probabilities, cosine mostly
        # measures the rows' common offset (CTC-like rows of 37 classes, perturbed until 62 % of
        # positions keep their arg-max, still score 0.988 against a 0.98 gate; as probabilities 0.84)
        ref, got = np.exp(ref), np.exp(got)
    flat_ref, flat_got = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    if kind == "classification":
        sample_cos = _cosines(flat_ref, flat_got)
        metrics.update(cosine=float(sample_cos.mean()), cosine_min=float(sample_cos.min()), sqnr_db=_sqnr(ref, got))
        metrics["top1_agreement"] = float(np.mean(flat_ref.argmax(1) == flat_got.argmax(1)))
        if flat_ref.shape[1] >= 5:
            top_ref = np.argsort(-flat_ref, axis=1)[:, :5]
            top_got = np.argsort(-flat_got, axis=1)[:, :5]
            metrics["top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_ref, top_got)]))
        if labels is not None:
            metrics["accuracy"] = float(np.mean(flat_got.argmax(1) == labels[: len(flat_got)]))
            metrics["fp32_accuracy"] = float(np.mean(flat_ref.argmax(1) == labels[: len(flat_ref)]))
    elif kind == "detection":
        metrics.update(cosine=_global_cosine(ref, got), sqnr_db=_sqnr(ref, got), **detection_metrics(ref, got))
    elif kind == "labels":
        # the share of values the candidate gets exactly right: by cosine, skl2onnx's labels with half
        # of them wrong scored 0.815, and an arg-max mask with 8 % of its pixels flipped 0.968
        metrics.update(label_agreement=float(np.mean(flat_ref == flat_got)), cosine=_global_cosine(ref, got))
    elif kind in ("embedding", "sequence"):
        vectors_ref, vectors_got = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
        vector_cos = _cosines(vectors_ref, vectors_got)
        metrics.update(cosine=float(vector_cos.mean()), cosine_min=float(vector_cos.min()), sqnr_db=_sqnr(ref, got))
        if kind == "sequence":
            metrics["position_agreement"] = float(np.mean(vectors_ref.argmax(1) == vectors_got.argmax(1)))
    else:
        energy = np.sum(flat_ref ** 2, axis=1)
        meaningful = energy > NEAR_EMPTY * max(float(energy.mean()), 1e-30)
        sample_cos = _cosines(flat_ref, flat_got)
        metrics.update(cosine=_global_cosine(ref, got), sqnr_db=_sqnr(ref, got),
                       cosine_min=float(sample_cos[meaningful].min()) if meaningful.any() else 1.0)
        if kind == "dense":
            low, high = float(ref.min()), float(ref.max())
            threshold = low + 0.5 * (high - low)
            ref_on, got_on = ref > threshold, got > threshold
            union = np.logical_or(ref_on, got_on).sum()
            metrics["iou"] = float(np.logical_and(ref_on, got_on).sum() / union) if union else 1.0
    return metrics


def detection_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Boxes, scores and extras (if any) of a detection output compared apart, and which anchors
    stay detections (best score >= DETECTION_CONFIDENCE) of the same class. Where no feature
    after the box stays in [0, 1] (the kind set by hand), all of them are scores."""
    ref, got = detection_rows(ref), detection_rows(got)
    end = BOX_COORDINATES + (score_features(ref) or ref.shape[-1] - BOX_COORDINATES)
    ref_scores, got_scores = ref[..., BOX_COORDINATES:end], got[..., BOX_COORDINATES:end]
    extras = {"extra_cosine": _global_cosine(ref[..., end:], got[..., end:])} if end < ref.shape[-1] else {}
    ref_kept, got_kept = ref_scores.max(-1) >= DETECTION_CONFIDENCE, got_scores.max(-1) >= DETECTION_CONFIDENCE
    either = np.logical_or(ref_kept, got_kept)
    same = ref_kept & got_kept & (ref_scores.argmax(-1) == got_scores.argmax(-1))
    return {"box_cosine": _global_cosine(ref[..., :BOX_COORDINATES], got[..., :BOX_COORDINATES]),
            "score_cosine": _global_cosine(ref_scores, got_scores),
            "detection_agreement": float(same.sum() / either.sum()) if either.any() else 1.0,
            "detections": float(ref_kept.sum()), **extras}


def compare_outputs(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
                    kinds: Mapping[str, str] | None = None, batch_axes: Mapping[str, int] | None = None) -> dict[str, object]:
    """Metrics of every output of the candidate against the reference's: `outputs` holds them per
    output name (with its kind); the first output's metrics are also at the top level (the
    summary a report shows). `kinds` overrides the inferred kind of an output; `batch_axes`
    says where an output's batch is when it is not axis 0."""
    kinds = dict(kinds or {})
    unknown = sorted(set(kinds) - set(reference))
    if unknown:
        raise InputError(f"output kinds name {unknown}, but the model's outputs are {sorted(reference)}", option="output_kinds")
    per_output: dict[str, dict[str, object]] = {}
    for index, (name, ref, got) in enumerate(aligned(reference, candidate)):
        axis = (batch_axes or {}).get(name, 0)
        ref, got = np.moveaxis(np.asarray(ref), axis, 0), np.moveaxis(np.asarray(got), axis, 0)
        kind = kinds.get(name) or infer_kind(name, ref)
        if kind not in KINDS:
            raise InputError(f"output kind '{kind}' of '{name}' is not one of {', '.join(KINDS)}", option="output_kinds")
        per_output[name] = {"kind": kind, **kind_metrics(kind, ref, got, labels if index == 0 else None)}
    first = next(iter(per_output.values()))
    summary = {key: value for key, value in first.items() if key != "kind"}
    summary["finite"] = float(all(m["finite"] for m in per_output.values()))
    return {**summary, "outputs": per_output}


def output_metrics(ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None = None, kind: str | None = None) -> dict[str, float]:
    """The metrics of one output array pair (kind inferred unless given)."""
    return kind_metrics(kind or infer_kind("", ref), ref, got, labels)


HEADLINE = {"classification": "top1_agreement", "sequence": "position_agreement", "dense": "cosine", "embedding": "cosine",
            "detection": "score_cosine", "labels": "label_agreement", "generic": "cosine"}


def headlines(metrics: Mapping[str, object]) -> list[tuple[str, str, str, float]]:
    """(output, kind, metric, value) of the metric that matters for each output's kind."""
    outputs = metrics.get("outputs") or {"": {**metrics, "kind": infer_kind_from_metrics(metrics)}}
    rows = []
    for name, output in outputs.items():
        kind = str(output.get("kind", "generic"))
        metric = HEADLINE.get(kind, "cosine")
        if metric in output:
            rows.append((name, kind, metric, float(output[metric])))
    return rows


def infer_kind_from_metrics(metrics: Mapping[str, object]) -> str:
    """The kind a flat (older) metrics dict describes."""
    return "classification" if "top1_agreement" in metrics else "generic"


def lowest_cosine(metrics: Mapping[str, Any]) -> float:
    """The lowest cosine to FP32 over the outputs (a detection's parts included): a score every
    output kind reports, and that moves smoothly where agreement counts on a few samples do not."""
    outputs = metrics.get("outputs") or {"": metrics}
    return min(min(float(m[name]) for name in ("cosine", *DETECTION_COSINES) if name in m) if "cosine" in m else 0.0
               for m in outputs.values())


def headline(metrics: Mapping[str, object]) -> str:
    """One line: the metric that matters, for the output that is worst on it ('top1_agreement
    0.9258', 'cosine 0.9912 (boxes)'); labelled task accuracy first where it exists."""
    rows = headlines(metrics)
    if "accuracy" in metrics:
        return f"accuracy {float(metrics['accuracy']):.4f}"
    if not rows:
        return "-"
    name, _, metric, value = min(rows, key=lambda row: row[3])
    where = f" ({name})" if len(rows) > 1 and name else ""
    return f"{metric} {value:.4f}{where}"
