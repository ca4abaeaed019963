"""Who reads and who writes each tensor of a graph, and what a node's attributes say: what every graph rewrite starts from."""

from __future__ import annotations

from typing import Any

import onnx


def tensor_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that take it as an input, in graph order (a node reading it twice
    is listed twice)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def tensor_producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that outputs it."""
    return {name: node for node in graph.node for name in node.output}


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of `node`'s attribute `name` (an int, float, bytes, tensor, list, ...), or
    `default` where the node leaves it to the operator's default."""
    for value in node.attribute:
        if value.name == name:
            return onnx.helper.get_attribute_value(value)
    return default
