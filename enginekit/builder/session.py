"""The shared inputs of every artifact built from one model, each computed at most once per
build: the FP32 model (loaded and hashed once), the CalibrationTable, the calibration batches,
the bias-corrected Q/DQ graph per encoding, the evaluation data and the FP32 reference outputs
every cell's gate compares against."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from enginekit.accuracy import collect_outputs
from enginekit.builder.calibration import calibrate_model
from enginekit.builder.fallback import Fallback
from enginekit.builder.method_choice import AUTO, choose_table
from enginekit.builder.tensor_choice import PER_TENSOR, per_tensor_table
from enginekit.builder.options import DEFAULT_EVAL_SAMPLES, BuildOptions
from enginekit.calibration.data import open_data, reusable, stream
from enginekit.calibration.methods import METHODS
from enginekit.calibration.table import CalibrationTable
from enginekit.core.errors import InputError
from enginekit.core.profile import stage
from enginekit.core.tensors import Feeds, batch_axes, batch_size
from enginekit.exporter.reference import Fp32Model
from enginekit.onnx.graph import tensor_specs
from enginekit.onnx.session import Session
from enginekit.quantization.bias_correction import layer_biases
from enginekit.quantization.encoding import GRID_FAMILY
from enginekit.quantization.pipeline import QuantizeSettings, build_qdq, excluded_nodes, plan_for, round_weights
from enginekit.quantization.qdq import QdqGraph

EVAL_BATCH = 32
BIAS_CORRECTION_BATCH = 32


@dataclass
class Evaluation:
    batches: list[Feeds]
    labels: np.ndarray | None
    description: str
    shapes: dict[str, list[int]]  # each input's shape at batch 1, as the data has it (dynamic spatial dims too)


@dataclass
class SessionState:
    """A ModelSession's once-per-model results (see `ModelSession.snapshot`); picklable."""

    fp32_sha256: str
    options: BuildOptions
    table: CalibrationTable | None
    calibrated_here: bool
    fp32_means: dict[str, np.ndarray] | None
    fallback: Fallback | None
    notes: list[str]
    warnings: list[str]
    int8_pairs: set[tuple[str, str]]
    qdq: dict[str, tuple[QdqGraph, dict[str, Any]]]  # the Q/DQ graphs made so far (bias-corrected)
    biases: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]
    left_float: dict[str, tuple[str, ...]]
    rounded: tuple[dict[str, np.ndarray], dict[str, Any]] | None


NEARLY_CONSTANT = 1e-4  # an FP32 output that moves less than this share of its magnitude between samples is flagged


class ModelSession:
    def __init__(self, fp32: Fp32Model, options: BuildOptions):
        from enginekit.accuracy import load_user_metric

        self.fp32, self.options = fp32, options
        if options.auto_fallback and options.quantize.weight_rounding == "gptaq":
            # gptaq fits each layer to the INT8 inputs of every layer before it; a float fallback
            # changes those inputs under it (efficientnet_lite0 at top1_agreement>=0.98: the best
            # of 46 float units reached 0.968 with gptaq's integers, where gptq's pass with 27)
            raise InputError("the automatic float fallback cannot use gptaq weight rounding: gptaq fits each layer to INT8 "
                             "inputs from every layer before it, which the layers the fallback keeps float no longer give; "
                             "use gptq weight rounding with the fallback", option="weight_rounding")
        # INT8 from the source's own grids, unless the user asks for a calibration (data or a table)
        self.imported = fp32.prequantized is not None and not options.table and options.calib_data is None
        if self.imported:  # nothing to calibrate; its quantizer (or training) already chose the ranges
            self.options = dataclasses.replace(options, quantize=dataclasses.replace(options.quantize, bias_correction=False))
        # a generator given as data is read by several passes (calibration, bias correction, evaluation)
        self.options = dataclasses.replace(self.options, calib_data=reusable(options.calib_data, fp32.inputs),
                                           eval_data=reusable(options.eval_data, fp32.inputs))
        self.user_metric = load_user_metric(options.metric)
        self.input_axes = batch_axes(fp32.inputs)
        self.output_axes = batch_axes(tensor_specs(fp32.proto.graph.output))
        self.notes: list[str] = []  # for every manifest of this build
        self.warnings: list[str] = []  # for the user (calibration data shorter than asked, ...)
        self._table: CalibrationTable | None = None
        self.calibrated_here = False  # the table was made by this build (not given)
        self._calibration: list[Feeds] | None = None
        self._calibration_sha256 = ""
        self._qdq: dict[str, tuple[QdqGraph, dict[str, Any]]] = {}
        self._biases: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]] = {}  # grid family -> corrected biases
        self._fp32_means: dict[str, np.ndarray] | None = None  # Conv/Gemm output channel means from the calibration pass
        self._left_float: dict[str, tuple[str, ...]] = {}  # (placement, settings) -> nodes a pre-quantized source left float
        self._int8_model: Fp32Model | None = None  # the FP32 graph INT8 starts from (SmoothQuant's smoothed twin)
        self._rounded: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None  # GPTQ's weight integers and record
        self.smoothing: dict[str, Any] | None = None  # what SmoothQuant and cross-layer equalisation did, for INT8 manifests
        self._evaluation: Evaluation | None = None
        self._reference: dict[str, np.ndarray] | None = None
        self._on_calibration_data: bool | None = None  # the evaluation file is the calibration file (hashed once)
        self.fallback: Fallback | None = None  # what --auto-fallback found, for INT8 manifests
        self.int8_pairs: set[tuple[str, str]] = {("int8", "inputs")}  # (encoding, placement) of the build's INT8 targets

    def snapshot(self) -> "SessionState":
        """What this session decided and measured once for its model (the table, the FP32 channel
        means, the fallback, the options they led to, the bias-corrected Q/DQ graphs, the notes),
        for `restore` in another
        process: a matrix builds each cell in its own worker from one calibration."""
        return SessionState(self.fp32.sha256, self.options, self._table, self.calibrated_here, self._fp32_means,
                            self.fallback, list(self.notes), list(self.warnings), set(self.int8_pairs), dict(self._qdq),
                            dict(self._biases), dict(self._left_float), self._rounded)

    def restore(self, state: "SessionState") -> None:
        if state.fp32_sha256 != self.fp32.sha256:
            raise InputError(f"the FP32 model changed since it was calibrated (sha256 {self.fp32.sha256[:12]}..., "
                             f"calibrated {state.fp32_sha256[:12]}...)", self.fp32.origin)
        self.options, self._table, self.calibrated_here = state.options, state.table, state.calibrated_here
        self._fp32_means, self.fallback = state.fp32_means, state.fallback
        self.notes, self.warnings, self.int8_pairs = list(state.notes), list(state.warnings), set(state.int8_pairs)
        self._qdq, self._biases, self._left_float = dict(state.qdq), dict(state.biases), dict(state.left_float)
        self._rounded = state.rounded
        self._int8_model = None  # remade from the table's smoothing when asked (no graph travels)

    def adopt_fallback(self, found: Fallback) -> None:
        """Keep the layers the fallback search chose in float for every INT8 artifact of this build
        (nothing changes when the search found no set that passes)."""

        if not found.passed:
            return
        self.fallback = found
        if found.float_nodes:
            self.options = dataclasses.replace(self.options, quantize=self.options.quantize.keeping_float(found.float_nodes))

    def table(self) -> CalibrationTable:
        """The given table (checked against this model), else one calibration pass here."""
        if self._table is None:
            with stage("calibration"):
                self._table = self._make_table()
        return self._table

    def int8_model(self) -> Fp32Model:
        """The FP32 graph every INT8 stage (Q/DQ graphs, fallback, INT8 targets) starts from: the
        model itself, or the smoothed twin its table was calibrated through (SmoothQuant; the
        table carries the divisors), which computes the same function."""
        if self._int8_model is None:
            table = self.table()
            if table.smoothing:
                from enginekit.calibration.pipeline import smoothed_twin

                self._int8_model, record = smoothed_twin(self.fp32, table.smoothing)
                self.smoothing = twin_record(table.parameters.get("smoothquant"), record)
            else:
                self._int8_model = self.fp32
        return self._int8_model

    def _make_table(self) -> CalibrationTable:
        options = self.options
        if options.table:
            table = CalibrationTable.load(options.table)
            table.check_model(self.fp32.sha256, options.table)
            return table
        if self.imported:
            from enginekit.calibration.imported import imported_table

            return imported_table(self.fp32.prequantized, self.fp32.sha256, self.fp32.name, self.fp32.origin)
        choose = {AUTO: choose_table, PER_TENSOR: per_tensor_table}.get(options.calib_method)  # made among every method's table
        run = calibrate_model(self.fp32, options.calib_data, list(METHODS) if choose else [options.calib_method],
                              num_samples=options.num_samples, threads=options.threads, smoothquant=options.quantize.smoothquant,
                              equalize=options.quantize.equalize)
        self.warnings += run.warnings
        for text in run.warnings:  # calibrate prints them itself; a build says them here (data shorter than asked, ...)
            warnings.warn(text, stacklevel=2)
        self.calibrated_here = True
        self._fp32_means = run.channel_means
        if run.smoothed is not None:  # the twin the pass ran through is the graph INT8 starts from
            self._int8_model = run.model
            self.smoothing = twin_record(options.quantize.smoothquant, run.smoothed)
        return choose(self, run.model, run.tables, sorted(self.int8_pairs)) if choose else run.tables[options.calib_method]

    def calibration_batches(self) -> list[Feeds]:
        """The calibration samples (as many as the table was made from) that bias correction runs on."""
        if self._calibration is None:
            table = self.table()
            source = open_data(self.options.calib_data, self.fp32.inputs, self.fp32.spec, "calibration")
            batches, stats = stream(source, self.fp32.inputs, table.num_samples, BIAS_CORRECTION_BATCH)
            self._calibration = list(batches)
            if stats.sha256 != table.data_sha256:
                self.notes.append("bias correction ran on data that differs from the table's calibration data")
                self._fp32_means = None  # measured on other samples
        return self._calibration

    def calibration_feeds(self, count: int) -> Feeds:
        """The first `count` calibration samples as one batch."""
        return next(self.calibration_samples(count, count))

    def calibration_samples(self, count: int, batch: int) -> Iterator[Feeds]:
        """The first `count` calibration samples, streamed in batches of `batch` (for a
        pre-quantized source given no calibration data: its evaluation data, for the few
        measurements a target makes of tensors the source left float)."""
        options = self.options
        if self.imported and options.calib_data is None and self.fp32.spec is None:
            source = open_data(options.eval_data, self.fp32.inputs, self.fp32.spec, "evaluation")
        else:
            source = open_data(options.calib_data, self.fp32.inputs, self.fp32.spec, "calibration")
        return iter(stream(source, self.fp32.inputs, count, batch)[0])

    def qdq(self, encoding: str, placement: str = "inputs") -> tuple[QdqGraph, dict[str, Any]]:
        """The Q/DQ graph in `encoding` and `placement`, as a private copy. Bias correction runs
        once per integer grid, always on the "inputs" placement's graph, and every placement on
        that grid takes those biases: an artifact does not depend on which other targets the
        build asked for or in what order (ONNX Runtime's "outputs" graph used to correct first
        and hand its biases to OpenVINO and TFLite, so they differed when built alone)."""
        settings = self.int8_settings(placement)
        key = json.dumps([encoding, placement, settings.key()], sort_keys=True)
        if key not in self._qdq:
            family = _grid_family(encoding, settings)
            if settings.bias_correction and family not in self._biases and placement != "inputs" and not self.imported:
                self.qdq(encoding, "inputs")  # the grid's one correction, on the canonical placement
            corrected = self._biases.get(family)
            batches = self.calibration_batches() if settings.bias_correction and corrected is None else ()
            table = self.table()
            rounded = self.rounded_weights()
            with stage(f"quantization ({encoding}, {placement})"):
                self._qdq[key] = build_qdq(self.int8_model(), table, settings, encoding, batches, self.options.threads, placement, corrected,
                                           self._fp32_means, rounded, self.input_axes)
            record = self._qdq[key][1].get("bias_correction")
            if record is not None and family not in self._biases:
                self._biases[family] = (layer_biases(self._qdq[key][0]), record)
        graph, details = self._qdq[key]
        return copy.deepcopy(graph), copy.deepcopy(details)

    def int8_settings(self, placement: str = "inputs") -> QuantizeSettings:
        """The quantization settings of this build's Q/DQ graphs in `placement`: the user's, with
        the fallback's float layers, and for a pre-quantized source what it left float."""
        settings = self.options.quantize
        if self.imported:  # what the source left float stays float
            from enginekit.quantization.pipeline import nodes_without_ranges

            left = json.dumps([placement, settings.key()], sort_keys=True)
            if left not in self._left_float:
                self._left_float[left] = nodes_without_ranges(self.int8_model(), self.table(), settings, placement)
            settings = settings.keeping_float(self._left_float[left])
        return settings

    def rounded_weights(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The integers GPTQ (or GPTAQ) chose for the weights (quantization.rounding) and its record, measured
        once per build on the calibration data for every layer that may be quantized (the layers
        a fallback keeps float simply do not use theirs); None with nearest rounding, or for a
        pre-quantized source, whose weights are already integers."""
        settings = self.options.quantize
        if self.imported or settings.weight_rounding == "nearest":
            return None
        if self._rounded is None:
            every_layer = dataclasses.replace(settings, exclude_nodes=())
            self._rounded = round_weights(self.int8_model(), self.table(), every_layer, self.calibration_batches(), self.input_axes,
                                         self.options.threads)
        return self._rounded

    def corrected_biases(self, encoding: str, placement: str = "inputs") -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The biases bias correction gave the all-INT8 graph on `encoding`'s integer grid (and
        its record), correcting it first if no graph on that grid has been; None when bias
        correction is off."""
        if not self.options.quantize.bias_correction:
            return None
        self.qdq(encoding, placement)
        return self._biases.get(_grid_family(encoding, self.options.quantize))

    def biases_for(self, float_nodes: Sequence[str], encoding: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The biases bias correction gives the graph on `encoding`'s integer grid with
        `float_nodes` also kept float: what the artifacts get if the fallback adopts that set (the
        same correction `qdq` would run then, kept under the same key, so adopting the set reuses
        it). Layers downstream of a float layer need other biases than all-INT8's: theirs
        compensated an upstream error that is gone. None when bias correction is off."""
        settings = self.int8_settings("inputs")
        if not settings.bias_correction or not float_nodes or self.imported:
            return self.corrected_biases(encoding)
        settings = settings.keeping_float(float_nodes)
        family = _grid_family(encoding, settings)
        if family not in self._biases:
            with stage(f"bias correction ({encoding}, {len(float_nodes)} float layers)"):
                graph, details = build_qdq(self.int8_model(), self.table(), settings, encoding, self.calibration_batches(),
                                           self.options.threads, "inputs", None, self._fp32_means, self.rounded_weights(), self.input_axes)
            self._biases[family] = (layer_biases(graph), details.get("bias_correction") or {})
        return self._biases[family]

    def evaluation(self) -> Evaluation:
        """Held-out data (the zoo's evaluation split, or the given eval data) and its labels."""
        if self._evaluation is None:
            with stage("evaluation data"):
                self._evaluation = self._load_evaluation()
        return self._evaluation

    def evaluated_on_calibration_data(self) -> bool:
        """Whether the evaluation data is the calibration file itself: its figures are then not on
        held-out samples (the gate sees the samples the ranges and biases were fitted to)."""
        from enginekit.core.artifacts import sha256_file

        if self._on_calibration_data is None:  # asked by every cell's manifest: the files are hashed once
            calibration, evaluation = self.options.calib_data, self.options.eval_data
            files = all(isinstance(d, (str, Path)) and Path(d).is_file() for d in (calibration, evaluation))
            self._on_calibration_data = files and (Path(calibration).resolve() == Path(evaluation).resolve()
                                                   or sha256_file(calibration) == sha256_file(evaluation))
        return self._on_calibration_data

    def _load_evaluation(self) -> Evaluation:
        if self.evaluated_on_calibration_data():
            warnings.warn(f"the evaluation data is the calibration data ({self.options.eval_data}): the accuracy gate is "
                          "measured on the samples the INT8 ranges were fitted to, not on held-out ones", stacklevel=2)
        fp32, options = self.fp32, self.options
        source = open_data(options.eval_data, fp32.inputs, fp32.spec, "evaluation")
        zoo = options.eval_data is None and fp32.spec is not None
        has_labels = zoo and fp32.spec.dataset().labels("evaluation", 1) is not None
        available = source.count()
        count = options.eval_samples or (available if has_labels and available else DEFAULT_EVAL_SAMPLES)
        if available is not None:
            count = min(count, available)
        batches, stats = stream(source, fp32.inputs, count, EVAL_BATCH)
        batches = list(batches)
        axes = batch_axes(fp32.inputs)
        used = sum(batch_size(b, axes) for b in batches)
        labels = fp32.spec.dataset().labels("evaluation", used) if has_labels else None
        shapes = {name: [1 if i == axes.get(name) else d for i, d in enumerate(shape)] for name, shape in stats.shapes.items()}
        return Evaluation(batches, labels, source.description, shapes)

    def reference_outputs(self) -> dict[str, np.ndarray]:
        """The FP32 model's outputs on the evaluation data (reference executor), computed once."""
        if self._reference is None:
            batches = self.evaluation().batches
            with stage("fp32 reference outputs"):
                self._reference = self.outputs_of(self.fp32.proto, batches)
            for name in self.constant_outputs():  # said once per build, not only as a report flag
                warnings.warn(f"the FP32 output '{name}' is the same for every evaluation sample: agreement with it says "
                              "nothing about a target (untrained weights, or data the model does not expect?)", stacklevel=2)
            for name, spread in self.nearly_constant_outputs().items():
                warnings.warn(f"the FP32 output '{name}' barely changes between evaluation samples (by {spread:.1e} of its "
                              "magnitude): agreement with it says little, and a top-1 on it may be rounding noise (untrained "
                              "weights, data the model does not expect, or evaluation data all of one kind?)", stacklevel=2)
        return self._reference

    def _still_outputs(self) -> dict[str, float]:
        """FP32 outputs none of whose values moves between evaluation samples by more than
        NEARLY_CONSTANT of the output's magnitude, with that largest move as a share of it (0.0:
        the output is constant)."""
        moves = {}
        for name, value in self.reference_outputs().items():
            axis = self.output_axes.get(name)
            if axis is None or value.shape[axis] < 2:
                continue
            value = np.asarray(value, np.float64)  # a boolean mask has no subtraction (np.ptp failed on it)
            magnitude = float(np.abs(value).max()) if value.size else 0.0
            if not np.isfinite(magnitude):  # NaN/Inf outputs fail the gate on their own
                continue
            move = float(np.ptp(value, axis=axis).max()) / magnitude if magnitude > 0 else 0.0
            if move <= NEARLY_CONSTANT:
                moves[name] = move
        return moves

    def nearly_constant_outputs(self) -> dict[str, float]:
        """FP32 outputs that move between samples, but by no more than NEARLY_CONSTANT of their
        magnitude, with that move: an untrained network whose softmax is 0.001 +- 1e-9
        everywhere, whose top-1 (and INT8's agreement with it) is then float noise."""
        return {name: move for name, move in self._still_outputs().items() if move > 0}

    def candidate_inputs(self, target: Any, graph: QdqGraph, float_nodes: Sequence[str], pair: tuple[str, str],
                         stage: Path) -> "CandidateInputs":
        """The BuildInputs `target` builds a fallback candidate from (`Target.candidate_runner`)."""
        options = target.options(self.options.target_options.get(target.name))
        return CandidateInputs(self, graph, float_nodes, pair[0], stage, options, pair[1])

    def outputs_of(self, model: Any, batches: Sequence[Feeds]) -> dict[str, np.ndarray]:
        """`model` (the FP32 graph or a Q/DQ graph of it) run in the reference executor over
        `batches`, every output joined along its batch axis."""
        runner = Session(model, threads=self.options.threads, spinning=False)
        return collect_outputs(runner.run, batches, None, self.input_axes, self.output_axes)

    def vanishing_outputs(self) -> dict[str, float]:
        """FP32 outputs whose every value on the evaluation data is within VANISHING of zero, with
        their largest magnitude: an 8-bit grid holds them as zero (quantization/encoding.py), so
        INT8 cannot agree with them. A network whose activations shrink layer by layer to
        nothing (transformers' MobileViT with fresh weights ends at 1e-40) does this."""
        from enginekit.quantization.encoding import VANISHING

        largest = {name: float(np.abs(value).max()) if value.size else 0.0 for name, value in self.reference_outputs().items()}
        return {name: value for name, value in largest.items() if 0.0 < value <= VANISHING}  # all zeros: constant_outputs

    def constant_outputs(self) -> list[str]:
        """FP32 outputs that do not change from sample to sample on the evaluation data: agreement
        with them says nothing (the data may not fit the model)."""
        return [name for name, move in self._still_outputs().items() if move == 0.0]


class CellInputs:
    """What one target's build sees (the BuildInputs contract) for one precision."""

    def __init__(self, session: ModelSession, precision: str, encoding: str, stage: Path, options: dict[str, Any],
                 placement: str = "inputs"):
        self.session, self.fp32 = session, session.int8_model() if precision == "int8" else session.fp32
        self.precision, self.encoding, self.stage, self.options = precision, encoding, stage, options
        self.placement = placement
        self.threads = session.options.threads
        self.bias_correction = session.options.quantize.bias_correction
        self.notes: list[str] = []
        self.qdq_details: dict[str, Any] | None = None  # set once the target asked for the Q/DQ graph

    def table(self) -> CalibrationTable:
        return self.session.table()

    def qdq(self, encoding: str) -> QdqGraph:
        graph, self.qdq_details = self.session.qdq(encoding, self.placement)
        return graph

    def settings(self) -> QuantizeSettings:
        """The quantization settings of this cell's Q/DQ graph (the build's, fallback included)."""
        return self.session.int8_settings(self.placement)

    def float_layers(self) -> list[str]:
        return excluded_nodes(self.fp32, self.settings(), self.placement)

    def quantized_tensors(self) -> list[str]:
        return plan_for(self.fp32, self.settings(), self.placement)[0].activations

    def calibration_feeds(self, count: int) -> Feeds:
        return self.session.calibration_feeds(count)

    def calibration_samples(self, count: int, batch: int) -> Iterator[Feeds]:
        return self.session.calibration_samples(count, batch)


class CandidateInputs(CellInputs):
    """What a target's INT8 build sees for one candidate float set of the fallback search
    (`Target.candidate_runner`): the Q/DQ graph the search judges (biases corrected for that set)
    and those layers float on top of the build's own, staged in a throwaway folder."""

    def __init__(self, session: ModelSession, graph: QdqGraph, float_nodes: Sequence[str], encoding: str, stage: Path,
                 options: dict[str, Any], placement: str):
        super().__init__(session, "int8", encoding, stage, options, placement)
        self.graph, self.float_nodes = graph, list(float_nodes)

    def settings(self) -> QuantizeSettings:
        return super().settings().keeping_float(self.float_nodes)

    def qdq(self, encoding: str) -> QdqGraph:
        if encoding != self.encoding:
            raise ValueError(f"a fallback candidate is a '{self.encoding}' graph, not '{encoding}'")
        return copy.deepcopy(self.graph)


def _grid_family(encoding: str, settings: QuantizeSettings) -> str:
    """The key one bias correction is kept under: every encoding and placement on the same integer
    grid, with the same settings, shares it (and the fallback's corrected checks are found by it
    when their float set is adopted)."""
    return json.dumps([GRID_FAMILY[encoding], settings.key()], sort_keys=True)


def twin_record(alpha: float | None, record: dict[str, int]) -> dict[str, Any]:
    """The manifest's account of the twin INT8 starts from: SmoothQuant's (with its alpha) where
    it smoothed tensors, cross-layer equalisation's where it equalised pairs."""
    equalized = record.get("equalized_pairs", 0)
    smoothquant = {key: value for key, value in record.items() if key != "equalized_pairs"}
    return {**({"smoothquant": {"alpha": alpha, **smoothquant}} if smoothquant["tensors"] else {}),
            **({"equalization": {"pairs": equalized}} if equalized else {})}
