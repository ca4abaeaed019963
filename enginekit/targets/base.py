"""The two contracts every target implements.

- `Runner`: an opened artifact. Named inputs and outputs (`infer(feeds) -> {name: array}`), feeds
  checked against the input specs in one place, float in and float out whatever the artifact's
  I/O types (integer I/O is scaled by the runner), `close()` and a context manager, and declared
  capabilities instead of attribute probing. The harness, the accuracy gate and user services
  only ever talk to runners.
- `Target`: how one runtime turns the shared build inputs (the FP32 ONNX, the CalibrationTable,
  the Q/DQ graph of its encoding) into an artifact folder, what it adds to the build key, why it
  cannot build here (if so), and how it opens an artifact as a Runner.

A new target is one module (or package) that subclasses Target and is registered
(`enginekit.targets.registry.register`); nothing else in enginekit knows target names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from enginekit.core.errors import InputError
from enginekit.core.tensors import Feeds, TensorSpec

if TYPE_CHECKING:
    import onnx

    from enginekit.calibration.table import CalibrationTable
    from enginekit.exporter.reference import Fp32Model
    from enginekit.quantization.qdq import QdqGraph

STREAMS = "streams"  # the runner sweeps runtime streams (stream_throughput)
GPU_TIMING = "gpu_timing"  # the runner reports the device time of its last call (last_gpu_ms)


class Runner:
    """An artifact opened for inference. Subclasses set `inputs`/`outputs` and implement `run`."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    capabilities: ClassVar[frozenset[str]] = frozenset()
    max_batch: int | None = None  # the largest batch the artifact accepts (an engine's profile), None: any

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Outputs by name for float (or integer id) feeds by input name."""
        values = self.run(self.check_feeds(feeds))
        return dict(zip(self.output_names, values))

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        """The runtime call on checked feeds: one array per output, in `outputs` order."""
        raise NotImplementedError

    def check_feeds(self, feeds: Mapping[str, Any]) -> Feeds:
        """Names, dtype kinds and fixed dims against the input specs; a float64 array becomes
        float32 and an int32 one int64 (same kind), anything else is an InputError."""
        expected = {spec.name: spec for spec in self.inputs}
        if set(feeds) != set(expected):
            missing, unknown = sorted(set(expected) - set(feeds)), sorted(set(feeds) - set(expected))
            parts = ([f"lack input(s) {missing}"] if missing else []) + ([f"have unknown input(s) {unknown}"] if unknown else [])
            raise InputError(f"feeds {' and '.join(parts)}; the model's inputs are {sorted(expected)}")
        checked: Feeds = {}
        for name, value in feeds.items():
            spec = expected[name]
            array = value if isinstance(value, np.ndarray) else np.asarray(value)
            want = np.dtype(spec.dtype)
            if array.dtype != want:
                if array.dtype.kind != want.kind and not (array.dtype.kind in "iu" and want.kind in "iu"):
                    raise InputError(f"input '{name}' has dtype {array.dtype}, the model expects {want}")
                array = array.astype(want)
            if array.ndim != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, array.shape)):
                raise InputError(f"input '{name}' has shape {list(array.shape)}, the model expects {list(spec.shape)}")
            checked[name] = array
        return checked

    def close(self) -> None:
        """Release what the runtime holds (device memory, threads); the runner is unusable after."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Built:
    """What a target's build hands back: the runner of the staged files, and its manifest fields."""

    runner: Runner
    manifest: dict[str, Any] = field(default_factory=dict)


class BuildInputs(Protocol):
    """The shared inputs of one build, provided by the build stage; everything is computed at most
    once per model and handed out as private copies."""

    fp32: "Fp32Model"
    precision: str
    encoding: str  # the Q/DQ encoding of INT8 builds (the target's own, or the user's resolved choice)
    stage: Path  # the staging folder: write the artifact's files here
    threads: int | None
    options: Mapping[str, Any]  # this target's own options, defaults filled in
    bias_correction: bool
    notes: list[str]  # lines for the manifest's notes

    def table(self) -> "CalibrationTable": ...

    def qdq(self, encoding: str) -> "QdqGraph":
        """The (bias-corrected) Q/DQ graph in `encoding`, a copy the target may change."""
        ...

    def calibration_feeds(self, count: int) -> Feeds: ...

    def float_layers(self) -> list[str]:
        """Names of the compute layers the build keeps float (exclusions, the fallback's choice),
        for a target that quantizes the float graph itself."""
        ...

    def quantized_tensors(self) -> list[str]:
        """The activations the Q/DQ graph quantizes (from its placement plan alone: no Q/DQ
        graph is built), for a target that quantizes the float graph itself."""
        ...

    def calibration_samples(self, count: int, batch: int) -> Iterator[Feeds]:
        """The first `count` calibration samples in batches of `batch` (bounded memory)."""
        ...


@dataclass(frozen=True)
class Serving:
    """How model servers load this target's artifacts (`enginekit deploy`): Triton's platform or
    backend for it (None: Triton has none), the file in the artifact folder each server loads,
    the device kind its instances run on, and whether OpenVINO Model Server reads it."""

    model_files: tuple[str, ...] = ()  # the artifact's model file, first match wins
    triton_platform: str | None = None
    triton_backend: str | None = None
    triton_default_file: str = ""  # the name Triton loads without default_model_filename
    device: str = "CPU"  # "CPU" or "GPU"
    ovms: bool = False


class Target:
    """One runtime. Subclasses set the class attributes and implement `build` and `open`."""

    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    encoding: ClassVar[str] = "int8"  # the Q/DQ encoding its INT8 artifacts are made from
    encodings: ClassVar[tuple[str, ...]] = ()  # encodings a user may ask for instead (default: only `encoding`)
    placement: ClassVar[str] = "inputs"  # where its Q/DQ graph quantizes: "inputs" or also "outputs" (quantization.placement)
    aliases: ClassVar[tuple[str, ...]] = ()  # other names artifacts of this target carry in manifests
    float_layers: ClassVar[bool] = True  # whether its INT8 keeps the Q/DQ graph's float (excluded) layers float
    cpu_threads: ClassVar[bool] = True  # whether its runner's speed depends on a CPU thread count (builder.threads tunes it)
    option_defaults: ClassVar[Mapping[str, Any]] = {}
    serving: ClassVar[Serving] = Serving()  # how model servers load its artifacts (none by default)

    def unavailable(self, precision: str) -> str | None:
        """Why this machine cannot build or run `precision` (missing library or hardware), or None."""
        return None

    def resolve_encoding(self, requested: str | None) -> str:
        if requested is None or requested == self.encoding:
            return self.encoding
        if requested not in self.encodings:
            raise InputError(f"the {self.name} target builds INT8 from the '{self.encoding}' encoding, not '{requested}'",
                             option="encoding")
        return requested

    def options(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """This target's options: its defaults overridden by what the user gave."""
        unknown = sorted(set(given or {}) - set(self.option_defaults))
        if unknown:
            raise InputError(f"the {self.name} target has no option(s) {', '.join(unknown)} "
                             f"(it has {', '.join(sorted(self.option_defaults)) or 'none'})")
        options = {**self.option_defaults, **(given or {})}
        self.check_options(options)
        return options

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise an InputError for an option value this target cannot build with (checked before
        any calibration, as `options` resolves them)."""

    def preflight(self, fp32: "Fp32Model", precision: str) -> InputError | None:
        """Why this target cannot build this model at all (an op it cannot convert, ...), found
        from the graph alone, before any calibration; None when nothing is known against it. An
        error, not raised: the model's other cells are still built, and its `option` names the
        setting that fixes it (the CLI's flag in the table row)."""
        return None

    def key_material(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """What besides the shared inputs changes this target's artifact (versions, options)."""
        return {"options": dict(options)}

    def build(self, inputs: BuildInputs) -> Built:
        raise NotImplementedError

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        """The artifact in `folder` (files already verified against `manifest`) as a Runner."""
        raise NotImplementedError

    def candidate_runner(self, candidate: BuildInputs) -> Runner | None:
        """A candidate of the float-fallback search opened as this target's INT8 artifact would
        run, for the search to judge its gate checks on the runtime itself: `candidate` is the
        build inputs of that float set (`qdq(candidate.encoding)`: the Q/DQ graph judged,
        `float_layers()`: the layers kept float), `candidate.stage` a throwaway folder deleted
        once the runner is closed. None where the target cannot (the search then judges the Q/DQ
        graph in the reference executor, and the built artifact alone is checked on the runtime).
        Why: runtimes round differently from the exact Q/DQ simulation (ONNX Runtime's fused
        requantization), and a target may quantize more than the Q/DQ graph does (TFLite's
        full-integer graph): a set that passes on the graph can fail on the runtime."""
        return None
