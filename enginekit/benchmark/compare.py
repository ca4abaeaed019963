"""`enginekit compare old.json new.json`: what got faster, slower or less accurate.

A latency verdict uses the spread of the runs, not a fixed percentage alone: the median ratio
new/old gets a 95 % bootstrap interval from the stored latency samples; "slower" or "faster"
needs the whole interval beyond +-`min_effect` (default 2 %), else "no change". A regression
fails the gate (exit 1) only when it is significant AND the median grew more than
`max_regression`; an accuracy metric that dropped more than `max_accuracy_drop` fails it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enginekit.benchmark.report import ACCURACY_KEYS, artifact_key, validate_report
from enginekit.core.console import markdown_table

BOOTSTRAP_RESAMPLES = 2000


def latency_verdict(old: list[float], new: list[float], min_effect: float = 0.02, seed: int = 0) -> tuple[str, float, float, float]:
    """(verdict, median ratio, low, high) for new/old latency samples."""
    old_a, new_a = np.asarray(old, np.float64), np.asarray(new, np.float64)
    ratio = float(np.median(new_a) / np.median(old_a))
    rng = np.random.default_rng(seed)
    old_boot = np.median(rng.choice(old_a, (BOOTSTRAP_RESAMPLES, old_a.size)), axis=1)
    new_boot = np.median(rng.choice(new_a, (BOOTSTRAP_RESAMPLES, new_a.size)), axis=1)
    low, high = np.percentile(new_boot / old_boot, [2.5, 97.5])
    if low > 1 + min_effect:
        return "slower", ratio, float(low), float(high)
    if high < 1 - min_effect:
        return "faster", ratio, float(low), float(high)
    return "no change", ratio, float(low), float(high)


@dataclass
class Comparison:
    rows: list[list[Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    only_old: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)

    def render(self) -> str:
        text = markdown_table(["artifact", "metric", "old", "new", "change", "verdict"], self.rows)
        for label, keys in (("only in the old report", self.only_old), ("only in the new report", self.only_new)):
            if keys:
                text += f"\n{label}: {', '.join(keys)}"
        if self.failures:
            text += "\nFAILED: " + "; ".join(self.failures)
        return text


def compare_reports(old: dict[str, Any], new: dict[str, Any], max_regression: float = 0.10,
                    max_accuracy_drop: float = 0.01, min_effect: float = 0.02) -> Comparison:
    validate_report(old, "old report")
    validate_report(new, "new report")
    old_entries = {artifact_key(e): e for e in old["artifacts"]}
    new_entries = {artifact_key(e): e for e in new["artifacts"]}
    result = Comparison(only_old=sorted(set(old_entries) - set(new_entries)), only_new=sorted(set(new_entries) - set(old_entries)))
    for key in sorted(set(old_entries) & set(new_entries)):
        before, after = old_entries[key], new_entries[key]
        verdict, ratio, low, high = latency_verdict(before["latency_samples_ms"], after["latency_samples_ms"], min_effect)
        result.rows.append([key, "latency p50 ms", before["latency_ms"]["p50_ms"], after["latency_ms"]["p50_ms"],
                            f"{(ratio - 1) * 100:+.1f}% [{(low - 1) * 100:+.1f}, {(high - 1) * 100:+.1f}]", verdict])
        if verdict == "slower" and ratio - 1 > max_regression:
            result.failures.append(f"{key} latency +{(ratio - 1) * 100:.1f}% (limit {max_regression * 100:.0f}%)")
        for metric in ACCURACY_KEYS:
            if metric in (before.get("accuracy") or {}) and metric in (after.get("accuracy") or {}):
                if not all(math.isfinite(e["accuracy"][metric]) for e in (before, after)):
                    result.rows.append([key, metric, before["accuracy"][metric], after["accuracy"][metric], "-", "not a number"])
                    result.failures.append(f"{key} {metric} is not a finite number in one report")
                    continue
                drop = before["accuracy"][metric] - after["accuracy"][metric]
                verdict = "less accurate" if drop > max_accuracy_drop else ("more accurate" if drop < -max_accuracy_drop else "no change")
                result.rows.append([key, metric, before["accuracy"][metric], after["accuracy"][metric], f"{-drop:+.4f}", verdict])
                if drop > max_accuracy_drop:
                    result.failures.append(f"{key} {metric} dropped {drop:.4f} (limit {max_accuracy_drop})")
    return result
