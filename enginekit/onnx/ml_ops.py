"""ai.onnx.ml ops that have an exact standard-ONNX equivalent, rewritten as that equivalent.

A scikit-learn pipeline converted by skl2onnx wraps its network in ai.onnx.ml ops: a Scaler for
StandardScaler, an ArrayFeatureExtractor that looks the predicted label up in the classes. ONNX
Runtime runs them, but OpenVINO has no conversion rule for them and TFLite cannot lower them, so
every other target refused the whole model. Written as Cast/Sub/Mul and Gather they build
everywhere; the export's parity check compares the result with the original file."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from enginekit.onnx.graph import value_dims
from enginekit.onnx.nodes import attribute, drop_unused_domain

ML_DOMAIN = "ai.onnx.ml"


def zipmap_outputs(model: onnx.ModelProto) -> list[str]:
    """Graph outputs written by a ZipMap: a classifier's probabilities as a list of maps, which no
    inference engine here returns (skl2onnx writes one unless told `zipmap: False`)."""
    outputs = {o.name for o in model.graph.output}
    return [name for node in model.graph.node if node.domain == ML_DOMAIN and node.op_type == "ZipMap"
            for name in node.output if name in outputs]


def standard_ml_ops(model: onnx.ModelProto) -> list[str]:
    """Rewrite Scaler and ArrayFeatureExtractor nodes of the main graph as standard ops, in place;
    the op types rewritten. An ArrayFeatureExtractor whose data rank is unknown is left alone
    (its output shape depends on it)."""
    if not any(node.domain == ML_DOMAIN for node in model.graph.node):
        return []
    ranks = _ranks(model)
    rewritten: list[str] = []
    nodes: list[onnx.NodeProto] = []
    for index, node in enumerate(model.graph.node):
        replacement = None
        if node.domain == ML_DOMAIN and node.op_type == "Scaler":
            replacement = _scaler(node, index, model.graph)
        elif node.domain == ML_DOMAIN and node.op_type == "ArrayFeatureExtractor" and ranks.get(node.input[0]):
            replacement = _feature_extractor(node, index, ranks[node.input[0]], model.graph)
        if replacement is None:
            nodes.append(node)
            continue
        nodes.extend(replacement)
        rewritten.append(node.op_type)
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        drop_unused_domain(model, ML_DOMAIN)
    return sorted(set(rewritten))


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - then only what the file declares
        inferred = model
    ranks = {name: len(dims) for name, dims in value_dims(inferred).items()}
    ranks.update({t.name: len(t.dims) for t in inferred.graph.initializer})
    return ranks


def _constant(graph: onnx.GraphProto, name: str, value: np.ndarray) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _scaler(node: onnx.NodeProto, index: int, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Y = (float(X) - offset) * scale, broadcast along the last axis: ONNX Runtime's kernel, op
    for op."""
    prefix = f"{node.name or 'scaler'}_{index}"
    offset = _constant(graph, f"{prefix}_offset", np.array(attribute(node, "offset", [0.0]), np.float32))
    scale = _constant(graph, f"{prefix}_scale", np.array(attribute(node, "scale", [1.0]), np.float32))
    return [helper.make_node("Cast", [node.input[0]], [f"{prefix}_float"], to=onnx.TensorProto.FLOAT, name=f"{prefix}_cast"),
            helper.make_node("Sub", [f"{prefix}_float", offset], [f"{prefix}_centred"], name=f"{prefix}_sub"),
            helper.make_node("Mul", [f"{prefix}_centred", scale], list(node.output), name=f"{prefix}_mul")]


def _feature_extractor(node: onnx.NodeProto, index: int, rank: int, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Y = X[..., indices.ravel()]; a 1-D X gives [1, len(indices)], as ONNX Runtime's kernel does."""
    prefix = f"{node.name or 'feature_extractor'}_{index}"
    flat = _constant(graph, f"{prefix}_flat", np.array([-1], np.int64))
    nodes = [helper.make_node("Reshape", [node.input[1], flat], [f"{prefix}_indices"], name=f"{prefix}_indices")]
    if rank > 1:
        return [*nodes, helper.make_node("Gather", [node.input[0], f"{prefix}_indices"], list(node.output), axis=rank - 1, name=f"{prefix}_gather")]
    row = _constant(graph, f"{prefix}_row", np.array([1, -1], np.int64))
    return [*nodes, helper.make_node("Gather", [node.input[0], f"{prefix}_indices"], [f"{prefix}_picked"], axis=0, name=f"{prefix}_gather"),
            helper.make_node("Reshape", [f"{prefix}_picked", row], list(node.output), name=f"{prefix}_row")]
