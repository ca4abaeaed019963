"""FP32 ONNX + CalibrationTable -> the Q/DQ graph of one encoding, bias-corrected on the
calibration data: the hub every INT8 target is built from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from enginekit.calibration.table import CalibrationTable
from enginekit.core.errors import InputError
from enginekit.core.profile import stage
from enginekit.core.tensors import Feeds
from enginekit.exporter.reference import Fp32Model
from enginekit.quantization.compensation import compensated_weights
from enginekit.quantization.bias_correction import correct_biases, keep_if_closer, layer_biases, set_biases
from enginekit.quantization.placement import QuantPlan, plan_quantization
from enginekit.quantization.qdq import QdqGraph, biased_nodes, insert_qdq, integerize_biases
from enginekit.quantization.rounding import rounded_weights
from enginekit.quantization.encoding import activation_qparams, weight_type
from enginekit.onnx.smoothing import DEFAULT_ALPHA


# nearest | gptq: each layer's output error minimised on the calibration data (rounding.py) |
# gptaq: the same, also for the error the layer's quantized inputs carry (compensation.py)
WEIGHT_ROUNDINGS = ("nearest", "gptq", "gptaq")
CHECK_BATCHES = 2  # calibration batches (of 32) a bias correction is checked on before it is kept

@dataclass(frozen=True)
class QuantizeSettings:
    """How the Q/DQ graph is made (the encoding comes from the target unless overridden)."""

    encoding: str | None = None  # None: the target's own
    bias_correction: bool = True
    per_channel: bool = True
    exclude_nodes: Sequence[str] = ()
    exclude_ops: Sequence[str] = ()
    exclude_after: Sequence[str] | None = None  # None: the zoo spec's keep_float_after
    keep_first_last_float: bool = False
    layer_report: bool = False  # write layers.json (range, clipped share, SQNR per tensor) into INT8 artifacts
    weight_type: str = "auto"  # int8 | uint8 (same grid, zero point 128) | auto: uint8 where this CPU's u8 x s8 kernels saturate
    smoothquant: float = DEFAULT_ALPHA  # SmoothQuant's alpha for token MatMuls (onnx/smoothing.py); 0: off
    weight_rounding: str = "gptq"  # one of WEIGHT_ROUNDINGS
    equalize: bool = False  # cross-layer equalisation of consecutive convolutions before calibrating (onnx/equalization.py)

    def keeping_float(self, nodes: Sequence[str]) -> "QuantizeSettings":
        """These settings with `nodes` also kept float (after the nodes already excluded)."""
        return replace(self, exclude_nodes=(*self.exclude_nodes, *nodes))

    def key(self) -> dict[str, Any]:
        """What changes the graph (for build keys and caches)."""
        return {"bias_correction": self.bias_correction, "per_channel": self.per_channel,
                "exclude_nodes": list(self.exclude_nodes), "exclude_ops": list(self.exclude_ops),
                "exclude_after": None if self.exclude_after is None else list(self.exclude_after),
                "keep_first_last_float": self.keep_first_last_float, "weight_type": self.weight_type,
                "smoothquant": self.smoothquant, "weight_rounding": self.weight_rounding,
                **({"equalize": True} if self.equalize else {})}


def plan_for(fp32: Fp32Model, settings: QuantizeSettings, placement: str = "inputs") -> tuple[QuantPlan, list[str]]:
    """Where Q/DQ pairs go under `settings` and the target's `placement`, and the op types after
    which compute stays float."""
    after = settings.exclude_after
    if after is None:
        after = fp32.spec.keep_float_after if fp32.spec else ()
    plan = plan_quantization(fp32.proto, settings.exclude_nodes, settings.exclude_ops, settings.keep_first_last_float, after, placement)
    if not plan.nodes:
        raise InputError("nothing is left to quantize after the exclusions", fp32.origin)
    return plan, list(after)


def excluded_nodes(fp32: Fp32Model, settings: QuantizeSettings, placement: str = "inputs") -> list[str]:
    """The nodes the plan quantizes without exclusions but `settings` keeps float (--exclude-node/
    -op/-after, --keep-first-last-float, the fallback's choice, the zoo's rules): what a target that
    quantizes the float graph itself (TFLite) must keep float. Not only compute layers: a fallback
    unit frees a tensor by keeping its producer and readers float, residual Adds and pooling
    included."""
    bare = replace(settings, exclude_nodes=(), exclude_ops=(), keep_first_last_float=False, exclude_after=())
    every, _ = plan_for(fp32, bare, placement)
    kept, _ = plan_for(fp32, settings, placement)
    quantized = set(kept.nodes)
    return [name for name in every.nodes if name not in quantized]


def nodes_without_ranges(fp32: Fp32Model, table: CalibrationTable, settings: QuantizeSettings, placement: str) -> tuple[str, ...]:
    """The nodes to keep float because `table` has no range for a tensor they would quantize:
    what a pre-quantized source left float stays float."""
    excluded = list(settings.exclude_nodes)
    producers = {output: node.name for node in fp32.proto.graph.node for output in node.output}
    while True:
        plan, _ = plan_for(fp32, replace(settings, exclude_nodes=tuple(excluded)), placement)
        missing = [t for t in plan.activations if plan.same_scale.get(t, t) not in table.tensors]
        if not missing:
            return tuple(name for name in excluded if name not in settings.exclude_nodes)
        more = {node for t in missing for node in plan.consumers.get(t, [])}
        more |= {producers[t] for t in missing if t in plan.outputs and producers.get(t) in plan.nodes}
        if not more - set(excluded):
            raise InputError(f"the pre-quantized grids leave {missing[:3]} without a range and no node to keep float", fp32.origin)
        excluded += sorted(more - set(excluded))


def resolved_weight_type(settings: QuantizeSettings, encoding: str) -> str:
    """The weights' integer type for `encoding` ("auto" resolved on this machine), or an
    InputError naming the option."""
    try:
        return weight_type(settings.weight_type, encoding)
    except ValueError as exc:
        raise InputError(str(exc), option="weight_type") from None


def build_qdq(fp32: Fp32Model, table: CalibrationTable, settings: QuantizeSettings, encoding: str,
              batches: Sequence[Feeds] = (), threads: int | None = None, placement: str = "inputs",
              corrected: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None,
              fp32_means: dict[str, np.ndarray] | None = None,
              rounded: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None,
              axes: dict[str, int | None] | None = None) -> tuple[QdqGraph, dict[str, Any]]:
    """The Q/DQ graph in `encoding`; with bias correction on, corrected on `batches` (the
    calibration data), or given the biases (and record) another graph on the same integer grids
    was corrected to (`corrected`: see encoding.GRID_FAMILY). `rounded`: the weights' integers
    (and record) from `round_weights`, else each weight is rounded to nearest. `axes`: each
    input's batch axis in `batches` (None: not batched; default 0). Returns the graph
    and what the manifest records of it."""
    table.check_model(fp32.sha256, fp32.origin)
    plan, after = plan_for(fp32, settings, placement)
    weights = resolved_weight_type(settings, encoding)
    values, rounding = rounded if rounded is not None else ({}, {"method": "nearest"})
    qdq = insert_qdq(fp32.proto, plan, table, encoding, settings.per_channel, weights, values)
    details: dict[str, Any] = {"encoding": encoding, "placement": placement, "per_channel_weights": settings.per_channel,
                               "weight_type": weights, "weight_rounding": {**rounding, "layers": len(qdq.rounded)},
                               "quantized_nodes": len(plan.nodes), "quantized_tensors": len(plan.activations),
                               "quantized_weights": len(plan.weights), "exclude_nodes": list(settings.exclude_nodes),
                               "exclude_ops": list(settings.exclude_ops), "exclude_after": after,
                               "keep_first_last_float": settings.keep_first_last_float}
    if settings.bias_correction and corrected is not None:
        biases, record = corrected
        layers = set_biases(qdq.model, biases, biased_nodes(qdq.model))
        details["bias_correction"] = {**record, "layers": layers, "shared": "the biases corrected once on these integer grids, on the inputs-placement graph"}
    elif settings.bias_correction:
        with stage("bias correction"):
            before = layer_biases(qdq)
            corrections, samples = correct_biases(fp32.proto, qdq, batches, threads, fp32_means=fp32_means, axes=axes)
            check = keep_if_closer(fp32.proto, qdq, before, batches[:CHECK_BATCHES], threads, axes) if corrections else {}
        details["bias_correction"] = {"layers": len(corrections), "samples": samples, "largest_shift": max(corrections.values(), default=0.0),
                                      "corrected_on": f"{encoding} encoding, {placement} placement", **check}
    if encoding != "int8":
        integerize_biases(qdq)
    return qdq, details


def round_weights(fp32: Fp32Model, table: CalibrationTable, settings: QuantizeSettings, batches: Sequence[Feeds],
                  axes: dict[str, int | None], threads: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The integers GPTQ gives the weights of every layer `settings` quantizes (quantization.rounding;
    with "gptaq", then compensated layer by layer for their quantized inputs: quantization.compensation),
    measured on `batches` (the calibration data), and its record; None when `settings` asks for
    nearest rounding. One set serves every encoding and placement: the weight grid is theirs; the
    inputs' quantization noise is that of the CPU encodings' grid (`table` in "mixed")."""
    if settings.weight_rounding == "nearest":
        return None
    if settings.weight_rounding not in WEIGHT_ROUNDINGS:
        raise InputError(f"unknown weight rounding '{settings.weight_rounding}'; choose one of {', '.join(WEIGHT_ROUNDINGS)}",
                         option="weight_rounding")
    plan, _ = plan_for(fp32, settings, "inputs")
    with stage("weight rounding"):
        steps = {tensor: activation_qparams(tensor, table.tensors[plan.same_scale.get(tensor, tensor)], "mixed").scale
                 for tensor in plan.activations}
        values, samples = rounded_weights(fp32.proto, plan, batches, axes, steps, settings.per_channel, threads)
        record: dict[str, Any] = {"method": settings.weight_rounding, "samples": samples}
        if settings.weight_rounding == "gptaq":
            values, record["compensated_on"] = compensated_weights(fp32.proto, plan, table, batches, axes, values, settings.per_channel, threads)
    return values, record
