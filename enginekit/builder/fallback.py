"""Sensitivity-guided float fallback (`--auto-fallback`): the fewest layers kept in float that
make the accuracy gate pass, found on the Q/DQ graph in the reference executor.

Why on the Q/DQ graph: which layers must stay float is a property of the quantized graph, not of
a runtime, so one set serves every target of the build (each target then verifies the gate on
its own runtime, as always). Every distinct (encoding, placement) of the build's INT8 targets is
evaluated and the worst decides. The gate checks on the whole evaluation data (steps 2 and 3)
are judged on each target's own runtime (`Target.candidate_runner`: ONNX Runtime and OpenVINO
open the candidate graph, TFLite converts it as its build does), and in the reference executor
for a target that cannot (TensorRT: an engine build per candidate): ONNX Runtime's fused
requantization rounds differently from the exact simulation (efficientnet_lite0's 0.98 top-1 set
passed on the graph by 0.0005 and failed on ORT's kernels by 0.0025), and TFLite's full-integer
graph quantizes tensors the Q/DQ graph leaves float (its 0.96 set passed on the graph and failed
on LiteRT).

The search: (1) rank — for each quantized tensor, the unit that frees it (the compute op that
made it and the quantized ops that read it, so the tensor has no Q/DQ left) is kept float alone,
and the gate's margin on QUICK_SAMPLES evaluation samples whose margin can move
(`informative_samples`) says how much that unit is worth; measured rather than read from
per-tensor SQNR, which a tensor dominated by one large channel hides, and for every unit up to
RANKED_UNITS (beyond, the per-layer report's added error picks which to measure: it underrates
early layers, whose error the rest of the network amplifies — PP-OCRv4 det's p2o.Conv.2, the one
layer its cosine gate needs float, came 43rd).
(2) grow the float set along the ranking, checking the gate on the whole evaluation data at 1,
2, 4, ... units, then bisecting to the fewest units that pass. (3) give back to INT8, one by
one, every layer the gate does not need. Ranking candidates carry the all-INT8 graph's corrected
biases (correcting each would cost a pass); every gate check of (2) and (3) is corrected for its
own float set, as its artifacts would be — the biases downstream of a float layer compensated an
error that is gone, and with all-INT8's biases a larger float set scored below a smaller one.
"""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from enginekit.accuracy import Condition, collect_outputs, compare_outputs, gate_margin, headline
from enginekit.accuracy.metrics import lowest_cosine
from enginekit.core.errors import EnginekitError, GateError
from enginekit.core.profile import stage
from enginekit.core.progress import report
from enginekit.quantization.pipeline import build_qdq, plan_for
from enginekit.core.tensors import batch_size, pick, take
from enginekit.quantization.placement import SAME_SCALE_OPS, source_node

DEFAULT_MAX_FLOAT_LAYERS = 16
RANKED_UNITS = 128  # units measured one by one (all, on the zoo and the corpus); more are pre-ranked by the per-layer report's added error
QUICK_SAMPLES = 16  # evaluation samples each unit is measured on
_LOOK_THROUGH = SAME_SCALE_OPS | {"Relu", "Clip"}  # fused into, or moving data after, the op that computed a tensor


@dataclass
class Fallback:
    """What the search found: the layers kept in float (in the order they were chosen), the
    gate's metrics all-INT8 and with them in float (worst encoding), and how many graphs it ran."""

    float_nodes: list[str]
    passed: bool
    before: str
    after: str
    margin: float
    evaluations: int = 0
    encodings: list[str] = field(default_factory=list)
    failing: list[tuple[str, str]] = field(default_factory=list)  # (encoding, placement) below the gate all-INT8
    judged_on: dict[str, list[str]] = field(default_factory=dict)  # per encoding: the runtimes (or "reference executor") its gate checks ran on
    bounded: bool = False  # the bound left out units the ranking proposed (a larger bound would try more)

    def manifest(self) -> dict[str, Any]:
        return {"float_layers": self.float_nodes, "passed": self.passed, "all_int8": self.before, "with_fallback": self.after,
                "evaluated_graphs": self.evaluations, "encodings": self.encodings, "judged_on": self.judged_on,
                "how": f"units ranked by the gate margin each gains alone on {QUICK_SAMPLES} evaluation samples whose margin can move "
                       "(Q/DQ graph, reference executor), grown along the ranking (1, 2, 4, ... units, then bisection), then pruned; "
                       "every gate check bias-corrected for its own float set and judged on each target's runtime where it can run a "
                       "candidate graph (judged_on), the worst deciding"}


class _Search:
    def __init__(self, session: Any, pairs: Sequence[tuple[str, str]], conditions: list[Condition] | None,
                 targets: Mapping[tuple[str, str], Sequence[Any]] | None = None):
        self.session, self.pairs, self.conditions = session, list(pairs), conditions
        self.targets = {pair: list((targets or {}).get(pair, ())) for pair in self.pairs}  # the INT8 targets built from each pair
        self.unjudged: set[str] = set()  # targets that cannot run a candidate graph (the reference executor stands in)
        self.judged_on: dict[tuple[str, str], list[str]] = {}
        self._quantized: dict[str, set[str]] = {}
        self.base = session.options.quantize
        self.evaluations = 0
        evaluation = session.evaluation()
        self.axes = {name: axis for name, axis in session.output_axes.items() if axis is not None}
        self.full = (evaluation.batches, session.reference_outputs(), evaluation.labels)
        self.int8_outputs: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Any], float]] = {}  # all-INT8 outputs, metrics, margin
        self._quick: tuple[list[Any], dict[str, Any], Any] | None = None
        # ranking candidates get the biases the all-INT8 graph was corrected to (its float layers
        # keep their own): bias correction moves top-1 agreement by ten points on efficientnet_lite0,
        # so a search without it aimed at the wrong baseline, and correcting each of dozens of
        # ranking candidates anew would cost a corrected pass each
        self.corrected = {pair: session.corrected_biases(*pair) for pair in self.pairs}

    def settings(self, float_nodes: Sequence[str], corrected: bool = False):
        return dataclasses.replace(self.base.keeping_float(float_nodes), bias_correction=corrected)

    def graph(self, float_nodes: Sequence[str], pair: tuple[str, str], fresh: bool = False) -> Any:
        """The Q/DQ graph of `pair` with `float_nodes` kept float; biases as corrected all-INT8,
        or (`fresh`) corrected for this float set."""
        session = self.session
        corrected = session.biases_for(float_nodes, pair[0]) if fresh else self.corrected.get(pair)
        graph, _ = build_qdq(session.int8_model(), session.table(), self.settings(float_nodes, corrected is not None), pair[0], (),
                             session.options.threads, pair[1], corrected, rounded=session.rounded_weights())
        return graph

    def evaluate(self, float_nodes: Sequence[str], quick: bool = False, pairs: Sequence[tuple[str, str]] | None = None) -> tuple[float, dict[str, Any]]:
        """The worst gate margin over the encodings (on the quick samples when `quick`) and its metrics."""
        margins = self.margins(float_nodes, quick, pairs)
        return min(margins.values(), key=lambda m: m[0])

    def margins(self, float_nodes: Sequence[str], quick: bool = False, pairs: Sequence[tuple[str, str]] | None = None) -> dict[tuple[str, str], tuple[float, dict[str, Any]]]:
        """(gate margin, metrics) per (encoding, placement): on the quick samples with all-INT8's
        biases, or on the whole evaluation data with biases corrected for `float_nodes`."""
        session = self.session
        batches, reference, labels = self.quick if quick else self.full
        result = {}
        for pair in pairs or self.pairs:
            graph = self.graph(float_nodes, pair, fresh=not quick)
            runs = [("reference executor", session.outputs_of(graph.model, batches))] if quick else self.judged_runs(graph, float_nodes, pair, batches)
            judged = []
            for _, candidate in runs:
                metrics = compare_outputs(reference, candidate, labels, session.options.output_kinds, self.axes)
                judged.append((gate_margin(metrics, self.conditions, "int8"), metrics, candidate))
            margin, metrics, candidate = min(judged, key=lambda j: j[0])
            result[pair] = (margin, metrics)
            if not quick and not float_nodes:
                self.int8_outputs[pair] = (candidate, metrics, margin)
            self.evaluations += 1
        return result

    def judged_runs(self, graph: Any, float_nodes: Sequence[str], pair: tuple[str, str], batches: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
        """(judge, outputs) of a candidate Q/DQ graph (`float_nodes` float) on the whole evaluation
        data: on the runtime of every target built from `pair` that can open it
        (`Target.candidate_runner`, given the candidate's build inputs in a throwaway folder),
        and in the reference executor when one cannot (or no target is given)."""
        session, runs, reference_needed = self.session, [], not self.targets[pair]
        for target in self.targets[pair]:
            outputs = None if target.name in self.unjudged else self.candidate_outputs(target, graph, float_nodes, pair, batches)
            if outputs is None:
                self.unjudged.add(target.name)
                reference_needed = True
            else:
                runs.append((target.name, outputs))
        if reference_needed:
            runs.append(("reference executor", session.outputs_of(graph.model, batches)))
        self.judged_on[pair] = [name for name, _ in runs]
        return runs

    def candidate_outputs(self, target: Any, graph: Any, float_nodes: Sequence[str], pair: tuple[str, str],
                          batches: Sequence[Any]) -> dict[str, Any] | None:
        """`target`'s runtime's outputs for the candidate (its build inputs staged in a throwaway
        folder), or None where it cannot open one or the candidate fails to build (its own cell
        says why when built; the search goes on)."""
        session = self.session
        with tempfile.TemporaryDirectory(prefix=f"enginekit-{target.name}-candidate-") as folder:
            with stage(f"fallback candidates ({target.name})"):
                try:
                    runner = target.candidate_runner(session.candidate_inputs(target, graph, float_nodes, pair, Path(folder)))
                except EnginekitError as exc:
                    warnings.warn(f"the float-fallback search judges {target.name} on the Q/DQ graph: a candidate failed to build ({exc})",
                                  stacklevel=2)
                    return None
            if runner is None:
                return None
            with runner:
                return collect_outputs(runner.infer, batches, runner.max_batch, session.input_axes, session.output_axes)

    @property
    def quick(self) -> tuple[list[Any], dict[str, Any], Any]:
        """The QUICK_SAMPLES evaluation samples a unit is measured on (`informative_samples`, from
        each sample's worst gate margin and output cosine over the encodings that fail): their
        inputs, FP32 outputs and labels."""
        if self._quick is None:
            if not self.int8_outputs:
                self.margins([])
            batches, reference, labels = self.full
            kinds = {name: output["kind"] for _, metrics, _ in self.int8_outputs.values() for name, output in metrics["outputs"].items()}
            failing = [c for c, _, margin in self.int8_outputs.values() if margin < 0] or [c for c, _, _ in self.int8_outputs.values()]
            scores: list[tuple[float, float]] = []
            for index in range(batch_size(reference, self.axes)):
                one = take(reference, index, index + 1, self.axes)
                worst = (np.inf, np.inf)
                for candidate in failing:
                    sample = compare_outputs(one, take(candidate, index, index + 1, self.axes),
                                             None if labels is None else labels[index : index + 1], kinds, self.axes)
                    worst = min(worst, (gate_margin(sample, self.conditions, "int8"), lowest_cosine(sample)))
                scores.append(worst)
            chosen = informative_samples(scores, QUICK_SAMPLES)
            self._quick = ([pick(batches, chosen, self.session.input_axes)], pick([reference], chosen, self.axes),
                           None if labels is None else labels[chosen])
        return self._quick

    def quantized(self, placement: str) -> set[str]:
        """The nodes all-INT8 quantizes under `placement` (planned once per placement)."""
        if placement not in self._quantized:
            plan, _ = plan_for(self.session.int8_model(), self.settings(()), placement)
            self._quantized[placement] = set(plan.nodes)
        return self._quantized[placement]

    def leaves_int8(self, float_nodes: Sequence[str]) -> bool:
        """Whether something stays quantized in every placement with `float_nodes` float."""
        return all(self.quantized(placement) - set(float_nodes) for placement in {p for _, p in self.pairs})

    def units(self, placement: str) -> list[list[str]]:
        """Per quantized tensor, the quantized ops that must be float for it to have no Q/DQ."""
        session = self.session
        plan, _ = plan_for(session.int8_model(), self.settings(()), placement)
        quantized = set(plan.nodes)
        producers = _producers(session.int8_model().proto)
        found: dict[tuple[str, ...], None] = {}
        for tensor in plan.activations:
            unit = tuple(dict.fromkeys(name for name in _around(tensor, plan, producers) if name in quantized))
            if unit and len(unit) < len(quantized):  # something must stay INT8
                found[unit] = None
        return [list(unit) for unit in found]

    def ranking(self, pairs: Sequence[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
        """Units with the gate margin each reaches alone in float on QUICK_SAMPLES samples of the
        `pairs` (default: all) and what that gains over all-INT8, best first. Beyond
        RANKED_UNITS units, the ones around the tensors adding the most error (per-layer report)
        are the ones measured."""
        pairs = list(pairs or self.pairs)
        margin, cosine = self.quick_scores([], pairs)
        units = list({tuple(u): None for _, placement in pairs for u in self.units(placement)})
        if len(units) > RANKED_UNITS:
            units = self.preranked(units, pairs[0])[:RANKED_UNITS]
        rows = []
        for index, unit in enumerate(units):
            report("ranking layers for float fallback", index, len(units), "units")
            (alone, metrics), unit_cosine = self.quick_scores(unit, pairs)
            rows.append({"float_layers": list(unit), "margin_gain": alone - margin[0], "margin": alone,
                         "cosine_gain": unit_cosine - cosine, "metrics": headline(metrics)})
        return sorted(rows, key=lambda r: (-r["margin_gain"], -r["cosine_gain"]))

    def quick_scores(self, float_nodes: Sequence[str], pairs: Sequence[tuple[str, str]]) -> tuple[tuple[float, dict[str, Any]], float]:
        """On QUICK_SAMPLES samples: the worst (gate margin, metrics) and the lowest output cosine
        over `pairs`. The cosine moves smoothly where a margin on a few samples does not (top-1
        agreement on 16 samples moves in steps of 6 points), so it orders the units whose margin
        gains tie, and a unit that brings the outputs closer to FP32 is a candidate even when its
        margin on those samples does not move."""
        margins = self.margins(float_nodes, True, pairs)
        return min(margins.values(), key=lambda m: m[0]), min(lowest_cosine(m) for _, m in margins.values())

    def preranked(self, units: list[tuple[str, ...]], pair: tuple[str, str]) -> list[tuple[str, ...]]:
        """Units by the largest added error (per-layer report, QUICK_SAMPLES samples) of a tensor
        whose producer or quantized readers they hold."""
        from enginekit.quantization.report import layer_report

        session = self.session
        rows = layer_report(session.int8_model(), self.graph((), pair), session.table(), self.quick[0], None, session.options.threads)
        noise = {row["tensor"]: row.get("added_noise") or 0.0 for row in rows}
        plan, _ = plan_for(session.int8_model(), self.settings(()), pair[1])
        producers = _producers(session.int8_model().proto)
        score: dict[str, float] = {}
        for tensor in plan.activations:
            for name in _around(tensor, plan, producers):
                score[name] = max(score.get(name, 0.0), noise.get(tensor, 0.0))
        return sorted(units, key=lambda unit: -max(score.get(name, 0.0) for name in unit))


def informative_samples(scores: Sequence[tuple[float, float]], count: int) -> list[int]:
    """Indices (in order) of `count` samples to rank the units on, from each sample's (gate
    margin, output cosine) all-INT8: spread evenly, in score order, over the samples whose margin
    can still move; those at the ceiling (the highest margin, shared: a top-1 that agrees) cannot
    gain. On a top-1 gate that is the samples INT8 gets wrong (on efficientnet_lite0 the first 16
    crops, used until then, all agreed, so every unit tied at a gain of 0); on a cosine gate, no
    sample is at a ceiling and the spread stands for the mean the gate takes (the 16 worst maps of
    PP-OCRv4 det asked for another layer than the one that lifts the mean over the gate). Fewer
    movable samples than `count`: all of them, then the closest to moving (lowest cosine)."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    if len(order) <= count:
        return order and sorted(order)
    ceiling = scores[order[-1]][0]
    movable = [i for i in order if scores[i][0] < ceiling] if sum(s[0] == ceiling for s in scores) > 1 else order
    if len(movable) <= count:
        return sorted(order[:count])
    return sorted({movable[int(round(k))] for k in np.linspace(0, len(movable) - 1, count)})


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _around(tensor: str, plan: Any, producers: dict[str, onnx.NodeProto]) -> list[str]:
    """The node that computed `tensor` (through a fused Relu/Clip or data movement) and the
    quantized nodes that read it: with all of them float, the tensor has no Q/DQ left."""
    producer = source_node(tensor, producers, _LOOK_THROUGH)
    return ([producer.name] if producer is not None else []) + list(plan.consumers.get(tensor, ()))


def find_float_layers(session: Any, pairs: Sequence[tuple[str, str]], conditions: list[Condition] | None,
                      max_float_layers: int = DEFAULT_MAX_FLOAT_LAYERS,
                      targets: Mapping[tuple[str, str], Sequence[Any]] | None = None) -> Fallback:
    """The fewest layers (at most `max_float_layers`) to keep in float for the gate to pass on
    the Q/DQ graph of every (encoding, placement) in `pairs`, judged on the runtimes of `targets`
    (the INT8 targets per pair) that can run a candidate graph; `passed` False with the best set
    found when none within the bound does."""
    search = _Search(session, pairs, conditions, targets)
    margins = search.margins([])
    margin, metrics = min(margins.values(), key=lambda m: m[0])
    failing = [pair for pair, (m, _) in margins.items() if m < 0]  # the encodings the ranking is measured on
    before = headline(metrics)
    best, bounded = (margin, [], metrics), False
    if margin < 0 and max_float_layers > 0:
        ranked = [row["float_layers"] for row in search.ranking(failing) if row["margin_gain"] > 0 or row["cosine_gain"] > 0]
        sets, bounded = _growing_sets(ranked, max_float_layers, search.leaves_int8)
        best = max([best, *_grow(search, sets)], key=lambda found: found[0])
    margin, chosen, metrics = best
    if margin >= 0:
        for name in list(reversed(chosen)):  # give back every layer the gate does not need
            trial = [n for n in chosen if n != name]
            trial_margin, trial_metrics = search.evaluate(trial)
            if trial_margin >= 0:
                chosen, margin, metrics = trial, trial_margin, trial_metrics
    return Fallback(chosen, margin >= 0, before, headline(metrics), margin, search.evaluations,
                    [f"{encoding}/{placement}" for encoding, placement in pairs], failing,
                    {f"{encoding}/{placement}": judges for (encoding, placement), judges in search.judged_on.items()}, bounded)


def _growing_sets(units: Sequence[Sequence[str]], bound: int, leaves_int8: Callable[[list[str]], bool]) -> tuple[list[list[str]], bool]:
    """The float sets the ranking proposes, each the one before plus the next unit that still
    fits within `bound` layers and leaves something quantized (a set that frees every layer is
    not an INT8 build); and whether the bound left a unit out."""
    sets, chosen, bounded = [], [], False
    for unit in units:
        added = [name for name in unit if name not in chosen]
        if not added:
            continue
        if len(chosen) + len(added) > bound:
            bounded = True
        elif leaves_int8(chosen + added):
            chosen = chosen + added
            sets.append(chosen)
    return sets, bounded


def _grow(search: _Search, sets: Sequence[list[str]]) -> list[tuple[float, list[str], dict[str, Any]]]:
    """(margin, float set, metrics) of the sets checked on the whole evaluation data: 1, 2, 4, ...
    units until one passes (or the last set), then bisection down to the smallest that passes.
    Each check costs a bias-corrected graph per grid, so not every set is checked: the gate is
    assumed to hold from some number of units on, which a larger float set nearly always keeps."""
    checked: dict[int, tuple[float, list[str], dict[str, Any]]] = {}

    def check(count: int) -> bool:
        if count not in checked:
            margin, metrics = search.evaluate(sets[count - 1])
            checked[count] = (margin, sets[count - 1], metrics)
        return checked[count][0] >= 0

    sizes = [2**k for k in range(max(len(sets) - 1, 0).bit_length())] + ([len(sets)] if sets else [])
    failed, passed = 0, None
    for size in sizes:
        if check(size):
            passed = size
            break
        failed = size
    while passed is not None and passed - failed > 1:
        middle = (failed + passed) // 2
        failed, passed = (failed, middle) if check(middle) else (middle, passed)
    return list(checked.values())


def sensitivity_ranking(session: Any, pairs: Sequence[tuple[str, str]], conditions: list[Condition] | None) -> dict[str, Any]:
    """The ranking `enginekit sensitivity` prints: per unit of layers, the gate margin it reaches
    alone in float (on evaluation samples whose margin can move), against all-INT8 on the whole
    evaluation data."""
    search = _Search(session, pairs, conditions)
    margin, metrics = search.evaluate([])
    return {"model": session.fp32.name, "encodings": [f"{e}/{p}" for e, p in pairs], "all_int8": headline(metrics),
            "all_int8_margin": margin, "ranking": search.ranking(),
            "how": "each unit (the op computing a quantized tensor and the ops reading it quantized) kept float alone; "
                   f"margin = the smallest distance of a gate condition from its threshold, on {QUICK_SAMPLES} evaluation samples "
                   "whose margin can move (spread over those all-INT8 does not already get right)"}


def fallback_error(result: Fallback, what: str, max_float_layers: int) -> GateError:
    """The one line for a gate no set of at most `max_float_layers` float layers meets."""
    kept = ", ".join(result.float_nodes[:6]) + (" ..." if len(result.float_nodes) > 6 else "")
    found = (f"the best found keeps {len(result.float_nodes)} in float ({kept or 'none'}) and reaches {result.after} "
             f"(all-INT8: {result.before})")
    if not result.bounded:  # every layer the ranking found helpful was tried: a larger bound changes nothing
        return GateError(f"no fallback meets the accuracy gate: every layer whose float helped alone was tried, within the bound of "
                         f"{max_float_layers}; {found}", what, "min_accuracy")
    return GateError(f"no fallback of at most {max_float_layers} float layers meets the accuracy gate: {found}", what, "max_float_layers")
