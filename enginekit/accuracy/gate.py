"""Accuracy gates: conditions on metrics ("top1_agreement>=0.90") that a build must meet before
it is published. The CLI parses them from strings; the API takes Condition objects too."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable
from dataclasses import dataclass

from enginekit.core.errors import GateError, InputError

_COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_CONDITION = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|==|>|<)\s*(-?[0-9.eE+-]+)\s*$")


@dataclass(frozen=True)
class Condition:
    metric: str
    comparison: str
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        return self.metric in metrics and _COMPARISONS[self.comparison](metrics[self.metric], self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.comparison}{self.value:g}"


    @classmethod
    def parse(cls, text: str) -> "Condition":
        """`"top1_agreement>=0.90"` -> Condition; anything else is an InputError."""
        match = _CONDITION.match(text)
        value = _number(match.group(3)) if match else None
        if value is None:
            raise InputError(f"cannot read the accuracy condition '{text.strip()}' (expected e.g. top1_agreement>=0.90)",
                             option="min_accuracy")
        return cls(match.group(1), match.group(2), value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def parse_conditions(conditions: "str | Iterable[Condition | str] | None") -> list[Condition]:
    """`"top1_agreement>=0.90, cosine>=0.99"` (or Condition objects) -> conditions."""
    if not conditions:
        return []
    if isinstance(conditions, str):
        conditions = conditions.split(",")
    return [c if isinstance(c, Condition) else Condition.parse(c) for c in conditions]


def gate(metrics: dict[str, float], conditions: list[Condition], what: str) -> dict[str, object]:
    """Raise GateError (exit 1) when outputs are non-finite or a condition fails; else the verdict."""
    if not metrics.get("finite", 1.0):
        raise GateError("accuracy gate failed: the quantized model produced NaN or Inf", what)
    for condition in conditions:
        if condition.metric not in metrics:
            raise InputError(f"the accuracy condition names '{condition.metric}', which this model does not report "
                             f"(it has {', '.join(sorted(metrics))})", option="min_accuracy")
    failed = [c for c in conditions if not c.holds(metrics)]
    if failed:
        shown = ", ".join(f"{c.metric}={metrics[c.metric]:.4f} (needs {c.comparison}{c.value:g})" for c in failed)
        raise GateError(f"accuracy gate failed: {shown}", what)
    return {"conditions": [str(c) for c in conditions], "passed": True}
