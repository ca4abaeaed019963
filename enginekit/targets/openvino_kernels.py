"""OpenVINO's int8 kernels checked layer by layer against the Q/DQ graph they were built from.

The Q/DQ graph run as written (the reference executor: each DequantizeLinear -> float op ->
QuantizeLinear) is what every target's integer kernels should compute, to rounding. On this
Xeon (AVX-512 VNNI, AMX) OpenVINO 2026.4's CPU plugin computes some int8 convolutions wrongly: a 1-D
Conv of 16 channels with a kernel of 8 or 16 comes out at cosine 0.24-0.43 to the graph (15 or 3
taps, or 32 channels: 0.9999), and transformers' HuBERT and wav2vec2, whose positional
convolution is one, lost their INT8 gate on OpenVINO only (cosine 0.96 and 0.95; ONNX Runtime
0.998 from the same graph). The same layers with uint8 weights, which OpenVINO runs in float,
are right.

So an INT8 build compiles the graph once more with every compute layer's input and output as
extra outputs, runs a few calibration samples through it and through the reference executor,
and a layer whose output disagrees (cosine below DEFECT_COSINE) although its input agrees is a
kernel defect, not quantization error: that layer's weights are dequantized in the IR's source
graph, so OpenVINO runs it in float on the int8 grid's values, and the manifest names it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from enginekit.core.tensors import Feeds
from enginekit.exporter.parity import cosine_similarity

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
DEFECT_COSINE = 0.99  # a layer's output this far from the graph's is not rounding (a healthy int8 layer: > 0.999)
INPUT_AGREES = 0.999  # ... when its input agrees this well: the kernel, not what it was fed


def kernel_defects(graph: onnx.ModelProto, feeds: Feeds, compile_and_run, threads: int | None = None) -> dict[str, float]:
    """Compute layers of `graph` (a Q/DQ ONNX model) whose OpenVINO output disagrees with the
    reference executor's although their data input agrees: node name -> output cosine.
    `compile_and_run(model, feeds)` returns OpenVINO's outputs by tensor name."""
    from enginekit.onnx.session import Session

    constant = {t.name for t in graph.graph.initializer}
    for node in graph.graph.node:  # weights: a DequantizeLinear of an initializer
        if node.op_type == "DequantizeLinear" and node.input[0] in constant:
            constant.update(node.output)
    layers = [(node.name, [t for t in node.input if t and t not in constant], node.output[0])
              for node in graph.graph.node if node.op_type in COMPUTE_OPS and node.input]
    if not layers:
        return {}
    probed = onnx.ModelProto()
    probed.CopyFrom(graph)
    present = {output.name for output in probed.graph.output}
    for name in dict.fromkeys(t for _, sources, result in layers for t in (*sources, result)):
        if name not in present:
            probed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    expected = Session(probed, threads=threads).run(feeds)
    got = compile_and_run(probed, feeds)
    defects = {}
    for node, sources, result in layers:
        if any(t not in got or t not in expected for t in (*sources, result)):
            continue
        agreement = cosine_similarity(expected[result], got[result])
        # every activation it reads agrees (a layer downstream of a defect reads its error, it has none of its own)
        if agreement < DEFECT_COSINE and all(cosine_similarity(expected[t], got[t]) >= INPUT_AGREES for t in sources):
            defects[node] = round(float(agreement), 4)
    return defects


def dequantize_weights(graph: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto:
    """`graph` with the weights of `nodes` given as float initializers (their int8 values times
    their scales) instead of through a DequantizeLinear: the runtime then runs those layers in
    float on the same values, their inputs still on the int8 grid."""
    from enginekit.onnx.prequantized import dequantized_constant

    initializers = {t.name: t for t in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(graph)
    chosen = set(nodes)
    for node in fixed.graph.node:
        dequantize = producers.get(node.input[1]) if node.name in chosen and len(node.input) > 1 else None
        values = dequantized_constant(dequantize, producers, initializers) if dequantize is not None and dequantize.op_type == "DequantizeLinear" else None
        if values is None:
            continue
        name = f"{node.input[1]}/float_for_openvino"
        fixed.graph.initializer.append(numpy_helper.from_array(values, name))
        node.input[1] = name
    return fixed


def scalar_gathers_as_slices(graph: onnx.ModelProto) -> int:
    """Rewrite, in place, every Gather of one constant index (a rank-0 index: `logits[:, -1]`)
    from a compute layer's output as Slice + Squeeze, which compute the same values; returns how
    many. OpenVINO 2026.4's CPU plugin gave such a Gather after an int8 MatMul the wrong shape
    ([1, batch, vocab] for [batch, vocab]: a GPT-2 wrapper's last-token output, 128 samples
    compared against 4 batches), while the FP32 graph, the reference executor and the same
    graph with a float weight were right; Slice + Squeeze runs right on the int8 MatMul."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    producers = {output: node for node in graph.graph.node for output in node.output}
    nodes, rewritten = [], 0
    for node in graph.graph.node:
        index = constants.get(node.input[1]) if node.op_type == "Gather" and len(node.input) > 1 else None
        source = producers.get(node.input[0])
        if index is None or index.ndim != 0 or source is None or source.op_type not in COMPUTE_OPS:
            nodes.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        start = int(index)
        stem = f"{node.name or node.output[0]}/as_slice"
        graph.graph.initializer.extend([numpy_helper.from_array(np.array([value], np.int64), f"{stem}/{part}") for part, value in
                                        (("start", start), ("end", start + 1 if start != -1 else np.iinfo(np.int64).max), ("axis", axis))])
        nodes += [onnx.helper.make_node("Slice", [node.input[0], f"{stem}/start", f"{stem}/end", f"{stem}/axis"], [f"{stem}/sliced"], name=f"{stem}/slice"),
                  onnx.helper.make_node("Squeeze", [f"{stem}/sliced", f"{stem}/axis"], list(node.output), name=f"{stem}/squeeze")]
        rewritten += 1
    if rewritten:
        del graph.graph.node[:]
        graph.graph.node.extend(nodes)
    return rewritten
