"""A report on disk: report.json, report.md and report.html side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from enginekit.benchmark.html import render_html
from enginekit.benchmark.report import markdown
from enginekit.core.artifacts import atomic_write_all
from enginekit.core.outputs import REPORT, Output, check_outputs, report_paths


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path, Path]:
    """report.json, report.md and report.html side by side (each written atomically)."""
    path = Path(path)
    md_path, html_path = path.with_suffix(".md"), path.with_suffix(".html")
    check_outputs([Output(p, REPORT) for p in report_paths(path)])
    texts = ((path, json.dumps(report, indent=1) + "\n"), (md_path, markdown(report) + "\n"), (html_path, render_html(report)))
    atomic_write_all([(target, lambda p, t=text: p.write_text(t)) for target, text in texts])
    return path, md_path, html_path
