"""Folds ONNX Runtime's basic optimizations leave undone: the bias Add and the BatchNormalization
after a ConvTranspose go into its weights and bias (ONNX Runtime folds them into a Conv only,
onnxruntime#14270). PP-OCRv4 det's head is ConvTranspose -> Add -> BatchNormalization -> Relu ->
ConvTranspose -> Add -> Sigmoid on its largest tensors: each fold saves a pass over one of them,
and leaves one layer that a target can fuse with its activation or quantize as a whole.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.onnx.nodes import attribute, tensor_readers


def fold_into_conv_transpose(model: onnx.ModelProto) -> onnx.ModelProto:
    """In place (and returned): every ungrouped ConvTranspose with constant float32 weights absorbs
    the chain of constant per-channel Adds and BatchNormalizations that alone read its output."""
    graph = model.graph
    constants = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    readers = tensor_readers(graph)
    dropped: set[int] = set()
    replaced: set[str] = set()  # constants the folds used: removed when nothing else reads them
    for node in graph.node:
        if node.op_type != "ConvTranspose" or attribute(node, "group", 1) != 1 or node.input[1] not in constants:
            continue
        if constants[node.input[1]].data_type != onnx.TensorProto.FLOAT:  # float16/bfloat16 graphs keep their own types
            continue
        if len(node.input) > 2 and node.input[2] and node.input[2] not in constants:
            continue
        weight = numpy_helper.to_array(constants[node.input[1]]).astype(np.float64)
        channels, spatial = weight.shape[1], weight.ndim - 2
        bias = (numpy_helper.to_array(constants[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2]
                else np.zeros(channels))
        folded = []
        while node.output[0] not in outputs and len(readers.get(node.output[0], [])) == 1:
            follower = readers[node.output[0]][0]
            step = _channel_step(follower, node.output[0], constants, channels, spatial)
            if step is None:
                break
            scale, shift = step
            weight, bias = weight * scale.reshape(1, -1, *[1] * spatial), bias * scale + shift
            node.output[0] = follower.output[0]  # its readers (in `readers` under that name) now read the ConvTranspose
            dropped.add(id(follower))
            replaced.update(follower.input)
            folded.append(follower)
        if folded:
            names = (f"{node.name or node.output[0]}_folded_weight", f"{node.name or node.output[0]}_folded_bias")
            graph.initializer.extend([numpy_helper.from_array(weight.astype(np.float32), names[0]),
                                      numpy_helper.from_array(bias.astype(np.float32), names[1])])
            replaced.update(node.input[1:3])
            node.input[1] = names[0]
            if len(node.input) > 2:
                node.input[2] = names[1]
            else:
                node.input.append(names[1])
    if dropped:
        kept = [node for node in graph.node if id(node) not in dropped]
        del graph.node[:]
        graph.node.extend(kept)
        read = {name for node in graph.node for name in node.input} | outputs
        unread = [t for t in graph.initializer if t.name not in read and t.name in replaced]
        for tensor in unread:  # the folded constants no other node reads
            graph.initializer.remove(tensor)
    return model


def _channel_step(node: onnx.NodeProto, tensor: str, constants: dict[str, onnx.TensorProto], channels: int,
                  spatial: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, shift) per output channel when `node` is y = tensor * scale + shift with constant,
    per-channel (or scalar) values; None otherwise."""
    if node.op_type == "Add" and len(node.input) == 2:
        other = node.input[1] if node.input[0] == tensor else node.input[0]
        if other == tensor or other not in constants:
            return None
        value = numpy_helper.to_array(constants[other]).astype(np.float64)
        per_channel = value.ndim >= spatial + 1 and value.shape[-(spatial + 1)] == channels and value.size == channels
        if value.size != 1 and not per_channel:
            return None
        return np.ones(channels), np.broadcast_to(value.reshape(-1), (channels,)).copy()
    if node.op_type == "BatchNormalization" and len(node.output) == 1 and node.input[0] == tensor \
            and all(name in constants for name in node.input[1:5]):
        gamma, beta, mean, variance = (numpy_helper.to_array(constants[name]).astype(np.float64) for name in node.input[1:5])
        scale = gamma / np.sqrt(variance + attribute(node, "epsilon", 1e-5))
        return scale, beta - mean * scale
    return None
