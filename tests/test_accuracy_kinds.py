"""Task-aware accuracy: every output scored with the metric that fits it, against hand-made
outputs with known answers, the default gate, user metrics, and gates naming the output."""

from __future__ import annotations

import numpy as np
import pytest

from enginekit.accuracy import compare_outputs, gate, infer_kind, parse_conditions
from enginekit.accuracy.metrics import headline, kind_metrics
from enginekit.core.errors import GateError, InputError

RNG = np.random.default_rng(0)


def test_kinds_are_inferred_from_shape_values_and_names():
    probabilities = RNG.random((8, 5))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    unit = RNG.standard_normal((8, 16))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert infer_kind("out", probabilities) == "classification"
    assert infer_kind("logits", RNG.standard_normal((8, 10))) == "classification"
    assert infer_kind("sentence_embedding", RNG.standard_normal((8, 16))) == "embedding"
    assert infer_kind("out", unit) == "embedding"
    assert infer_kind("boxes", RNG.standard_normal((8, 4))) == "generic"  # ambiguous: never top-1 of a regression
    assert infer_kind("map", RNG.random((2, 1, 16, 16))) == "dense"
    ctc = RNG.random((2, 40, 30))
    assert infer_kind("out", ctc / ctc.sum(axis=2, keepdims=True)) == "sequence"
    assert infer_kind("last_hidden_state", RNG.standard_normal((2, 40, 30))) == "embedding"
    assert infer_kind("score", RNG.standard_normal((8, 1))) == "generic"
    # a "pred" in a regression head's name does not make it class scores (YOLOS, depth models)
    assert infer_kind("pred_boxes", RNG.random((2, 10, 4))) == "generic"
    assert infer_kind("predicted_depth", RNG.random((2, 16, 16))) == "generic"
    assert infer_kind("pred_logits", RNG.standard_normal((2, 10, 5))) == "sequence"



def test_integer_outputs_are_labels_scored_by_the_share_they_get_right():
    """skl2onnx's int64 class ids and a segmentation net's arg-max mask: by cosine, half the labels
    wrong scored 0.815 and passed no gate it should fail by; as labels they are right or wrong."""
    labels = RNG.integers(0, 4, (64,))
    half_wrong = labels.copy()
    half_wrong[::2] = (labels[::2] + 1) % 4
    assert infer_kind("label", labels) == "labels" and infer_kind("mask", labels.reshape(4, 4, 4) > 1) == "labels"
    metrics = compare_outputs({"label": labels}, {"label": half_wrong})
    assert metrics["outputs"]["label"]["kind"] == "labels"
    assert metrics["label_agreement"] == 0.5 and metrics["cosine"] > 0.7  # what cosine would have said
    assert headline(metrics) == "label_agreement 0.5000"
    with pytest.raises(GateError, match="label_agreement"):
        gate(metrics, None, "m", "int8")
    mask = RNG.integers(0, 3, (8, 16, 16))
    flipped = mask.copy()
    flipped[:, :2, :] = (mask[:, :2, :] + 1) % 3  # 12.5 % of the pixels
    assert compare_outputs({"mask": mask}, {"mask": flipped})["label_agreement"] == pytest.approx(0.875)
    assert gate(compare_outputs({"mask": mask}, {"mask": mask}), None, "m", "int8")["default_gate"]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_log_probabilities_are_scores_compared_as_probabilities():
    """A LogSoftmax output (a PyTorch CTC model's) is a sequence, not a generic tensor, and is
    compared as probabilities: over log-probabilities, rows perturbed until 62 % of positions
    keep their arg-max still have cosine 0.988, above the default gate's 0.98."""
    logits = RNG.normal(0, 2, (16, 32, 37))
    logits[..., 0] += 4  # the CTC blank dominates
    ref, got = _log_softmax(logits), _log_softmax(logits + RNG.normal(0, 1, logits.shape))
    assert infer_kind("output", ref) == "sequence" and infer_kind("output", ref[:, 0]) == "classification"
    assert infer_kind("output", logits) == "generic"  # raw scores with no telling name stay generic
    metrics = kind_metrics("sequence", ref, got)
    assert metrics["position_agreement"] < 0.7
    assert metrics["cosine"] < 0.9, metrics  # the log-probabilities' own cosine is above 0.98
    rows = ref.reshape(-1, 37), got.reshape(-1, 37)
    assert np.mean(np.sum(rows[0] * rows[1], 1) / np.linalg.norm(rows[0], axis=1) / np.linalg.norm(rows[1], axis=1)) > 0.98
    assert kind_metrics("sequence", ref, ref)["cosine"] == pytest.approx(1.0)

def test_classification_metrics_have_known_answers():
    ref = np.array([[0.1, 0.9, 0, 0, 0, 0], [0.8, 0.1, 0.1, 0, 0, 0], [0, 0, 0, 0, 0.3, 0.7], [0.5, 0.4, 0.1, 0, 0, 0]])
    got = ref.copy()
    got[1] = [0.1, 0.8, 0.1, 0, 0, 0]  # one of four flips its top-1
    metrics = kind_metrics("classification", ref, got, labels=np.array([1, 0, 5, 0]))
    assert metrics["top1_agreement"] == 0.75 and metrics["accuracy"] == 0.75 and metrics["fp32_accuracy"] == 1.0
    assert 0 < metrics["top5_overlap"] <= 1


def test_sequence_metrics_count_positions():
    ref = np.zeros((2, 4, 3))
    ref[:, :, 0] = 1
    got = ref.copy()
    got[0, 1] = [0, 1, 0]  # one of eight positions disagrees
    assert kind_metrics("sequence", ref, got)["position_agreement"] == 7 / 8


def test_dense_maps_stay_meaningful_when_a_sample_is_near_empty():
    """A blank crop's map is a speck of noise on both sides: it must not drag the score to 0."""
    ref = np.zeros((3, 1, 32, 32))
    ref[0, 0, 8:16, 8:16] = 0.9
    ref[1, 0, 20:30, 2:12] = 0.8
    ref[2] = 1e-6 * RNG.random((1, 32, 32))  # a blank crop
    got = ref + 0.01 * RNG.standard_normal(ref.shape) * (ref > 0.1)
    got[2] = 1e-6 * RNG.random((1, 32, 32))  # unrelated noise where the reference is blank
    metrics = kind_metrics("dense", ref, got)
    assert metrics["cosine"] > 0.99 and metrics["cosine_min"] > 0.99 and metrics["iou"] == 1.0
    shifted = np.roll(ref, 4, axis=3)  # half of each blob moves: IoU drops
    assert kind_metrics("dense", ref, shifted)["iou"] == pytest.approx((8 * 4 + 10 * 6) / (8 * 12 + 10 * 14))


def test_empty_maps_on_both_sides_agree():
    ref = np.zeros((2, 1, 8, 8))
    metrics = kind_metrics("dense", ref, ref.copy())
    assert metrics["iou"] == 1.0 and metrics["cosine"] == 1.0


def test_every_output_is_scored_and_the_gate_names_the_one_that_failed():
    probabilities = RNG.random((16, 2))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    boxes = RNG.standard_normal((16, 4))
    reference = {"prob": probabilities, "boxes": boxes}
    candidate = {"prob": probabilities.copy(), "boxes": -boxes}  # the second head is broken
    metrics = compare_outputs(reference, candidate)
    assert metrics["outputs"]["prob"]["kind"] == "classification" and metrics["outputs"]["boxes"]["kind"] == "generic"
    assert metrics["top1_agreement"] == 1.0  # the summary is the first output
    with pytest.raises(GateError, match=r"output 'boxes' \(generic\): cosine=-1.0000"):
        gate(metrics, None, "m int8", "int8")
    with pytest.raises(GateError, match="output 'boxes'"):
        gate(metrics, parse_conditions("cosine>=0.9"), "m int8")
    assert gate(metrics, parse_conditions("prob:top1_agreement>=0.99"), "m int8")["passed"]
    assert headline(metrics) == "cosine -1.0000 (boxes)"


def test_the_default_gate_by_precision_and_kind():
    ref = RNG.standard_normal((32, 10))
    noisy = ref + 0.3 * RNG.standard_normal(ref.shape)
    metrics = compare_outputs({"logits": ref}, {"logits": noisy})
    assert metrics["outputs"]["logits"]["kind"] == "classification"
    top1 = metrics["top1_agreement"]
    if top1 >= 0.90:
        assert gate(metrics, None, "m", "int8")["default_gate"]
    with pytest.raises(GateError, match="default gate"):
        gate(metrics, None, "m", "fp32")  # a float conversion must keep cosine >= 0.999
    assert gate(metrics, parse_conditions("none"), "m", "fp32")["conditions"] == []


def test_output_kinds_can_be_set_and_unknown_ones_are_refused():
    ref = {"out": RNG.standard_normal((4, 8))}
    assert compare_outputs(ref, ref, kinds={"out": "embedding"})["outputs"]["out"]["kind"] == "embedding"
    with pytest.raises(InputError, match="not one of"):
        compare_outputs(ref, ref, kinds={"out": "heatmap"})
    with pytest.raises(InputError, match="output kinds name"):
        compare_outputs(ref, ref, kinds={"nope": "dense"})


def test_outputs_with_their_batch_on_another_axis():
    state = RNG.standard_normal((2, 6, 4))  # [layers, batch, hidden]
    metrics = compare_outputs({"state": state}, {"state": state}, batch_axes={"state": 1})
    assert metrics["samples"] == 6.0 and metrics["cosine"] == 1.0


def test_conditions_parse_outputs_and_refuse_garbage():
    condition = parse_conditions("save_infer_model/scale_0.tmp_1:top1_agreement>=0.9")[0]
    assert condition.output == "save_infer_model/scale_0.tmp_1" and condition.metric == "top1_agreement"
    assert parse_conditions(None) is None and parse_conditions("none") == []
    for bad in ("top1>=x", "cosine>=nan", ">=0.9"):
        with pytest.raises(InputError):
            parse_conditions(bad)


def test_a_user_metric_is_reported_and_gated(tmp_path, monkeypatch):
    from enginekit.accuracy import load_user_metric
    from enginekit.accuracy.user import run_user_metric

    (tmp_path / "mymetric.py").write_text("def worst_abs(ref, got, labels):\n    return {'max_abs': float(max(abs(ref[k] - got[k]).max() for k in ref))}\n")
    monkeypatch.chdir(tmp_path)
    metric = load_user_metric("mymetric:worst_abs")
    ref = {"y": np.zeros((4, 3))}
    figures = run_user_metric(metric, ref, {"y": np.full((4, 3), 0.5)}, None)
    assert figures == {"max_abs": 0.5}
    metrics = {**compare_outputs(ref, ref), "user": figures}
    with pytest.raises(GateError, match="max_abs=0.5000"):
        gate(metrics, parse_conditions("max_abs<=0.1"), "m")
    with pytest.raises(InputError, match="cannot load the metric"):
        load_user_metric("nosuchmodule:f")


def _yolo_rows(batch: int = 4, anchors: int = 300, classes: int = 6) -> np.ndarray:
    """[batch, 4 + classes, anchors] as a YOLOv8 head writes it: boxes in pixels, sigmoid scores."""
    boxes = RNG.uniform(0, 320, (batch, 4, anchors))
    scores = 1 / (1 + np.exp(-RNG.normal(-4, 2.5, (batch, classes, anchors))))
    return np.concatenate([boxes, scores], axis=1)


def test_a_yolo_style_output_is_a_detection_in_either_layout_whatever_its_name():
    rows = _yolo_rows()
    assert infer_kind("output0", rows) == "detection"
    assert infer_kind("output0", rows.transpose(0, 2, 1)) == "detection"  # YOLOv5's [batch, anchors, 5 + classes]
    assert infer_kind("pred", rows) == "detection"  # a "pred" name does not make 300 anchors class scores
    assert infer_kind("out", RNG.random((2, 30, 10))) == "generic"  # per-frame sigmoids: no box leaves [0, 1]
    assert infer_kind("out", RNG.standard_normal((2, 30, 10)) * 10) == "generic"  # unbounded features after the first 4
    assert infer_kind("pred_boxes", RNG.uniform(0, 300, (2, 10, 4))) == "generic"  # boxes alone


def test_detection_scores_are_gated_apart_from_the_boxes_that_dwarf_them():
    """Scores moved by up to 0.3 leave the whole tensor's cosine above 0.999 (pixels dominate it);
    the default gate must fail on the scores and name them."""
    ref = _yolo_rows()
    got = ref.copy()
    got[:, 4:] = np.clip(got[:, 4:] + RNG.uniform(-0.3, 0.3, got[:, 4:].shape) * (got[:, 4:] > 0.1), 0, 1)
    metrics = compare_outputs({"output0": ref}, {"output0": got})
    output = metrics["outputs"]["output0"]
    assert output["kind"] == "detection" and output["cosine"] > 0.999
    assert output["box_cosine"] == pytest.approx(1.0) and output["score_cosine"] < 0.95
    assert 0 < output["detection_agreement"] < 1 and output["detections"] == float((ref[:, 4:].max(1) >= 0.25).sum())
    assert headline(metrics).startswith("score_cosine")
    with pytest.raises(GateError, match="output0.*score_cosine"):
        gate(metrics, None, "int8")
    exact = compare_outputs({"output0": ref}, {"output0": ref.copy()})
    assert exact["outputs"]["output0"]["detection_agreement"] == 1.0
    assert gate(exact, None, "int8")["conditions"] == ["output0:box_cosine>=0.98", "output0:score_cosine>=0.98"]


def test_a_detection_kind_set_on_an_output_without_box_and_scores_is_refused():
    boxes = RNG.uniform(0, 300, (2, 10, 4))
    with pytest.raises(InputError, match="detection output.*shape \\[2, 10, 4\\]"):
        compare_outputs({"b": boxes}, {"b": boxes}, kinds={"b": "detection"})


def test_a_segmenting_or_pose_head_keeps_its_extras_apart_from_its_scores():
    """YOLOv8-seg/-pose append mask coefficients or keypoints after the scores: the scores are the
    run of features that stays in [0, 1]; the extras are scored and gated on their own."""
    rows = _yolo_rows()
    extras = RNG.normal(0, 3, (4, 5, rows.shape[2]))
    ref = np.concatenate([rows, extras], axis=1)
    assert infer_kind("output0", ref) == "detection"
    got = ref.copy()
    got[:, -5:] += RNG.normal(0, 1.5, extras.shape)  # the extras broken, boxes and scores exact
    output = compare_outputs({"output0": ref}, {"output0": got})["outputs"]["output0"]
    assert output["score_cosine"] == pytest.approx(1.0) and output["box_cosine"] == pytest.approx(1.0) and output["extra_cosine"] < 0.95
    with pytest.raises(GateError, match="extra_cosine"):
        gate(compare_outputs({"output0": ref}, {"output0": got}), None, "int8")
