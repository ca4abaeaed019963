"""What a build is asked to do: the calibration (or a given table), the evaluation and its gate,
how the Q/DQ graph is made, and each target's own options."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enginekit.accuracy import Condition
from enginekit.calibration.data import DataArg
from enginekit.exporter.reference import SourceOptions
from enginekit.quantization.pipeline import QuantizeSettings

if TYPE_CHECKING:
    from enginekit.targets.base import Target

DEFAULT_EVAL_SAMPLES = 256  # unlabelled data; a labelled evaluation split is used whole


@dataclass
class BuildOptions:
    table: str | Path | None = None  # a CalibrationTable to use; else one calibration here
    calib_method: str = "minmax"
    calib_data: DataArg = None  # a path, "zoo", or an iterable of feed dicts (default: the zoo's split)
    num_samples: int = 256
    eval_data: DataArg = None  # held-out data for the accuracy gate (default: the zoo's split)
    eval_samples: int | None = None  # default: a labelled split whole, else DEFAULT_EVAL_SAMPLES
    min_accuracy: str | Sequence[Condition | str] | None = None  # e.g. "top1_agreement>=0.90"; None: the default gate; "none": no gate
    output_kinds: Mapping[str, str] = field(default_factory=dict)  # output name -> classification|embedding|dense|sequence|generic
    metric: str | Callable[..., Mapping[str, float]] | None = None  # a user metric, "module:function"
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    auto_fallback: bool = False  # INT8 below the gate: keep the fewest layers float that make it pass (builder/fallback.py)
    max_float_layers: int | None = None  # bound for auto_fallback (default DEFAULT_MAX_FLOAT_LAYERS)
    target_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # {"tensorrt": {"workspace_mb": 2048}}
    threads: int | None = None  # runtime threads for every cell; None: each artifact's own, measured (tune_threads)
    tune_threads: bool | None = None  # time each artifact at fewer threads and keep its fastest (None: builder.threads.TUNE_BY_DEFAULT)
    # how the source becomes its FP32 ONNX (as `export` takes it): weights, input shapes, opset
    weights: str | Path | None = None
    input_shapes: Sequence[str] = ()  # NAME=DIMS[:DTYPE[:LOW..HIGH]], e.g. input_ids=batchxsequence:int64:0..30521
    opset: int | None = None
    allow_unsafe_keras: bool = False  # a Keras file with Lambda/custom layers may run its code

    def source_options(self) -> SourceOptions:
        return SourceOptions(str(self.weights) if self.weights else None, tuple(self.input_shapes), self.opset, self.allow_unsafe_keras)

    def tunes_threads(self) -> bool:
        from enginekit.builder.threads import TUNE_BY_DEFAULT  # read when asked: tests switch it off

        return TUNE_BY_DEFAULT if self.tune_threads is None else self.tune_threads

    def measures_threads(self, target: "Target") -> bool:
        """Whether a build of `target` times its artifact's thread count (builder/threads.py): no
        count named, tuning on, and a runner whose speed depends on CPU threads."""
        return self.threads is None and self.tunes_threads() and target.cpu_threads
