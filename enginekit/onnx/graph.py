"""Graph-level chores on ONNX models: checking, shape inference, simplification, naming, I/O specs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx

from enginekit.core.errors import InputError, one_line
from enginekit.core.quiet import quiet_loggers
from enginekit.core.tensors import TensorSpec
from enginekit.onnx.einsum import einsum_as_matmul
from enginekit.onnx.folding import fold_affine_into_convolutions
from enginekit.onnx.nodes import attribute, graph_reads, subgraphs

DEFAULT_OPSET = 20  # newest opset that TensorRT 10.0's parser, OpenVINO and ONNX Runtime all read


def check(model: onnx.ModelProto, origin: str) -> None:
    """onnx.checker with full_check (which includes strict shape inference), after refusing an
    opset newer than the installed ONNX knows (the runtimes could not promise to run it)."""
    newest = onnx.defs.onnx_opset_version()
    if not graph_inputs(model):
        raise InputError("the graph has no inputs", origin)
    looped = sorted({o.name for o in model.graph.output} & {i.name for i in model.graph.input})
    if looped:
        raise InputError(f"graph output(s) {looped} are graph inputs themselves", origin)
    if opset_of(model) > newest:
        raise InputError(f"uses opset {opset_of(model)}, newer than this ONNX release supports ({newest}); export it with opset <= {newest}", origin)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InputError(f"fails the ONNX checker: {one_line(exc, 300)}", origin) from None


def infer_shapes(model: onnx.ModelProto, origin: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, RuntimeError) as exc:
        raise InputError(f"shape inference failed: {one_line(exc, 300)}", origin) from None


REWRITE_NODE_LIMIT = 4096  # onnxscript's pattern rewriter is quadratic in the node count (3 s at 4k nodes)


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxscript's optimizer: constant folding, dead-code removal, common subexpressions, and its
    pattern rewrites. Every pass is linear in the node count except the pattern rewriter, which
    runs on graphs up to REWRITE_NODE_LIMIT nodes only (a 100k-node graph exported in hours with
    it). Without onnxscript (a core install handed an ONNX file), the graph is kept as it is."""
    try:
        from onnxscript import optimizer
    except ImportError:
        return model
    with quiet_loggers():
        if sum(1 for _ in model.graph.node) <= REWRITE_NODE_LIMIT:
            return optimizer.optimize(model)
        return _linear_passes(model)


def count_branches(graph: onnx.GraphProto) -> int:
    """If nodes in `graph` and, recursively, in the bodies of its If/Loop/Scan nodes (only an If
    folds when its condition becomes known)."""
    return sum((node.op_type == "If") + sum(count_branches(body) for body in subgraphs(node)) for node in graph.node)


def _fuse_hard_swish(model: onnx.ModelProto) -> onnx.ModelProto:
    """x * clip(x + 3, 0, 6) / 6 (four float ops, as PaddlePaddle and older exporters write it)
    -> one HardSwish (opset 14): one float island between integer kernels instead of four, and
    one fused kernel in OpenVINO and TFLite. After ONNX Runtime's folding, which would expand it
    again (it inlines HardSwish as HardSigmoid x Mul)."""
    if opset_of(model) < 14 or sum(1 for _ in model.graph.node) > REWRITE_NODE_LIMIT:
        return model
    try:
        from onnxscript import rewriter
    except ImportError:
        return model
    from onnxscript.rewriter.rules.common import fuse_hardswish_rules

    return rewriter.rewrite(model, pattern_rewrite_rules=fuse_hardswish_rules())


def _fuse_hard_swish_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """x * (clip(x + 3, 0, 6) * 1/6) and (x * clip(x + 3, 0, 6)) * 1/6 -> HardSwish(x), in place:
    the associations onnxscript's rule does not match (tf2onnx writes Keras' hard_swish as the
    first). Intermediates read elsewhere are left alone."""
    if opset_of(model) < 14:
        return model
    graph = model.graph
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if _size(t) == 1}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    for output in graph.output:
        readers[output.name] = readers.get(output.name, 0) + 2

    def scalar(name: str, value: float) -> bool:
        return name in constants and bool(np.isclose(float(constants[name].reshape(())), value, rtol=1e-5))

    def private(name: str) -> onnx.NodeProto | None:
        return producer.get(name) if readers.get(name) == 1 else None

    def relu6_of_x_plus_3(name: str) -> tuple[str, list[onnx.NodeProto]] | None:
        clip = private(name)
        if clip is None or clip.op_type != "Clip" or len(clip.input) != 3 or not (scalar(clip.input[1], 0.0) and scalar(clip.input[2], 6.0)):
            return None
        add = private(clip.input[0])
        if add is None or add.op_type != "Add":
            return None
        x = next((a for a, b in (add.input, add.input[::-1]) if scalar(b, 3.0)), None)
        return (x, [add, clip]) if x is not None else None

    def over_six(node: onnx.NodeProto) -> str | None:
        """The other input of a multiply by 1/6 or a divide by 6."""
        if node.op_type == "Mul":
            return next((a for a, b in (node.input, node.input[::-1]) if scalar(b, 1 / 6)), None)
        return node.input[0] if node.op_type == "Div" and scalar(node.input[1], 6.0) else None

    fused: dict[int, onnx.NodeProto] = {}  # id of the last node -> HardSwish
    dropped: set[int] = set()
    for node in graph.node:
        match = None
        if node.op_type == "Mul":  # x * (relu6(x + 3) / 6)
            for x, gate in (node.input, node.input[::-1]):
                scaled = private(gate)
                inner = over_six(scaled) if scaled is not None else None
                found = relu6_of_x_plus_3(inner) if inner is not None else None
                if found and found[0] == x:
                    match = (x, [*found[1], scaled])
                    break
        inner = over_six(node) if match is None else None  # (x * relu6(x + 3)) / 6
        if inner is not None:
            product = private(inner)
            if product is not None and product.op_type == "Mul":
                for x, gate in (product.input, product.input[::-1]):
                    found = relu6_of_x_plus_3(gate)
                    if found and found[0] == x:
                        match = (x, [*found[1], product])
                        break
        if match and id(node) not in dropped and not any(id(n) in dropped for n in match[1]):
            dropped.update(id(n) for n in match[1])
            fused[id(node)] = onnx.helper.make_node("HardSwish", [match[0]], list(node.output), name=f"{node.name}_hardswish")
    if not fused:
        return model
    nodes = [fused.get(id(node), node) for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _size(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if tensor.dims else 1


def _linear_passes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The optimizer without its pattern rewriter, for graphs too large for it."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    from onnxscript.optimizer import _constant_folding

    ir_model = ir.serde.deserialize_model(model)
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                                   output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                               common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
                              steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(ir_model)
    return ir.serde.serialize_model(ir_model)


FOLD_BYTE_LIMIT = 1 << 30  # larger graphs are kept as they are (the folded copy would be written whole)
STANDARD_DOMAINS = ("", "ai.onnx")


def fold_into_compute(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's basic graph optimizations, saved as plain ONNX: BatchNormalization and
    constant Mul/Add folded into the Conv before them, Transpose pairs cancelled, constant
    subgraphs and no-ops removed. Quantization needs this: a Conv followed by an unfolded
    BatchNormalization cannot be an integer kernel on any target (the Q/DQ weight sits before the
    BN), and a Transpose between Conv and Q blocks the fusion. The result is kept only if every
    node is still a standard ONNX op; the parity check covers the folded graph like any export."""
    if model.ByteSize() > FOLD_BYTE_LIMIT:
        return model
    from enginekit.onnx.session import optimized_graph

    try:
        folded = optimized_graph(model, basic_only=True)
    except Exception:  # a graph ONNX Runtime cannot load: the checker and parity check say why
        return model
    own_domains = {node.domain for node in model.graph.node}
    if any(node.domain not in STANDARD_DOMAINS and node.domain not in own_domains for node in folded.graph.node):
        return model
    del folded.opset_import[:]  # ONNX Runtime lists every domain it knows; keep the model's own
    folded.opset_import.extend(model.opset_import)
    del folded.graph.value_info[:]  # inferred again with the model's own dims
    return folded


def finalize(model: onnx.ModelProto, origin: str) -> onnx.ModelProto:
    """Simplify, fold into compute ops, infer shapes and run the full checker: every exported
    graph goes through this."""
    model = _prepared(model, origin)
    branches = count_branches(model.graph)
    if branches:  # a second pass, with the shapes the first inferred, folds what they decide
        again = _prepared(model, origin)
        if count_branches(again.graph) < branches:
            model = again
    model = _scalar_if_conditions(model)
    check(model, origin)
    return model


def _prepared(model: onnx.ModelProto, origin: str) -> onnx.ModelProto:
    """Simplified, folded into compute ops, shapes inferred. An If inlined by the optimizer can
    hold another whose condition reads a shape only inference after it knows (silero-vad 5:
    `if x.shape[-1] == 1: squeeze` inside the branch on the input's rank), so `finalize` runs
    this twice where If nodes are left: TFLite and quantization then see plain ops."""
    model = simplify(model)
    einsum_as_matmul(model)
    model = _fuse_hard_swish_products(_fuse_hard_swish(fold_affine_into_convolutions(fold_into_compute(model))))
    return _whole_input_average_pools_as_global(_spatial_means_as_global_pools(infer_shapes(model, origin)))


def _scalar_if_conditions(model: onnx.ModelProto) -> onnx.ModelProto:
    """An If whose condition has one element in a tensor of rank 2 or more (openwakeword's
    hey_jarvis compares a [1, 1] score) reads it reshaped to a scalar, in place: ONNX takes any
    single-element condition, but OpenVINO refuses one of rank above 1 ("Rank of If condition
    input must be equal to 0 or 1")."""
    dims = value_dims(model)
    nodes = []
    for node in model.graph.node:
        shape = dims.get(node.input[0]) if node.op_type == "If" and node.domain in ("", "ai.onnx") else None
        if shape is not None and len(shape) > 1 and all(d == 1 for d in shape):
            scalar = f"{node.input[0]}__scalar"
            if not any(t.name == "enginekit_scalar_shape" for t in model.graph.initializer):
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(0, np.int64), "enginekit_scalar_shape"))
            nodes.append(onnx.helper.make_node("Reshape", [node.input[0], "enginekit_scalar_shape"], [scalar], name=f"{node.name}_scalar_condition"))
            node.input[0] = scalar
        nodes.append(node)
    if len(nodes) > len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def _spatial_means_as_global_pools(model: onnx.ModelProto) -> onnx.ModelProto:
    """ReduceMean over both spatial axes of an NCHW tensor, keeping dims (PyTorch's
    x.mean((2, 3), keepdim=True)) -> GlobalAveragePool, in place: the same values, and the op
    ONNX Runtime runs on integers (QLinearGlobalAveragePool, channels-last) where it runs a
    ReduceMean in float behind a DequantizeLinear and a Transpose back to channels-first."""
    ranks = {name: len(dims) for name, dims in value_dims(model).items()}
    initializers = {t.name: t for t in model.graph.initializer}
    replaced = 0
    for index, node in enumerate(model.graph.node):
        rank = ranks.get(node.input[0], 0) if node.op_type == "ReduceMean" and node.input else 0
        if rank != 4 or attribute(node, "keepdims", 1) != 1:  # images only: [N, tokens, C] means are LayerNorms
            continue
        if len(node.input) > 1 and node.input[1]:  # opset 18: axes as an input
            axes = initializers.get(node.input[1])
            axes = None if axes is None else [int(a) for a in onnx.numpy_helper.to_array(axes).ravel()]
        else:
            axes = attribute(node, "axes", None)
        if axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
            continue
        model.graph.node[index].CopyFrom(onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
        replaced += 1
    if replaced:
        drop_unused_initializers(model)  # opset 18's axes constants
    return model


def _whole_input_average_pools_as_global(model: onnx.ModelProto) -> onnx.ModelProto:
    """An AveragePool whose one window covers its whole (static) input -> GlobalAveragePool, in
    place: the same values. transformers' EfficientNet pools its last map with AveragePool(kernel
    = the configured hidden size, ceil_mode=1); ONNX Runtime runs it, but OpenVINO refuses a
    kernel larger than the map ("larger than the data shape after padding") and TFLite has no
    ceil mode. Only where the window cannot reach a pad the average would count."""
    shapes = value_dims(model)
    for index, node in enumerate(model.graph.node):
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            continue
        dims, out = shapes.get(node.input[0], ()), shapes.get(node.output[0], ())
        spatial, kernel = dims[2:], list(attribute(node, "kernel_shape", []))
        pads = list(attribute(node, "pads", [0] * 2 * len(kernel))) or [0] * 2 * len(kernel)
        if (len(dims) < 3 or len(kernel) != len(spatial) or None in spatial or out[2:] != (1,) * len(spatial)
                or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID")
                or any(d != 1 for d in attribute(node, "dilations", [1] * len(kernel)))
                or (any(pads) and attribute(node, "count_include_pad", 0))
                or any(k < size + begin for k, size, begin in zip(kernel, spatial, pads))):
            continue
        model.graph.node[index].CopyFrom(onnx.helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
    return model


def value_dims(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Each tensor's dims as the graph records them (inputs, value_info, outputs; None where a
    dim is symbolic or unknown)."""
    return {v.name: tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
            for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node (nor graph output) reads, and shape info of values no node
    produces any more (what a rewrite that replaced nodes leaves behind)."""
    used = graph_reads(model.graph) | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    produced = {o for node in model.graph.node for o in node.output} | {i.name for i in model.graph.input}
    info = [v for v in model.graph.value_info if v.name in produced | used]
    del model.graph.value_info[:]
    model.graph.value_info.extend(info)


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(model: onnx.ModelProto, opset: int, origin: str) -> onnx.ModelProto:
    """`model` at `opset` (ONNX's version converter, then a full check). A file whose declared
    output shapes contradict what its graph computes (ddddocr's CRNN declares [1, seqlen] and
    returns [seqlen, 1, classes]; the newer opset's shape inference sees it) is converted with
    the inferred shapes instead (the export then keeps the ranks a run computes)."""
    if opset_of(model) == opset:
        return model
    try:
        return _converted(model, opset)
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        failure = exc
    if "existing shape" in str(failure) and any(o.type.tensor_type.HasField("shape") for o in model.graph.output):
        relaxed = onnx.ModelProto()
        relaxed.CopyFrom(model)
        for output in relaxed.graph.output:
            output.type.tensor_type.ClearField("shape")
        try:
            return _converted(relaxed, opset, infer_outputs=True)
        except Exception:
            pass
    raise InputError(f"cannot convert from opset {opset_of(model)} to {opset}: {one_line(failure, 300)}", origin) from None


def _converted(model: onnx.ModelProto, opset: int, infer_outputs: bool = False) -> onnx.ModelProto:
    """`infer_outputs`: outputs declared without a shape get the inferred one (the checker needs one)."""
    converted = onnx.version_converter.convert_version(model, opset)
    if infer_outputs:
        converted = onnx.shape_inference.infer_shapes(converted)
    onnx.checker.check_model(converted, full_check=True)
    return converted


def rename_values(model: onnx.ModelProto, mapping: Mapping[str, str]) -> None:
    """Rename values (graph inputs/outputs included) in place; a value already holding a target
    name is renamed out of the way first, so names stay unique."""
    mapping = {old: new for old, new in mapping.items() if old != new}
    if not mapping:
        return
    taken = _value_names(model.graph)
    for new in mapping.values():
        if new in taken and new not in mapping:
            suffix = 1
            while f"{new}_{suffix}" in taken:
                suffix += 1
            _rename(model.graph, {new: f"{new}_{suffix}"})
            taken.add(f"{new}_{suffix}")
    _rename(model.graph, mapping)


def _value_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in [*graph.input, *graph.output, *graph.value_info]} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _rename(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def set_symbolic_dims(model: onnx.ModelProto, specs: Mapping[str, TensorSpec]) -> None:
    """Give graph inputs/outputs the dims of their specs: the names ("batch" instead of an
    exporter's s0 or p2o.DynamicDimension.0) and the sizes the user declared. A dim left unnamed
    ("?") stays unknown."""
    for value in [*model.graph.input, *model.graph.output]:
        spec = specs.get(value.name)
        if spec is None:
            continue
        shape = value.type.tensor_type.shape
        if len(shape.dim) != len(spec.shape):  # a declared rank (a factory, or a fixed unknown rank)
            del shape.dim[:]
            shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in spec.shape)
        for dim, wanted in zip(shape.dim, spec.shape):
            if wanted == "?":
                dim.ClearField("dim_param")
                dim.ClearField("dim_value")
            elif isinstance(wanted, str):
                dim.dim_param = wanted
            else:
                dim.dim_value = wanted


def tensor_specs(values: Any, origin: str | None = None) -> list[TensorSpec]:
    """TensorSpecs of ONNX ValueInfos (graph inputs or outputs); unknown dims become '?'."""
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputError(f"'{value.name}' is not a tensor (sequences, maps and optionals are not supported as model inputs or outputs)", origin)
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        except (KeyError, TypeError, ValueError):
            raise InputError(f"'{value.name}' has an undefined or unsupported element type ({tensor_type.elem_type})", origin) from None
        shape = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else "?") for d in tensor_type.shape.dim)
        specs.append(TensorSpec(value.name, shape, dtype))
    return specs


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not initializers (older exporters list weights as inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def make_batch_dynamic(model: onnx.ModelProto, name: str = "batch") -> bool:
    """Turn a fixed leading dim shared by every input and output into a symbol; False if not uniform."""
    values = [*graph_inputs(model), *model.graph.output]
    leading = {v.type.tensor_type.shape.dim[0].dim_value if v.type.tensor_type.shape.dim else None for v in values}
    if len(leading) != 1 or None in leading or 0 in leading:
        return False
    for value in values:
        value.type.tensor_type.shape.dim[0].dim_param = name
    del model.graph.value_info[:]
    return True


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder graph nodes so every input is produced before it is read (some converters append
    nodes, such as input Casts, at the end; ONNX requires topological order)."""
    graph = model.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progress = [n for n in pending if all(i in available for i in n.input)]
        if not progress:
            raise ValueError(f"graph has a cycle or a dangling input near node {pending[0].name!r}")
        for node in progress:
            ordered.append(node)
            available.update(node.output)
        chosen = {id(n) for n in progress}
        pending = [n for n in pending if id(n) not in chosen]
    del graph.node[:]
    graph.node.extend(ordered)
