"""Protobuf text format, written and read.

Writing needs no protobuf: a config is a nested dict (message), lists are repeated fields,
`Enum` values are written bare, everything else as a literal. Reading parses with the message
class of Triton's own `model_config.proto` (the `triton` extra), so a field Triton does not
know, or a value of the wrong type, is an error here exactly as it is in the server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


class Enum(str):
    """An enum value (written without quotes, e.g. TYPE_FP32, KIND_CPU)."""


def to_text(message: Mapping[str, Any], comments: Sequence[str] = ()) -> str:
    """`message` in protobuf text format, preceded by `# comment` lines."""
    lines = [f"# {line}" for line in comments]
    _fields(message, 0, lines)
    return "\n".join(lines) + "\n"


def _fields(message: Mapping[str, Any], depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            lines.append(f"{pad}{key} {{")
            _fields(value, depth + 1, lines)
            lines.append(f"{pad}}}")
        elif isinstance(value, (list, tuple)):
            if value and isinstance(value[0], Mapping):
                lines.append(f"{pad}{key} [")
                for index, item in enumerate(value):
                    lines.append(f"{pad}  {{")
                    _fields(item, depth + 2, lines)
                    lines.append(f"{pad}  }}{',' if index < len(value) - 1 else ''}")
                lines.append(f"{pad}]")
            else:
                lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")


def _scalar(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string literal is a valid text-format string literal


def parameters(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Triton's `parameters` map (string values) as repeated key/value entries."""
    return [{"key": key, "value": {"string_value": str(value)}} for key, value in values.items()]
