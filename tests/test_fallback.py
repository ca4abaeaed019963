"""--auto-fallback: the fewest float layers that make the gate pass, searched once on the Q/DQ
graph, applied to every INT8 target, recorded in the manifest; a bound no set meets fails in one
line with the best found."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import enginekit as ek
from enginekit.core.errors import GateError, InputError

RNG = np.random.default_rng(3)


def _model(path, hard_tensor: bool = True) -> None:
    """x -> conv1 -> relu -> conv2 -> relu -> conv3 -> y, where conv1's first channel is a
    constant 500 that conv2 all but ignores: one per-tensor range for conv1's output leaves its
    other channels a handful of levels. Only the layers around that tensor need float."""
    inits, nodes, source = [], [], "x"
    for index, (cin, cout) in enumerate([(4, 8), (8, 8), (8, 4)], 1):
        weight = RNG.normal(0, 0.5, (cout, cin, 3, 3)).astype(np.float32)
        bias = RNG.normal(0, 0.1, cout).astype(np.float32)
        if index == 1 and hard_tensor:
            weight[0], bias[0] = 0.0, 500.0
        if index == 2 and hard_tensor:
            weight[:, 0] *= 1e-4
        inits += [numpy_helper.from_array(weight, f"w{index}"), numpy_helper.from_array(bias, f"b{index}")]
        nodes.append(helper.make_node("Conv", [source, f"w{index}", f"b{index}"], [f"c{index}"], name=f"conv{index}", pads=[1, 1, 1, 1]))
        source = f"c{index}"
        if index < 3:
            nodes.append(helper.make_node("Relu", [source], [f"r{index}"], name=f"relu{index}"))
            source = f"r{index}"
    graph = helper.make_graph(nodes, "three", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("c3", TensorProto.FLOAT, ["batch", 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _data(folder):
    calibration = RNG.normal(0, 1, (32, 4, 8, 8)).astype(np.float32)
    evaluation = RNG.normal(0, 1, (64, 4, 8, 8)).astype(np.float32)
    np.savez(folder / "calibration.npz", x=calibration)
    np.savez(folder / "evaluation.npz", x=evaluation)
    return str(folder / "calibration.npz"), str(folder / "evaluation.npz")


@pytest.fixture()
def case(tmp_path):
    _model(tmp_path / "model.onnx")
    calibration, evaluation = _data(tmp_path)
    return tmp_path, calibration, evaluation


def _options(calibration, evaluation, **extra):
    extra = {"min_accuracy": "cosine>=0.99", **extra}
    extra = {"num_samples": 32, "quantize": ek.QuantizeSettings(bias_correction=False), **extra}
    return ek.BuildOptions(calib_data=calibration, eval_data=evaluation, **extra)


def test_without_fallback_the_int8_build_fails_its_gate(case):
    folder, calibration, evaluation = case
    with pytest.raises(GateError, match="cosine"):
        ek.build(str(folder / "model.onnx"), "onnxruntime", "int8", folder / "plain", _options(calibration, evaluation))


def test_auto_fallback_keeps_the_fewest_layers_float_and_every_target_gets_them(case):
    folder, calibration, evaluation = case
    cells = ek.build_many(str(folder / "model.onnx"), ["onnxruntime", "openvino"], ["int8"], folder / "out",
                          _options(calibration, evaluation, auto_fallback=True))
    built = [cell for cell in cells if cell.result is not None]
    assert built and not [cell.failed for cell in cells if cell.failed]
    for cell in built:
        manifest = cell.manifest
        fallback = manifest["fallback"]
        assert fallback["passed"] and 1 <= len(fallback["float_layers"]) <= 2, fallback
        assert set(fallback["float_layers"]) <= {"conv1", "conv2", "conv3"}
        assert manifest["quantization"]["exclude_nodes"] == fallback["float_layers"]  # the artifact was built with them
        assert manifest["accuracy"]["passed"] and manifest["accuracy"]["metrics"]["cosine"] >= 0.99  # verified on the target's runtime
    assert len({tuple(cell.manifest["fallback"]["float_layers"]) for cell in built}) == 1  # one set for every target
    assert built[0].manifest["fallback"]["judged_on"] == {"mixed/inputs": ["openvino"], "uint8/outputs": ["onnxruntime"]}


def test_a_bound_no_set_meets_fails_in_one_line_with_the_best_found(case):
    folder, calibration, evaluation = case
    # ONNX Runtime quantizes conv1's output at conv1 and again where conv2 reads it: one float layer cannot free it
    with pytest.raises(GateError, match=r"no fallback of at most 1 float layers meets the accuracy gate: the best found keeps "
                                        r"[01] in float \(.*\) and reaches cosine 0\.9\d+ \(all-INT8: cosine 0\.9\d+\)"):
        ek.build(str(folder / "model.onnx"), "onnxruntime", "int8", folder / "bounded",
                 _options(calibration, evaluation, auto_fallback=True, max_float_layers=1))
    assert not (folder / "bounded").exists()


def test_a_gate_no_helpful_layer_can_meet_does_not_point_at_the_bound(case, run_cli):
    """Every unit the ranking found helpful was tried within the bound: a larger
    --max-float-layers cannot help, so the line names the gate instead (a new user raised the
    bound from 16 to 40 on the message's word and got the same result)."""
    folder, calibration, evaluation = case
    result = run_cli("build", "-m", folder / "model.onnx", "--targets", "onnxruntime", "--precisions", "int8",
                     "--calib-data", calibration, "--eval-data", evaluation, "-n", "32", "--min-accuracy", "cosine>=0.9999999",
                     "--auto-fallback", "--max-float-layers", "64", "-o", folder / "unreachable")
    assert result.code == 1
    line = result.error_line
    assert "every layer whose float helped alone was tried, within the bound of 64" in line and line.endswith("(see --min-accuracy)")
    assert "--max-float-layers" not in line and not (folder / "unreachable").exists()


def test_the_command_line_builds_with_fallback_and_names_the_float_layers(case, run_cli):
    folder, calibration, evaluation = case
    common = ["build", "-m", folder / "model.onnx", "--targets", "onnxruntime", "--precisions", "int8", "--calib-data", calibration,
              "--eval-data", evaluation, "-n", "32", "--min-accuracy", "cosine>=0.99", "--auto-fallback"]
    result = run_cli(*common, "-o", folder / "cli")
    assert result.code == 0, result.err
    manifest = json.loads((folder / "cli" / "manifest.json").read_text())
    assert manifest["fallback"]["float_layers"]
    bounded = run_cli(*common, "--max-float-layers", "1", "-o", folder / "cli1")
    assert bounded.code == 1
    assert len(bounded.err.strip().splitlines()) == 1 and "no fallback of at most 1 float layers" in bounded.err
    assert "Traceback" not in bounded.err and not (folder / "cli1").exists()


def test_sensitivity_ranks_the_layers_that_free_the_hard_tensor_first_and_writes_json(case, run_cli):
    folder, calibration, evaluation = case
    result = run_cli("sensitivity", "-m", folder / "model.onnx", "--calib-data", calibration, "--eval-data", evaluation, "-n", "32",
                     "--min-accuracy", "cosine>=0.99", "-o", folder / "ranking.json")
    assert result.code == 0, result.err
    ranking = json.loads((folder / "ranking.json").read_text())
    assert ranking["schema"] == "enginekit.sensitivity/1" and ranking["all_int8_margin"] < 0
    assert set(ranking["ranking"][0]["float_layers"]) == {"conv1", "conv2"}  # conv1's output, quantized at both ends on ONNX Runtime
    assert ranking["ranking"][0]["margin_gain"] > 0 >= ranking["ranking"][-1]["margin_gain"] - 1e-3
    assert "conv1, conv2" in result.out
    again = run_cli("sensitivity", "-m", folder / "model.onnx", "--calib-data", calibration, "--eval-data", evaluation,
                    "-o", folder / "model.onnx")
    assert again.code == 2 and "the output is also an input" in again.err


def test_tflite_keeps_the_fallback_layers_float_and_the_rest_integer(case):
    """TFLite quantizes the float graph itself: the fallback's layers are found in it by value and
    left float (DEQUANTIZE, float op, QUANTIZE), the other layers stay int8, and the gate is met on
    LiteRT."""
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")
    folder, calibration, evaluation = case
    cells = ek.build_many(str(folder / "model.onnx"), ["onnxruntime", "tflite"], ["int8"], folder / "out",
                          _options(calibration, evaluation, auto_fallback=True))
    assert not [cell.failed for cell in cells if cell.failed]
    manifest = next(cell.manifest for cell in cells if cell.target == "tflite")
    layers = manifest["fallback"]["float_layers"]
    assert manifest["tflite"]["float_layers"]["kept_float"] == layers and not manifest["tflite"]["float_layers"]["not_found_in_tflite"]
    assert manifest["fallback"]["judged_on"]["mixed/inputs"] == ["tflite"]  # each gate check converted and run on LiteRT
    types = manifest["tflite"]["types"]
    assert types["float32_compute_ops"] == ["CONV_2D"] * len(layers) and types["ops"]["CONV_2D"] == 3, types
    assert manifest["accuracy"]["passed"] and manifest["accuracy"]["metrics"]["cosine"] >= 0.99
    assert manifest["integer_share"] == pytest.approx(1 - len(layers) / 3)
    plain = ek.build(str(folder / "model.onnx"), "tflite", "int8", folder / "plain",
                     _options(calibration, evaluation, min_accuracy="none")).manifest
    assert plain["tflite"]["types"]["float32_compute_ops"] == [] and plain["accuracy"]["metrics"]["cosine"] < 0.99  # all-INT8 is below the gate
    print(f"tflite int8: cosine {plain['accuracy']['metrics']['cosine']:.4f} all-INT8, "
          f"{manifest['accuracy']['metrics']['cosine']:.4f} with {', '.join(layers)} float")


def test_when_no_set_passes_only_the_encodings_below_the_gate_fail(case, monkeypatch):
    """The search's bound is not met for ONNX Runtime's graph; an encoding that passes all-INT8 in
    the search (OpenVINO's, made to pass here) is built all-INT8 and judged by its own gate."""
    from enginekit.builder import fallback

    folder, calibration, evaluation = case
    real = fallback._Search.margins

    def openvino_passes(self, float_nodes, quick=False, pairs=None):
        result = real(self, float_nodes, quick, pairs)
        return {pair: ((abs(m) if pair[1] == "inputs" else m), metrics) for pair, (m, metrics) in result.items()}

    monkeypatch.setattr(fallback._Search, "margins", openvino_passes)
    cells = ek.build_many(str(folder / "model.onnx"), ["onnxruntime", "openvino"], ["int8"], folder / "mixed",
                          _options(calibration, evaluation, auto_fallback=True, max_float_layers=1))
    by_target = {cell.target: cell for cell in cells}
    assert by_target["onnxruntime"].failed and "no fallback of at most 1 float layers" in by_target["onnxruntime"].failed
    openvino = by_target["openvino"]
    assert openvino.failed and "no fallback" not in openvino.failed and "accuracy gate failed" in openvino.failed  # its own runtime's verdict


class _Runtime:
    """A target whose runtime is scripted: it runs the FP32 graph (`exact`) or the all-INT8 one
    (`ignores_float_layers`) whatever candidate it is given; `name=None`: it cannot run candidates."""

    def __init__(self, name, graph=None, error=None):
        self.name, self.graph, self.opened, self.error = name, graph, 0, error

    def options(self, given):
        return {}

    def candidate_runner(self, candidate):
        from enginekit.targets.onnxruntime import OrtRunner

        if self.error is not None:
            raise self.error
        if self.graph is None:
            return None
        self.opened += 1
        return OrtRunner(self.graph, threads=candidate.threads)


def _search_session(folder, calibration, evaluation):
    from enginekit.builder.session import ModelSession
    from enginekit.exporter.reference import load_fp32

    options = _options(calibration, evaluation, auto_fallback=True)
    session = ModelSession(load_fp32(str(folder / "model.onnx"), options.source_options()), options)
    session.int8_pairs = {("uint8", "outputs")}
    return session


def test_the_search_judges_its_gate_checks_on_the_targets_runtime(case):
    """A set that passes on the Q/DQ graph is not adopted when the runtime fails with it, and a
    runtime that passes all-INT8 needs no float layer; the reference executor still judges for a
    target of the same encoding that cannot run a candidate."""
    from enginekit.accuracy import parse_conditions
    from enginekit.builder.fallback import find_float_layers

    folder, calibration, evaluation = case
    session = _search_session(folder, calibration, evaluation)
    pair, gate = ("uint8", "outputs"), parse_conditions("cosine>=0.99")
    on_graph = find_float_layers(session, [pair], gate)
    assert on_graph.passed and on_graph.float_nodes and on_graph.judged_on == {"uint8/outputs": ["reference executor"]}

    all_int8 = session.qdq(*pair)[0].model
    stubborn = _Runtime("stubborn", all_int8)
    refused = find_float_layers(session, [pair], gate, targets={pair: [stubborn]})
    assert not refused.passed and refused.judged_on == {"uint8/outputs": ["stubborn"]} and stubborn.opened >= 2  # all-INT8 and the grown sets

    exact = _Runtime("exact", session.fp32.proto)
    assert find_float_layers(session, [pair], gate, targets={pair: [exact]}).float_nodes == []
    shared = find_float_layers(session, [pair], gate, targets={pair: [exact, _Runtime("no-candidates")]})
    assert shared.passed and shared.float_nodes == on_graph.float_nodes
    assert shared.judged_on == {"uint8/outputs": ["exact", "reference executor"]}
    with pytest.warns(UserWarning, match="judges broken on the Q/DQ graph: a candidate failed to build .no kernel for X."):
        broken = find_float_layers(session, [pair], gate, targets={pair: [_Runtime("broken", error=InputError("no kernel for X"))]})
    assert broken.passed and broken.float_nodes == on_graph.float_nodes and broken.judged_on == {"uint8/outputs": ["reference executor"]}


EMBEDDING = {"c3": "embedding"}  # a cosine per vector, averaged: one extreme sample cannot dominate it


def test_calib_method_auto_picks_the_table_whose_int8_agrees_best_on_calibration_data(tmp_path):
    """One calibration pixel of 3000 (the rest ~N(0, 1)): min-max ranges sized for it leave every
    other value a handful of levels; auto judges the four tables on calibration samples and avoids it."""
    from enginekit.calibration.methods import METHODS

    _model(tmp_path / "model.onnx", hard_tensor=False)
    calibration = RNG.normal(0, 1, (64, 4, 8, 8)).astype(np.float32)
    calibration[0, 0, 0, 0] = 3000.0
    np.savez(tmp_path / "calibration.npz", x=calibration)
    np.savez(tmp_path / "evaluation.npz", x=RNG.normal(0, 1, (64, 4, 8, 8)).astype(np.float32))
    paths = str(tmp_path / "calibration.npz"), str(tmp_path / "evaluation.npz")
    manifest = ek.build(str(tmp_path / "model.onnx"), "onnxruntime", "int8", tmp_path / "auto",
                        _options(*paths, calib_method="auto", num_samples=64, min_accuracy="none", output_kinds=EMBEDDING)).manifest
    choice = manifest["calibration"]["parameters"]["auto"]
    scores = choice["scores"]
    assert set(scores) == set(METHODS) and choice["chosen"] == manifest["calibration"]["method"] != "minmax"
    assert np.mean(scores[choice["chosen"]]) > np.mean(scores["minmax"]) and min(scores[choice["chosen"]]) > min(scores["minmax"])
    plain = ek.build(str(tmp_path / "model.onnx"), "onnxruntime", "int8", tmp_path / "minmax",
                     _options(*paths, num_samples=64, min_accuracy="none", output_kinds=EMBEDDING)).manifest
    assert manifest["accuracy"]["metrics"]["cosine"] > plain["accuracy"]["metrics"]["cosine"]


@pytest.fixture(scope="module")
def scripted_case(tmp_path_factory):
    """One model and data set for the scripted cases: drawn once, so the tests after them draw
    the same numbers from RNG whatever the number of cases (a later test's data depends on it)."""
    folder = tmp_path_factory.mktemp("scripted")
    _model(folder / "model.onnx", hard_tensor=False)
    np.savez(folder / "data.npz", x=RNG.normal(0, 1, (64, 4, 8, 8)).astype(np.float32))
    return folder


@pytest.mark.parametrize("scores, chosen", [
    # percentile ahead on average but its worst part below min-max's worst; MSE ahead everywhere
    ([[0.95, 0.95, 0.95, 0.95], [0.99, 0.99, 0.99, 0.94], [0.90] * 4, [0.96, 0.96, 0.96, 0.96]], "mse"),
    # MSE behind on one part but ahead on average and on its worst part (a YOLOv8n's detection scores)
    ([[0.953, 0.991, 0.982, 0.917], [0.952, 0.95, 0.97, 0.937], [0.90] * 4, [0.984, 0.983, 0.987, 0.963]], "mse"),
    # nothing ahead on both: min-max stays
    ([[0.95, 0.95, 0.95, 0.95], [0.99, 0.99, 0.99, 0.94], [0.90] * 4, [0.95, 0.95, 0.95, 0.95]], "minmax"),
])
def test_calib_method_auto_replaces_min_max_only_by_a_method_ahead_on_average_and_on_its_worst_part(scripted_case, tmp_path, monkeypatch,
                                                                                                   scores, chosen):
    """Scores are scripted, in METHODS order (minmax, percentile, entropy, mse)."""
    from enginekit.builder import method_choice

    scripted = iter(scores)
    real = method_choice.lowest_cosine
    calls = {"n": 0}

    def scripted_cosine(metrics):
        real(metrics)
        calls["n"] += 1
        return current[(calls["n"] - 1) % 4]

    current: list[float] = []

    def next_method(*args, **kwargs):
        current[:] = next(scripted)
        return original_build(*args, **kwargs)

    original_build = method_choice.build_qdq
    monkeypatch.setattr(method_choice, "build_qdq", next_method)
    monkeypatch.setattr(method_choice, "lowest_cosine", scripted_cosine)
    manifest = ek.build(str(scripted_case / "model.onnx"), "onnxruntime", "int8", tmp_path / "out",
                        _options(str(scripted_case / "data.npz"), str(scripted_case / "data.npz"), calib_method="auto", num_samples=64,
                                 min_accuracy="none")).manifest
    choice = manifest["calibration"]["parameters"]["auto"]
    assert choice["scores"]["percentile"] == scores[1]
    assert choice["chosen"] == chosen


def test_pick_gathers_samples_across_batches_along_each_batch_axis():
    from enginekit.core.tensors import pick

    batches = [{"x": np.arange(6).reshape(3, 2), "seq": np.arange(6).reshape(2, 3), "state": np.array([7.0])},
               {"x": np.arange(6, 10).reshape(2, 2), "seq": np.arange(6, 10).reshape(2, 2), "state": np.array([8.0])}]
    axes = {"x": 0, "seq": 1, "state": None}
    picked = pick(batches, [4, 0, 3], axes)
    assert picked["x"].tolist() == [[0, 1], [6, 7], [8, 9]]  # samples 0, 3, 4 in index order
    assert picked["seq"].tolist() == [[0, 6, 7], [3, 8, 9]]
    assert picked["state"].tolist() == [7.0]
    with pytest.raises(ValueError, match="hold 5"):
        pick(batches, [5], axes)


def _search(folder, calibration, evaluation, **extra):
    from enginekit.accuracy.gate import parse_conditions
    from enginekit.builder.fallback import _Search
    from enginekit.builder.session import ModelSession
    from enginekit.exporter.reference import load_fp32

    options = _options(calibration, evaluation, **extra)
    session = ModelSession(load_fp32(str(folder / "model.onnx"), options.source_options()), options)
    session.int8_pairs = {("uint8", "outputs")}
    return session, _Search(session, [("uint8", "outputs")], parse_conditions(options.min_accuracy))


def test_units_are_ranked_on_samples_whose_margin_can_move():
    """A top-1 gate moves only on the samples INT8 gets wrong (on efficientnet_lite0 the first 16
    crops all agreed and every unit tied at a gain of 0): those are the ones measured. A cosine gate
    takes a mean: the samples are spread over the whole range, the worst and the best included."""
    from enginekit.builder.fallback import informative_samples

    agreeing, wrong = (0.02, 0.999), [(-0.98, 0.9 + i / 1000) for i in range(6)]
    top1 = [agreeing] * 40 + wrong + [agreeing] * 40
    assert informative_samples(top1, 4) == [40, 42, 43, 45]  # four of the six wrong ones, spread
    few_wrong = [agreeing] * 10 + wrong[:2] + [(0.02, 0.99), (0.02, 0.95)]
    assert informative_samples(few_wrong, 4) == [10, 11, 12, 13]  # both wrong, then the closest to flipping
    cosines = [(c - 0.99, c) for c in np.linspace(0.95, 1.0, 41)][::-1]
    assert informative_samples(cosines, 5) == [0, 10, 20, 30, 40]
    assert informative_samples(cosines[:3], 5) == [0, 1, 2]


def test_the_ranking_batch_is_those_samples_with_their_reference_outputs(case):
    from enginekit.accuracy.metrics import _cosines
    from enginekit.builder.fallback import QUICK_SAMPLES, informative_samples

    folder, calibration, evaluation = case
    _, search = _search(folder, calibration, evaluation)
    batches, reference, _ = search.full
    search.margins([])
    int8 = search.int8_outputs[("uint8", "outputs")][0]
    per_sample = _cosines(reference["c3"].reshape(len(reference["c3"]), -1), int8["c3"].reshape(len(int8["c3"]), -1))
    expected = informative_samples([(c - 0.99, c) for c in per_sample], QUICK_SAMPLES)
    inputs, quick_reference, _ = search.quick
    everything = np.concatenate([b["x"] for b in batches])
    chosen = sorted(int(np.flatnonzero((everything == sample).all(axis=(1, 2, 3)))[0]) for sample in inputs[0]["x"])
    assert len(chosen) == QUICK_SAMPLES < len(everything) and chosen == expected
    assert np.array_equal(quick_reference["c3"], reference["c3"][chosen])


def test_every_gate_check_of_the_search_is_bias_corrected_for_its_own_float_set(case):
    """The biases a float set is checked with are the ones its artifacts get, not all-INT8's."""
    from enginekit.builder.fallback import Fallback
    from enginekit.builder.session import ModelSession
    from enginekit.exporter.reference import load_fp32
    from enginekit.quantization.bias_correction import layer_biases

    folder, calibration, evaluation = case
    session, search = _search(folder, calibration, evaluation, quantize=ek.QuantizeSettings(bias_correction=True))
    corrections = len(session._biases)
    checked = layer_biases(search.graph(["conv1"], ("uint8", "outputs"), fresh=True))
    assert len(session._biases) == corrections + 1  # kept under the key adopting conv1 would look up
    ranked = layer_biases(search.graph(["conv1"], ("uint8", "outputs")))
    options = _options(calibration, evaluation, quantize=ek.QuantizeSettings(bias_correction=True, exclude_nodes=("conv1",)))
    artifact = ModelSession(load_fp32(str(folder / "model.onnx"), options.source_options()), options)
    built = layer_biases(artifact.qdq("uint8", "outputs")[0])
    assert set(checked) == set(built) == {"conv1", "conv2", "conv3"}
    for name in built:
        assert np.allclose(checked[name], built[name], atol=1e-6), name
    assert not np.allclose(ranked["conv3"], built["conv3"], atol=1e-4)  # all-INT8's correction of conv3 differs
    session.adopt_fallback(Fallback(["conv1"], True, "", "", 0.0))
    assert np.allclose(layer_biases(session.qdq("uint8", "outputs")[0])["conv3"], built["conv3"], atol=1e-6)
    assert len(session._biases) == corrections + 1  # adopting it corrected nothing anew


def _residual_model(path) -> None:
    """x -> conv1 -> relu1 -> conv2 (stride 2, pads 1: TFLite pads explicitly) -> relu2 -> conv3 -> add(+ relu2) -> conv4 -> y."""
    shapes = {"conv1": (8, 4), "conv2": (8, 8), "conv3": (8, 8), "conv4": (4, 8)}
    inits = []
    for name, (cout, cin) in shapes.items():
        inits += [numpy_helper.from_array(RNG.normal(0, 0.4, (cout, cin, 3, 3)).astype(np.float32), f"w_{name}"),
                  numpy_helper.from_array(RNG.normal(0, 0.1, cout).astype(np.float32), f"b_{name}")]
    conv = lambda name, x, y, **a: helper.make_node("Conv", [x, f"w_{name}", f"b_{name}"], [y], name=name, pads=[1, 1, 1, 1], **a)  # noqa: E731
    nodes = [conv("conv1", "x", "c1"), helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             conv("conv2", "r1", "c2", strides=[2, 2]), helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             conv("conv3", "r2", "c3"), helper.make_node("Add", ["c3", "r2"], ["s"], name="add"), conv("conv4", "s", "y")]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_tflite_keeps_a_units_add_and_the_padding_between_float_layers_float(case):
    """The fallback's units hold residual Adds as well as convolutions; TFLite leaves the ADD float
    too (it was 'not found' and stayed int8), and the PAD between two float convolutions stays
    float instead of requantizing the tensor between them."""
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")
    from enginekit.targets.tflite.convert import op_types

    folder, calibration, evaluation = case
    _residual_model(folder / "residual.onnx")
    quantize = ek.QuantizeSettings(bias_correction=False, exclude_nodes=("conv1", "conv2", "add"))
    manifest = ek.build(str(folder / "residual.onnx"), "tflite", "int8", folder / "residual",
                        _options(calibration, evaluation, min_accuracy="none", quantize=quantize)).manifest
    kept = manifest["tflite"]["float_layers"]
    assert kept["kept_float"] == ["conv1", "conv2", "add"] and not kept["not_found_in_tflite"], kept
    ops = op_types((folder / "residual" / "model.tflite").read_bytes())
    kinds = {op["op"]: [] for op in ops}
    for op in ops:
        kinds[op["op"]].append("float32" if "float32" in op["outputs"] else op["outputs"][0])
    assert kinds["ADD"] == ["float32"] and kinds["PAD"] == ["float32"], kinds
    assert kinds["CONV_2D"].count("float32") == 2 and kinds["CONV_2D"].count("int8") == 2, kinds  # conv3 and conv4 stay int8


def test_a_tflite_candidate_is_the_artifact_its_float_set_builds(case, tmp_path):
    """The search judges a TFLite float set on LiteRT by building it as the artifact is built:
    same float layers, same biases (corrected for that set), so the same outputs to the bit as
    the artifact a build keeping those layers float writes."""
    pytest.importorskip("ai_edge_litert", reason="the tflite extra is not installed")
    from enginekit.accuracy import parse_conditions
    from enginekit.builder.fallback import _Search
    from enginekit.builder.session import ModelSession
    from enginekit.exporter.reference import load_fp32
    from enginekit.targets.tflite import TARGET

    folder, calibration, evaluation = case
    quantize = ek.QuantizeSettings(bias_correction=True)
    options = _options(calibration, evaluation, quantize=quantize)
    session = ModelSession(load_fp32(str(folder / "model.onnx"), options.source_options()), options)
    pair = ("mixed", "inputs")
    session.int8_pairs = {pair}
    search = _Search(session, [pair], parse_conditions(options.min_accuracy), {pair: [TARGET]})
    feeds = {"x": np.load(evaluation)["x"][:8]}
    candidate = session.candidate_inputs(TARGET, search.graph(["conv1"], pair, fresh=True), ["conv1"], pair, tmp_path)
    assert candidate.float_layers() == ["conv1"]
    with TARGET.candidate_runner(candidate) as runner:
        judged = runner.infer(feeds)["c3"]
    kept = ek.QuantizeSettings(bias_correction=True, exclude_nodes=("conv1",))
    built = ek.build(str(folder / "model.onnx"), "tflite", "int8", folder / "kept", _options(calibration, evaluation, quantize=kept, min_accuracy="none"))
    assert built.manifest["tflite"]["float_layers"]["kept_float"] == ["conv1"]
    with TARGET.open(folder / "kept", built.manifest) as runner:
        assert np.array_equal(runner.infer(feeds)["c3"], judged)
    with TARGET.candidate_runner(session.candidate_inputs(TARGET, search.graph([], pair, fresh=True), [], pair, _folder(tmp_path / "none"))) as runner:
        assert not np.array_equal(runner.infer(feeds)["c3"], judged)  # all-INT8 is another flatbuffer


def _folder(path):
    path.mkdir()
    return path


def test_build_takes_the_manual_float_switches_a_failing_gate_points_at(case, run_cli):
    """A failing gate names the layers adding the most error; build now takes --exclude-node
    (and --exclude-op, --exclude-after, --keep-first-last-float) as quantize did, so the user
    does not need a table and a second command to act on it."""
    folder, calibration, evaluation = case
    result = run_cli("build", "-m", folder / "model.onnx", "--targets", "onnxruntime", "--precisions", "int8",
                     "--calib-data", calibration, "--eval-data", evaluation, "-n", "32", "--min-accuracy", "none",
                     "--exclude-node", "conv2", "--no-bench", "-o", folder / "manual")
    assert result.code == 0, result.err
    manifest = json.loads((folder / "manual" / "manifest.json").read_text())
    assert manifest["quantization"]["exclude_nodes"] == ["conv2"]
    assert manifest["integer_ops"]["float_compute_ops"] == 1 and manifest["integer_ops"]["integer_compute_ops"] == 2
