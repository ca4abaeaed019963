"""Plain-text tables for the terminal (and Markdown, which is the same thing with pipes)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], escape: bool = False) -> str:
    """A Markdown table padded so it also reads well as plain text. `escape`: cells hold text from
    files (manifests, reports), so Markdown and HTML syntax in them is shown, never interpreted."""
    cells = [[str(h) for h in headers]] + [[cell_text(v, escape) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) and rows for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if numeric[i] else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def cell_text(value: object, escape: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    text = " ".join(str(value).split())
    if escape:  # no tag opens without "<", so ">" stays readable: a gate's "needs >=0.9" in the terminal
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("`", "\\`")
    return text


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ProgressPrinter:
    """Draws progress events (core.progress) for a person: on a terminal, one line redrawn in
    place per task; into a log file or pipe, at most one line every `interval` seconds, the first
    after `interval` seconds of silence, so a long build piped to a log is never silent while a
    short command's output stays its result (or its one-line error) alone."""

    def __init__(self, stream, interval: float = 10.0):
        import time

        self.stream, self.interval = stream, interval
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self._task: str | None = None
        self._last = time.monotonic()
        self._open = False  # a terminal line is being redrawn

    def __call__(self, event) -> None:
        import time

        now = time.monotonic()
        finished = event.total is not None and event.done >= event.total
        new_task = event.task != self._task
        if self.tty:
            if new_task and self._open:
                self.stream.write("\n")
            self.stream.write("\r" + event.describe()[:160].ljust(60))
            self._open = not finished
            if finished:
                self.stream.write("\n")
        elif now - self._last >= self.interval:
            self.stream.write(event.describe() + "\n")
            self._last = now
        self._task = None if finished else event.task
        self.stream.flush()


def print_warnings_on_one_line() -> None:
    """Show Python warnings as `enginekit: warning: ...` lines: a user reads what happened, not
    the file path and source line of the `warnings.warn` call (`--debug` keeps Python's format)."""
    import warnings

    warnings.showwarning = _show_warning


def prints_warnings_on_one_line() -> bool:
    """Whether this process shows warnings as one line (a spawned worker is set up the same way)."""
    import warnings

    return warnings.showwarning is _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001 - warnings' signature
    import sys

    origin = warning_origin(str(filename))
    text = " ".join(str(message).split())
    stream = file or sys.stderr
    if stream is not None:
        stream.write(f"enginekit: warning: {'' if origin == 'enginekit' else f'({origin}) '}{text}\n")


def warning_origin(filename: str) -> str:
    """The package a warning was raised in: `enginekit`, the installed package holding the file
    (`torch`, `onnx`), else the file's name."""
    from pathlib import Path

    path = Path(filename)
    if Path(__file__).parents[1] in path.parents:
        return "enginekit"
    parts = path.parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return path.name
