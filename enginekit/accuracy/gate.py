"""Accuracy gates: conditions on metrics that a build must meet before it is published.

A condition is `metric OP value` (it applies to every output that reports the metric) or
`OUTPUT:metric OP value` (one output). When the user gives none, a task-aware default applies:
every output must keep top-1 agreement >= 0.90 (classification) or cosine >= 0.98 (any other
kind; a detection's boxes, scores and extras each) for INT8, FP16 and BF16, and cosine >= 0.999
for FP32 (a float conversion that changes the numbers is a broken conversion). `none` opts out. A failure names the output that failed.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from enginekit.accuracy.metrics import DETECTION_COSINES
from enginekit.core.errors import GateError, InputError

_COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_CONDITION = re.compile(r"^\s*(?:(.+):)?([a-z_0-9]+)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")
NO_GATE = "none"
DEFAULT_TOP1 = 0.90
DEFAULT_COSINE = 0.98
DEFAULT_FP32_COSINE = 0.999


@dataclass(frozen=True)
class Condition:
    metric: str
    comparison: str
    value: float
    output: str | None = None  # None: every output that reports the metric

    def holds(self, metrics: Mapping[str, Any]) -> bool:
        return self.metric in metrics and _COMPARISONS[self.comparison](metrics[self.metric], self.value)

    def __str__(self) -> str:
        where = f"{self.output}:" if self.output else ""
        return f"{where}{self.metric}{self.comparison}{self.value:g}"

    @classmethod
    def parse(cls, text: str) -> "Condition":
        """`"top1_agreement>=0.90"` or `"boxes:cosine>=0.99"` -> Condition; else an InputError."""
        match = _CONDITION.match(text)
        value = _number(match.group(4)) if match else None
        if value is None:
            raise InputError(f"cannot read the accuracy condition '{text.strip()}' (expected e.g. top1_agreement>=0.90 "
                             "or OUTPUT:cosine>=0.99)", option="min_accuracy")
        return cls(match.group(2), match.group(3), value, match.group(1))


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_conditions(conditions: "str | Iterable[Condition | str] | None") -> list[Condition] | None:
    """Conditions from text (comma-separated) or objects; None when none were given (the default
    gate applies); [] for `none` (no gate)."""
    if conditions is None or (isinstance(conditions, str) and not conditions.strip()):
        return None
    if isinstance(conditions, str):
        if conditions.strip().lower() == NO_GATE:
            return []
        conditions = conditions.split(",")
    return [c if isinstance(c, Condition) else Condition.parse(c) for c in conditions]


def default_conditions(metrics: Mapping[str, Any], precision: str) -> list[Condition]:
    """The task-aware default gate for these metrics' outputs at `precision`."""
    conditions = []
    for name, output in _outputs(metrics).items():
        if name == USER_METRIC:
            continue
        if precision == "fp32":
            conditions.append(Condition("cosine", ">=", DEFAULT_FP32_COSINE, name or None))
        elif output.get("kind") == "classification":
            conditions.append(Condition("top1_agreement", ">=", DEFAULT_TOP1, name or None))
        elif output.get("kind") == "labels":
            conditions.append(Condition("label_agreement", ">=", DEFAULT_TOP1, name or None))
        elif output.get("kind") == "detection":  # its boxes and its scores, each on their own scale
            conditions += [Condition(part, ">=", DEFAULT_COSINE, name or None) for part in DETECTION_COSINES if part in output]
        else:
            conditions.append(Condition("cosine", ">=", DEFAULT_COSINE, name or None))
    return conditions


def _outputs(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each output's metrics by name (a user metric's figures as one more entry)."""
    outputs = dict(metrics.get("outputs") or {"": metrics})
    if metrics.get("user"):
        outputs[USER_METRIC] = {"kind": "user metric", "finite": 1.0, **metrics["user"]}
    return outputs


USER_METRIC = "user metric"


def gate(metrics: Mapping[str, Any], conditions: list[Condition] | None, what: str, precision: str = "int8") -> dict[str, object]:
    """Raise GateError (exit 1) when an output is non-finite or a condition fails, naming the
    output; else the verdict. `conditions` None: the task-aware default for `precision`."""
    outputs = _outputs(metrics)
    broken = [name or "the output" for name, m in outputs.items() if not m.get("finite", 1.0)]
    if broken or not metrics.get("finite", 1.0):
        raise GateError(f"accuracy gate failed: {', '.join(broken) or 'an output'} produced NaN or Inf", what)
    default = conditions is None
    conditions = default_conditions(metrics, precision) if default else conditions
    failed = []
    for condition, name, output in _applicable(conditions, outputs):
        if not condition.holds(output):
            where = f"output '{name}' ({output.get('kind', 'output')}): " if name else ""
            failed.append(f"{where}{condition.metric}={output[condition.metric]:.4f} (needs {condition.comparison}{condition.value:g})")
    if failed:
        rule = " by the task-aware default gate (which can be turned off)" if default else ""
        error = GateError(f"accuracy gate failed{rule}: {'; '.join(failed)}", what)
        error.option = "min_accuracy"
        raise error
    return {"conditions": [str(c) for c in conditions], "default_gate": default, "passed": True}


def gate_margin(metrics: Mapping[str, Any], conditions: list[Condition] | None, precision: str = "int8") -> float:
    """How far the metrics clear the gate: the smallest distance of any condition from its
    threshold, negative when a condition fails (-inf for a non-finite output). What a search for
    the fewest float layers compares candidates by."""
    outputs = _outputs(metrics)
    if not metrics.get("finite", 1.0) or any(not m.get("finite", 1.0) for m in outputs.values()):
        return -math.inf
    conditions = default_conditions(metrics, precision) if conditions is None else conditions
    margins = [0.0 if not conditions else math.inf]
    for condition, _, output in _applicable(conditions, outputs):
        value, threshold = float(output[condition.metric]), condition.value
        margins.append({">=": value - threshold, ">": value - threshold, "<=": threshold - value, "<": threshold - value}.get(
            condition.comparison, -abs(value - threshold)))
    return min(margins)


def _applicable(conditions: list[Condition], outputs: Mapping[str, Mapping[str, Any]]):
    """(condition, output name, output metrics) for every output each condition applies to; a
    condition naming an output or metric the model does not have is an InputError."""
    for condition in conditions:
        if condition.output is not None and condition.output not in outputs:
            raise InputError(f"the accuracy condition names output '{condition.output}'; the model's outputs are "
                             f"{', '.join(sorted(outputs))}", option="min_accuracy")
        applicable = [(name, m) for name, m in outputs.items() if condition.output in (None, name) and condition.metric in m]
        if not applicable:
            reported = sorted({k for m in outputs.values() for k in m if k not in ("kind", "samples", "finite")})
            raise InputError(f"the accuracy condition names '{condition.metric}', which this model does not report "
                             f"(it has {', '.join(reported)})", option="min_accuracy")
        for name, output in applicable:
            yield condition, name, output
