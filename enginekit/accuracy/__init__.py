"""Accuracy against the FP32 reference: metrics per output, gates (Condition) that the CLI parses
from strings and every build applies before it publishes an artifact."""

from enginekit.accuracy.gate import Condition, gate, parse_conditions
from enginekit.accuracy.metrics import collect_outputs, compare_outputs, output_metrics

__all__ = ["Condition", "collect_outputs", "compare_outputs", "gate", "output_metrics", "parse_conditions"]
