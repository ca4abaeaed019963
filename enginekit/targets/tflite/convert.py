"""TFLite flatbuffers: float32 and float16 from TensorFlow's converter, full-integer int8 from
ai-edge-quantizer with OUR activation ranges.

Why ai-edge-quantizer for int8: the TFLite converter's own int8 path calibrates with its silent
min-max; ai-edge-quantizer (Google's maintained LiteRT quantizer, public API) takes a range per
tensor from the caller, quantizes weights symmetric per channel, biases int32 at input x weight
scale. So the flatbuffer carries exactly the ranges of the user's CalibrationTable (matched onto
TFLite tensors by value, see ranges.py).

Input and output stay float32 by default (IO_TYPES): a QUANTIZE op inside the flatbuffer scales
the input, a DEQUANTIZE the output, at C++ speed. With int8 I/O every caller quantizes in its own
code; in Python (numpy) that cost silero-vad's int8 run 14 us of 58 us, and its int8 artifact was
slower than FP32 (0.88x) where the float-I/O one is faster (1.14x, interleaved, same weights).
int8 or uint8 I/O remain for pipelines whose data is already integer (microcontrollers, uint8
camera frames).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from enginekit.core.errors import InputError, MissingDependencyError, one_line
from enginekit.core.quiet import quiet_stderr
from enginekit.core.tf_support import require_tensorflow

IO_TYPES = ("float32", "int8", "uint8")  # the first is the default
# Ops that move or select data: they may stay float-free by construction, so they are not
# counted as compute when listing what runs in float.
DATA_MOVEMENT_OPS = {"RESHAPE", "TRANSPOSE", "PAD", "PADV2", "SQUEEZE", "EXPAND_DIMS", "CONCATENATION", "GATHER",
                     "STRIDED_SLICE", "SLICE", "QUANTIZE", "DEQUANTIZE", "SHAPE", "PACK", "UNPACK", "DELEGATE"}


def convert_function(function, origin: str, precision: str = "fp32", owner: Any = None) -> bytes:
    """A float32 (or float16-weight) flatbuffer of a tf.function with an input signature. Only
    TFLite builtin ops are allowed: an op without a builtin kernel is named in the error.

    `owner` is the model whose variables the function reads (Keras): the function is then saved
    as a SavedModel signature beside those variables and converted from there, the converter
    path that freezes weights into constants (from a concrete function they would stay TFLite
    resource variables, uninitialised at run time)."""
    from enginekit.core.artifacts import scratch_dir

    tf = require_tensorflow()
    holder = tf.Module()
    holder.function = function  # a trackable owner gives the flatbuffer a serving_default signature
    with scratch_dir("savedmodel") as folder:
        if owner is not None:
            _save_with_owner(owner, holder, function, folder)
            converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        else:
            converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], holder)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if precision == "fp16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif precision != "fp32":
            raise ValueError(f"convert_function makes float flatbuffers, not {precision}")
        try:
            with quiet_stderr():
                converted = bytes(converter.convert())
        except Exception as exc:  # ConverterError and friends; their text names the failing TF ops
            raise InputError(f"the TFLite converter failed: {_converter_problem(str(exc))}", origin) from None
    return slices_to_the_end(converted)


SLICE_OPCODE = 65  # BuiltinOperator.SLICE
_TO_THE_END = 1 << 30  # a SLICE size this large can only mean "to the end" (no tensor dim is that long)


def slices_to_the_end(model: bytes) -> bytes:
    """SLICE sizes written as INT_MAX - begin (the converter's form of a strided slice to the end,
    e.g. Keras' Cropping2D in NASNetMobile) become -1, TFLite's own "to the end": XNNPACK clamps
    them, but LiteRT's builtin kernel refuses them ("Invalid begin and size"), so the int8 range
    matching, which runs without delegates, and any SLICE left outside XNNPACK failed. Each fixed
    size gets a tensor and buffer of its own (constants may be shared); other models are
    returned unchanged (found by reading the flatbuffer in place: unpacking copies every weight)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    found = _huge_slice_sizes(model)
    if not found:
        return model
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    for graph_index, op_index, values in found:
        graph = tree.subgraphs[graph_index]
        op = graph.operators[op_index]
        size = graph.tensors[op.inputs[2]]
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(np.where(values >= _TO_THE_END, -1, values).astype(values.dtype).tobytes(), np.uint8)
        tree.buffers.append(buffer)
        tensor = schema.TensorT()
        tensor.shape, tensor.type, tensor.buffer = size.shape, size.type, len(tree.buffers) - 1
        name = size.name.decode() if isinstance(size.name, bytes) else str(size.name)
        tensor.name = f"{name}/to_the_end_{len(graph.tensors)}"  # names must be unique (ai-edge-quantizer keys by them)
        graph.tensors.append(tensor)
        op.inputs[2] = len(graph.tensors) - 1
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def signatures_on_graph_outputs(model: bytes) -> bytes:
    """Point each signature output at the subgraph output that carries it. Where an output tensor
    is also read by another op (a classifier's probabilities and the ArgMax label taken from
    them), ai-edge-quantizer dequantizes it into a new graph output but leaves the signature on
    the int8 tensor, whose arena memory later ops reuse: read through the signature (our runner,
    anyone's `get_signature_runner()`) the probabilities were garbage (all near 0.5 for a
    scikit-learn MLP). The op writing the graph output from that tensor names the right one.
    Other models are returned unchanged (checked in place: unpacking copies every weight)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    root = schema.Model.GetRootAsModel(model, 0)
    stale = []
    for index in range(root.SignatureDefsLength()):
        signature = root.SignatureDefs(index)
        graph = root.Subgraphs(signature.SubgraphIndex())
        outputs = set(graph.OutputsAsNumpy().tolist()) if graph.OutputsLength() else set()
        stale += [(index, o) for o in range(signature.OutputsLength()) if signature.Outputs(o).TensorIndex() not in outputs]
    if not stale:
        return model
    tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    for index, position in stale:
        signature = tree.signatureDefs[index]
        graph = tree.subgraphs[signature.subgraphIndex]
        entry = signature.outputs[position]
        carriers = [op.outputs[0] for op in graph.operators
                    if len(op.inputs) == 1 and op.inputs[0] == entry.tensorIndex and len(op.outputs) == 1 and op.outputs[0] in list(graph.outputs)]
        if len(carriers) == 1:
            entry.tensorIndex = carriers[0]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(tree))


def _huge_slice_sizes(model: bytes) -> list[tuple[int, int, np.ndarray]]:
    """(subgraph, operator, size values) of every SLICE whose constant size holds a value of at least _TO_THE_END."""
    from tensorflow.lite.python import schema_py_generated as schema

    root = schema.Model.GetRootAsModel(model, 0)
    codes = [max(root.OperatorCodes(i).BuiltinCode(), root.OperatorCodes(i).DeprecatedBuiltinCode()) for i in range(root.OperatorCodesLength())]
    widths = {schema.TensorType.INT32: np.int32, schema.TensorType.INT64: np.int64}
    found = []
    for graph_index in range(root.SubgraphsLength()):
        graph = root.Subgraphs(graph_index)
        for op_index in range(graph.OperatorsLength()):
            op = graph.Operators(op_index)
            if codes[op.OpcodeIndex()] != SLICE_OPCODE or op.InputsLength() < 3:
                continue
            size = graph.Tensors(op.Inputs(2))
            data = root.Buffers(size.Buffer()).DataAsNumpy() if size.Buffer() < root.BuffersLength() else 0
            if size.Type() in widths and isinstance(data, np.ndarray):
                values = np.frombuffer(data.tobytes(), widths[size.Type()])
                if (values >= _TO_THE_END).any():
                    found.append((graph_index, op_index, values))
    return found


def _save_with_owner(owner: Any, holder: Any, function, folder: str) -> None:
    """SavedModel with `function` as serving_default and the owner's variables. A Keras 3 model
    is not a TF trackable, so Keras' own ExportArchive tracks it (what model.export() uses)."""
    tf = require_tensorflow()
    if type(owner).__module__.split(".")[0] == "keras" or hasattr(owner, "_keras_api_names"):
        import keras

        archive = keras.export.ExportArchive()
        archive.track(owner)
        archive.add_endpoint("serving_default", function)
        archive.write_out(folder, verbose=False)
        return
    holder.owner = owner  # a loaded SavedModel: already trackable
    tf.saved_model.save(holder, folder, signatures={"serving_default": function.get_concrete_function()})


def _converter_problem(text: str) -> str:
    ops = sorted(set(re.findall(r"'(tf\.[A-Za-z0-9_]+)' op", text)))
    if ops:
        return f"no TFLite builtin for op{'s' if len(ops) > 1 else ''} {', '.join(ops)}"
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower()]
    return " ".join((lines[0] if lines else text).split())[:300]


def quantize_int8(float_model: bytes, ranges: dict[str, tuple[float, float]], io_type: str = IO_TYPES[0],
                  float_ops: Sequence[str] = (), output_bits: int = 8) -> bytes:
    """Full-integer int8 flatbuffer: every activation takes the given (low, high); the ops that
    write `float_ops` (tensor names) stay float, between a DEQUANTIZE and a QUANTIZE.
    `output_bits` 16: the ops that compute the graph's outputs (`output_ops`) run with int16
    activations and int8 weights (LiteRT's 16x8 kernels) and the outputs are int16 (why: see
    OUTPUT_BITS in the target)."""
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise MissingDependencyError("int8 .tflite needs ai-edge-quantizer (pip install 'enginekit[tflite]')") from None
    check_io(io_type, output_bits)
    from enginekit.targets.tflite.bias_fit import bias_safe_weight_ranges

    qsv = {name: {"min": np.array(low, np.float32), "max": np.array(high, np.float32)} for name, (low, high) in ranges.items()}
    wide_ops = output_ops(float_model) if output_bits == 16 else []
    qsv.update(bias_safe_weight_ranges(float_model, ranges, skip={*float_ops, *wide_ops}))
    import contextlib
    import io
    import warnings

    try:
        with warnings.catch_warnings():  # it opens interpreters with preserve_all_tensors, which warns
            warnings.simplefilter("ignore")
            engine = quantizer.Quantizer(float_model, recipe.static_wi8_ai8())
            from ai_edge_quantizer import qtyping
            from ai_edge_quantizer.algorithm_manager import AlgorithmName

            if io_type in ("uint8", "float32"):  # float I/O first (QUANTIZE in, DEQUANTIZE out), which TF's io rewriter turns uint8
                # int16 outputs stay int16: with a float output, the quantizer left the op computing it float
                for operation in (qtyping.TFLOperationName.INPUT, *([qtyping.TFLOperationName.OUTPUT] if output_bits == 8 else [])):
                    engine.update_quantization_recipe(regex=".*", operation_name=operation, algorithm_key=AlgorithmName.NO_QUANTIZE)
            if output_bits == 16:
                wide = _int16_activations(qtyping)
                for tensor in wide_ops:  # the graph output among them is int16 too (OUTPUT)
                    for operation in (qtyping.TFLOperationName.ALL_SUPPORTED, qtyping.TFLOperationName.OUTPUT):
                        engine.update_quantization_recipe(regex=_scope(tensor), operation_name=operation, op_config=wide)
            for regex in _scopes(float_ops):
                engine.update_quantization_recipe(regex=regex, operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                                                  algorithm_key=AlgorithmName.NO_QUANTIZE)
            with contextlib.redirect_stderr(io.StringIO()), quiet_stderr():  # its tqdm bar ignores enable_progress_report; LiteRT's INFO lines
                result = engine.quantize(qsv, enable_progress_report=False)
    except ValueError as exc:
        raise InputError(f"ai-edge-quantizer refused the ranges: {one_line(exc, 300)}") from None
    model = signatures_on_graph_outputs(bytes(result.quantized_model))
    if io_type == "uint8":
        model = _uint8_io(model)
    return model


def check_io(io_type: str, output_bits: int) -> None:
    """Raise an InputError for an I/O type or output width this module cannot build."""
    if io_type not in IO_TYPES:
        raise InputError(f"tflite input/output type '{io_type}' is not one of {', '.join(IO_TYPES)}", option="tflite_io")
    if output_bits not in (8, 16):
        raise InputError(f"tflite output_bits must be 8 or 16, not {output_bits!r}", option="tflite_output_bits")
    if output_bits == 16 and io_type == "uint8":
        raise InputError("tflite int16 outputs (output_bits 16) need io 'float32' or 'int8': uint8 I/O requantizes the outputs to 8 bits",
                         option="tflite_io")


def _scope(tensor: str) -> str:
    """The recipe regex of the op writing `tensor`: an op's scope is its output tensor names, each followed by ";"."""
    return f"(^|;){re.escape(tensor)};"


SCOPES_PER_RECIPE_ENTRY = 256


def _scopes(tensors: Sequence[str]) -> list[str]:
    """The recipe regexes of the ops writing `tensors`, many per entry. The quantizer matches every
    op against every entry: one entry per tensor made an unrolled 200-step LSTM (thousands of
    float ops) take 18 minutes to quantize."""
    names = list(dict.fromkeys(tensors))
    return [f"(^|;)(?:{'|'.join(re.escape(t) for t in names[i:i + SCOPES_PER_RECIPE_ENTRY])});"
            for i in range(0, len(names), SCOPES_PER_RECIPE_ENTRY)]


def _int16_activations(qtyping: Any) -> Any:
    """ai-edge-quantizer's 16x8 op config: int16 activations (symmetric, as LiteRT's kernels
    require), int8 weights per channel, integer compute."""
    return qtyping.OpQuantizationConfig(
        activation_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, symmetric=True),
        weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=8, symmetric=True, granularity=qtyping.QuantGranularity.CHANNELWISE),
        compute_precision=qtyping.ComputePrecision.INTEGER, explicit_dequantize=False)


LAYOUT_OPS = {"RESHAPE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS"}  # what the lowering puts between an op and a graph output


COMPUTE_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "TRANSPOSE_CONV"}


def output_ops(model: bytes) -> list[str]:
    """The output tensor names of the ops that compute the graph's outputs: from each output back
    through layout ops (the lowering's NHWC -> NCHW transpose, a reshape) to the op that computed
    it, that op included, where that op is a compute layer (COMPUTE_OPS: LiteRT's 16x8 kernels
    for them are the established ones; a BERT encoder whose output is a LayerNorm's ADD fell from
    cosine 0.9994 to 0.9403 with that ADD in int16)."""
    from enginekit.targets.tflite.runner import undelegated_interpreter

    interpreter = undelegated_interpreter(model)
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    producer = {index: op for op in interpreter._get_ops_details() for index in op["outputs"]}
    found: list[str] = []
    for detail in interpreter.get_output_details():
        index, chain = detail["index"], []
        while index in producer and producer[index]["op_name"] in LAYOUT_OPS:
            chain.append(names[index])
            index = producer[index]["inputs"][0]
        if index in producer and producer[index]["op_name"] in COMPUTE_OPS:
            found += [name for name in (*chain, names[index]) if name not in found]
    return found


def _uint8_io(model: bytes) -> bytes:
    """uint8 input and output: TF's rewriter makes the float-I/O model's first QUANTIZE read uint8
    and its last DEQUANTIZE a uint8 QUANTIZE (each re-centres the zero point by 128)."""
    tf = require_tensorflow()
    from tensorflow.lite.python import util

    return bytes(util.modify_model_io_type(model, inference_input_type=tf.uint8, inference_output_type=tf.uint8))


def op_types(model: bytes) -> list[dict[str, Any]]:
    """Each operator of the flatbuffer (as written, no delegate) with its input/output tensor types."""
    from enginekit.targets.tflite.runner import undelegated_interpreter

    interpreter = undelegated_interpreter(model)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}

    def kind(index: int) -> str:
        return np.dtype(tensors[index]["dtype"]).name if index in tensors else "none"

    return [{"op": op["op_name"], "inputs": [kind(i) for i in op["inputs"] if i >= 0], "outputs": [kind(i) for i in op["outputs"]]}
            for op in interpreter._get_ops_details()]


def outside_xnnpack(model: bytes, threads: int = 1) -> dict[str, int]:
    """Op types LiteRT runs outside its XNNPACK delegate, by count (each one splits the graph:
    the delegate stops, a builtin kernel runs, the delegate starts again; an int8 HARD_SWISH or
    a standalone int8 RELU is such an op). Dynamic dimensions are taken as 1."""
    from collections import Counter

    return dict(Counter(outside_xnnpack_outputs(model, threads).values()).most_common())


def outside_xnnpack_outputs(model: bytes, threads: int = 1) -> dict[str, str]:
    """The ops LiteRT runs outside its XNNPACK delegate: their first output tensor's name -> op type."""
    from enginekit.targets.tflite.runner import allocate, require_litert

    with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
        interpreter = require_litert().Interpreter(model_content=model, num_threads=threads)
    for detail in interpreter.get_input_details():
        shape = [max(int(d), 1) for d in detail["shape_signature"]]
        interpreter.resize_tensor_input(detail["index"], shape, strict=False)
    allocate(interpreter)
    ops = interpreter._get_ops_details()
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    producer = {t: op for op in ops if op["op_name"] != "DELEGATE" for t in op["outputs"]}
    inside: set[int] = set()
    for delegate in (op for op in ops if op["op_name"] == "DELEGATE"):
        boundary, pending = set(delegate["inputs"]), list(delegate["outputs"])
        while pending:  # walk back from the partition's outputs to its inputs
            op = producer.get(pending.pop())
            if op is None or op["index"] in inside:
                continue
            inside.add(op["index"])
            pending += [t for t in op["inputs"] if t >= 0 and t not in boundary]
    return {names.get(op["outputs"][0], str(op["outputs"][0])): op["op_name"] for op in ops
            if op["op_name"] != "DELEGATE" and op["index"] not in inside and len(op["outputs"])}


def float_compute_ops(ops: list[dict[str, Any]]) -> list[str]:
    """Ops that compute in float32 (any float32 input or output), data movement aside."""
    return [op["op"] for op in ops if op["op"] not in DATA_MOVEMENT_OPS and "float32" in op["inputs"] + op["outputs"]]


def type_summary(model: bytes) -> dict[str, Any]:
    """For the manifest: op counts, tensor dtype counts, and the float32 compute ops left."""
    from collections import Counter

    ops = op_types(model)
    dtypes = Counter(t for op in ops for t in op["inputs"] + op["outputs"])
    floating = float_compute_ops(ops)
    compute = sum(1 for op in ops if op["op"] not in DATA_MOVEMENT_OPS)
    return {"ops": dict(sorted(Counter(op["op"] for op in ops).items())), "tensor_types": dict(sorted(dtypes.items())),
            "float32_compute_ops": floating, "integer_share": 1 - len(floating) / compute if compute else 0.0,
            "outside_xnnpack": outside_xnnpack(model)}
