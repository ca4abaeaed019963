"""Sensitivity-guided float fallback (`--auto-fallback`): the fewest layers kept in float that
make the accuracy gate pass, found on the Q/DQ graph in the reference executor.

Why on the Q/DQ graph: which layers must stay float is a property of the quantized graph, not of
a runtime, so one set serves every target of the build (each target then verifies the gate on
its own runtime, as always). Every distinct (encoding, placement) of the build's INT8 targets is
evaluated and the worst decides.

The search: (1) rank — for each quantized tensor, the unit that frees it (the compute op that
made it and the quantized ops that read it, so the tensor has no Q/DQ left) is kept float alone,
and the gate's margin on one evaluation batch says how much that unit is worth; measured rather
than read from per-tensor SQNR, which a tensor dominated by one large channel hides. (2) add
units best first, checking the gate on the whole evaluation data, until it passes or the bound is
reached. (3) give back to INT8, one by one, every layer the gate does not need. Bias correction
is left out of the search (it would rerun per candidate); the targets' own gates run with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from enginekit.accuracy import Condition, collect_outputs, compare_outputs, gate_margin, headline
from enginekit.core.errors import GateError
from enginekit.core.progress import report
from enginekit.onnx.session import Session
from enginekit.quantization.pipeline import build_qdq, plan_for
from enginekit.quantization.placement import SAME_SCALE_OPS

DEFAULT_MAX_FLOAT_LAYERS = 16
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

    def manifest(self) -> dict[str, Any]:
        return {"float_layers": self.float_nodes, "passed": self.passed, "all_int8": self.before, "with_fallback": self.after,
                "evaluated_graphs": self.evaluations, "encodings": self.encodings,
                "how": "units ranked by the gate margin each gains alone (one batch), added best first on the Q/DQ graph "
                       "in the reference executor, then pruned; bias correction off in the search"}


class _Search:
    def __init__(self, session: Any, pairs: Sequence[tuple[str, str]], conditions: list[Condition] | None):
        self.session, self.pairs, self.conditions = session, list(pairs), conditions
        self.base = session.options.quantize
        self.evaluations = 0
        evaluation = session.evaluation()
        self.axes = {name: axis for name, axis in session.output_axes.items() if axis is not None}
        first = evaluation.batches[:1]
        reference = Session(session.fp32.proto, threads=session.options.threads, spinning=False)
        self.quick = (first, collect_outputs(reference.run, first, None, session.input_axes, session.output_axes),
                      None if evaluation.labels is None else evaluation.labels[: _rows(first, session)])
        self.full = (evaluation.batches, session.reference_outputs(), evaluation.labels)

    def settings(self, float_nodes: Sequence[str]):
        return dataclasses.replace(self.base, exclude_nodes=(*self.base.exclude_nodes, *float_nodes), bias_correction=False)

    def evaluate(self, float_nodes: Sequence[str], quick: bool = False, pairs: Sequence[tuple[str, str]] | None = None) -> tuple[float, dict[str, Any]]:
        """The worst gate margin over the encodings (on one batch when `quick`) and its metrics."""
        session = self.session
        batches, reference, labels = self.quick if quick else self.full
        worst: tuple[float, dict[str, Any]] | None = None
        for encoding, placement in pairs or self.pairs:
            graph, _ = build_qdq(session.fp32, session.table(), self.settings(float_nodes), encoding, (), session.options.threads, placement)
            runner = Session(graph.model, threads=session.options.threads, spinning=False)
            candidate = collect_outputs(runner.run, batches, None, session.input_axes, session.output_axes)
            metrics = compare_outputs(reference, candidate, labels, session.options.output_kinds, self.axes)
            margin = gate_margin(metrics, self.conditions, "int8")
            self.evaluations += 1
            if worst is None or margin < worst[0]:
                worst = (margin, metrics)
        return worst

    def units(self, placement: str) -> list[list[str]]:
        """Per quantized tensor, the quantized ops that must be float for it to have no Q/DQ."""
        session = self.session
        plan, _ = plan_for(session.fp32, self.settings(()), placement)
        quantized = set(plan.nodes)
        producers = {o: n for n in session.fp32.proto.graph.node for o in n.output}
        found: dict[tuple[str, ...], None] = {}
        for tensor in plan.activations:
            producer = _computing_node(tensor, producers)
            around = ([producer.name] if producer is not None else []) + list(plan.consumers.get(tensor, ()))
            unit = tuple(dict.fromkeys(name for name in around if name in quantized))
            if unit and len(unit) < len(quantized):  # something must stay INT8
                found[unit] = None
        return [list(unit) for unit in found]

    def ranking(self) -> list[dict[str, Any]]:
        """Every unit with the gate margin it reaches alone in float on one batch and what that
        gains over all-INT8, best first."""
        margin, _ = self.evaluate([], quick=True)
        units = {tuple(u): None for _, placement in self.pairs for u in self.units(placement)}
        rows = []
        for index, unit in enumerate(units):
            report("ranking layers for float fallback", index, len(units), "units")
            alone, metrics = self.evaluate(unit, quick=True)
            rows.append({"float_layers": list(unit), "margin_gain": alone - margin, "margin": alone, "metrics": headline(metrics)})
        return sorted(rows, key=lambda r: -r["margin_gain"])


def _rows(batches: Sequence[dict[str, np.ndarray]], session: Any) -> int:
    from enginekit.core.tensors import batch_size

    return sum(batch_size(b, session.input_axes) for b in batches)


def _computing_node(tensor: str, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    node = producers.get(tensor)
    while node is not None and node.op_type in _LOOK_THROUGH and node.input:
        node = producers.get(node.input[0])
    return node


def find_float_layers(session: Any, pairs: Sequence[tuple[str, str]], conditions: list[Condition] | None,
                      max_float_layers: int = DEFAULT_MAX_FLOAT_LAYERS) -> Fallback:
    """The fewest layers (at most `max_float_layers`) to keep in float for the gate to pass on
    the Q/DQ graph of every (encoding, placement) in `pairs`; `passed` False with the best set
    found when none within the bound does."""
    search = _Search(session, pairs, conditions)
    margin, metrics = search.evaluate([])
    before = headline(metrics)
    chosen: list[str] = []
    best = (margin, list(chosen), metrics)
    if margin < 0 and max_float_layers > 0:
        for unit in (row["float_layers"] for row in search.ranking() if row["margin_gain"] > 0):
            added = [name for name in unit if name not in chosen]
            if not added or len(chosen) + len(added) > max_float_layers:
                continue
            chosen += added
            margin, metrics = search.evaluate(chosen)
            if margin > best[0]:
                best = (margin, list(chosen), metrics)
            if margin >= 0:
                break
    margin, chosen, metrics = best
    if margin >= 0:
        for name in list(reversed(chosen)):  # give back every layer the gate does not need
            trial = [n for n in chosen if n != name]
            trial_margin, trial_metrics = search.evaluate(trial)
            if trial_margin >= 0:
                chosen, margin, metrics = trial, trial_margin, trial_metrics
    return Fallback(chosen, margin >= 0, before, headline(metrics), margin, search.evaluations,
                    [f"{encoding}/{placement}" for encoding, placement in pairs])


def sensitivity_ranking(session: Any, pairs: Sequence[tuple[str, str]], conditions: list[Condition] | None) -> dict[str, Any]:
    """The ranking `enginekit sensitivity` prints: per unit of layers, the gate margin it reaches
    alone in float (first evaluation batch), against all-INT8 on the whole evaluation data."""
    search = _Search(session, pairs, conditions)
    margin, metrics = search.evaluate([])
    return {"model": session.fp32.name, "encodings": [f"{e}/{p}" for e, p in pairs], "all_int8": headline(metrics),
            "all_int8_margin": margin, "ranking": search.ranking(),
            "how": "each unit (the op computing a quantized tensor and the ops reading it quantized) kept float alone; "
                   "margin = the smallest distance of a gate condition from its threshold, on the first evaluation batch"}


def fallback_error(result: Fallback, what: str, max_float_layers: int) -> GateError:
    """The one line for a gate no set of at most `max_float_layers` float layers meets."""
    kept = ", ".join(result.float_nodes[:6]) + (" ..." if len(result.float_nodes) > 6 else "")
    error = GateError(f"no fallback of at most {max_float_layers} float layers meets the accuracy gate: the best found keeps "
                      f"{len(result.float_nodes)} in float ({kept or 'none'}) and reaches {result.after} (all-INT8: {result.before})", what)
    error.option = "max_float_layers"
    return error
