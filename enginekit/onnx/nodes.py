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


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds in its attributes: an If's branches, a Loop's or Scan's body."""
    return [graph for value in node.attribute
            for graph in ([value.g] if value.type == onnx.AttributeProto.GRAPH else list(value.graphs))]


def drop_unused_domain(model: onnx.ModelProto, domain: str) -> None:
    """Remove `domain`'s opset import where no node of the main graph uses it any more (after a
    rewrite replaced its ops), in place."""
    if not any(node.domain == domain for node in model.graph.node):
        kept = [o for o in model.opset_import if o.domain != domain]
        del model.opset_import[:]
        model.opset_import.extend(kept)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and the outer-scope names its subgraphs use."""
    names = [name for name in node.input if name]
    for graph in subgraphs(node):
        defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
        names += [name for n in graph.node for name in node_inputs(n) if name not in defined]
    return list(dict.fromkeys(names))


def graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor some node of `graph` reads, its subgraphs' outer-scope reads included (an If's
    branches read their weights from the main graph's initializers)."""
    return {name for node in graph.node for name in node_inputs(node)}


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
