"""Accuracy against the FP32 reference: metrics per output, gates (Condition) that the CLI parses
from strings and every build applies before it publishes an artifact."""

from enginekit.accuracy.gate import NO_GATE, Condition, default_conditions, gate, gate_margin, parse_conditions
from enginekit.accuracy.metrics import KINDS, collect_outputs, compare_outputs, headline, infer_kind, output_metrics
from enginekit.accuracy.user import load_user_metric

__all__ = ["KINDS", "NO_GATE", "Condition", "collect_outputs", "compare_outputs", "default_conditions", "gate", "gate_margin", "headline", "infer_kind",
           "load_user_metric", "output_metrics", "parse_conditions"]
