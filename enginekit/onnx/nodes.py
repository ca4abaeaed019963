"""Who reads and who writes each tensor of a graph: the two maps every graph rewrite starts from."""

from __future__ import annotations

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
