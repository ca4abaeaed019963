"""The public Python API: what the `enginekit` command line calls, and what a service or a
pipeline imports (`import enginekit as ek`).

    ek.export(model, output)                       -> Manifest of the checked FP32 ONNX
    ek.calibrate(model, data, methods=[...])       -> Calibration (tables, histograms, warnings)
    ek.build(model, target, precision, output)     -> BuildResult (folder, manifest, cache_hit)
    ek.build_many(model, targets, precisions, out) -> [Cell] (built, reused or skipped, with reason)
    ek.quantize(model, table, output, target)      -> BuildResult: an INT8 build from a given table
    ek.bench(artifacts, output)                    -> report (dict, schema enginekit.report/1)
    ek.compare(old, new)                           -> Comparison (rows, failures)
    ek.load(folder)                                -> Runner: infer({name: array}) -> {name: array}
    ek.deploy_triton(artifacts, repo)              -> [DeployedModel]: a Triton model repository
    ek.deploy_ovms(artifacts, repo)                -> [DeployedModel]: an OpenVINO Model Server repository
    ek.check_deployment(repo)                      -> RepositoryCheck: problems per model, one line each

Data (`data`, `calib_data`, `eval_data`) is a path (npy, npz, image folder), "zoo", or any
iterable of feed dicts ({input name: batch array}). Errors are `enginekit.EnginekitError`s whose
message describes the problem; progress goes to `enginekit.progress.reporting(callback)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from enginekit.builder import BuildOptions, BuildResult, Cell
from enginekit.calibration.data import DataArg
from enginekit.calibration.histogram import TensorHistogram
from enginekit.calibration.methods import DEFAULT_PERCENTILE, METHODS
from enginekit.calibration.table import CalibrationTable
from enginekit.core.artifacts import Manifest
from enginekit.exporter.parity import DEFAULT_MAX_ABS, DEFAULT_MIN_COSINE, DEFAULT_RTOL
from enginekit.exporter.reference import SourceOptions
from enginekit.onnx.smoothing import DEFAULT_ALPHA
from enginekit.targets.base import Runner


def export(model: str, output: str | Path, *, weights: str | Path | None = None, input_shapes: Sequence[str] = (),
           opset: int | None = None, dynamic_batch: bool = True, max_abs: float = DEFAULT_MAX_ABS,
           min_cosine: float = DEFAULT_MIN_COSINE, rtol: float = DEFAULT_RTOL, allow_unsafe_keras: bool = False) -> Manifest:
    """`model` (zoo name, `module:factory`, .onnx, Keras file or SavedModel) -> checked ONNX in the
    artifact folder `output`, published only when its parity with the source passes."""
    from enginekit.exporter.pipeline import ExportOptions, export_model

    options = ExportOptions(opset, dynamic_batch, max_abs, min_cosine, rtol)
    return Manifest(export_model(model, Path(output), str(weights) if weights else None, input_shapes, options,
                                 allow_unsafe_keras=allow_unsafe_keras))


@dataclass
class Calibration:
    """One calibration pass: a CalibrationTable per method, the histograms they came from, the
    warnings (fewer samples than asked, ...) and the files written."""

    model: str
    tables: dict[str, CalibrationTable]
    histograms: dict[str, TensorHistogram]
    warnings: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def calibrate(model: str | Path, data: DataArg = None, *, methods: Sequence[str] = ("minmax",), percentile: float = DEFAULT_PERCENTILE,
              num_samples: int = 256, batch_size: int = 4, skip_nonfinite: bool = False, threads: int | None = None,
              output: str | Path | None = None, trt_cache: str | Path | None = None, source: SourceOptions | None = None,
              shards: int = 1, executor: str = "local", address: str | None = None, workers: int | None = None,
              smoothquant: float = DEFAULT_ALPHA, equalize: bool = False) -> Calibration:
    """Activation ranges of `model` from one streaming pass over `data`, every method from the
    same histograms. With `output`, the tables are written (ranges.json, or ranges.<method>.json).
    With `shards` > 1 the pass is split over `executor`'s workers ("local" processes, or "ray" at
    `address`): byte-identical tables. `smoothquant` (alpha; 0: off) first smooths the inputs of
    token MatMuls (onnx.smoothing), and `equalize` cross-layer equalises consecutive convolutions
    (onnx.equalization): the tables then carry the divisors and belong to that graph."""
    from enginekit.builder.calibration import calibrate_model
    from enginekit.calibration.pipeline import table_outputs, write_tables
    from enginekit.core.executor import get_executor
    from enginekit.core.outputs import check_outputs
    from enginekit.exporter.reference import load_fp32

    methods = list(METHODS) if list(methods) == ["all"] else list(methods)
    source = source or SourceOptions()
    sources = [model, source.weights, *([data] if isinstance(data, (str, Path)) else [])]
    if output is not None:
        check_outputs(table_outputs(Path(output), methods, Path(trt_cache) if trt_cache else None), sources)
    fp32 = load_fp32(model, source)
    pool = get_executor(executor, workers, address) if shards > 1 else None
    run = calibrate_model(fp32, data, methods, percentile, num_samples, batch_size, skip_nonfinite, threads, shards, pool, smoothquant,
                          equalize)
    result = Calibration(fp32.name, run.tables, run.histograms, list(run.warnings))
    if output is not None:
        result.written = write_tables(run.tables, Path(output), Path(trt_cache) if trt_cache else None, inputs=[fp32.path])
    return result


def build(model: str | Path, target: str, precision: str, output: str | Path, options: BuildOptions | None = None) -> BuildResult:
    """One artifact (`target` x `precision`) in the folder `output`, gated on accuracy."""
    from enginekit.builder import build as build_one

    return build_one(model, target, precision, output, options)


def build_many(model: str | Path, targets: Sequence[str], precisions: Sequence[str], output: str | Path,
               options: BuildOptions | None = None) -> list[Cell]:
    """Every target x precision into `output/<target>-<precision>`; cells this machine cannot build
    are returned as skipped with the reason."""
    from enginekit.builder import build_many as build_cells

    return build_cells(model, list(targets), list(precisions), output, options or BuildOptions())


def build_matrix(models: str | Path | Sequence[Any], targets: Sequence[str], precisions: Sequence[str], output: str | Path,
                 options: BuildOptions | None = None, *, executor: str = "local", address: str | None = None,
                 workers: int | None = None, machines: Mapping[str, str] | None = None) -> Any:
    """Every model x target x precision fanned out over `executor` ("local": worker processes on
    this machine; "ray": tasks on the Ray cluster at `address`), each model exported and
    calibrated once; the artifacts are the ones `build_many` makes (same build keys, same files).
    One model (a name, path or factory) lays its artifacts out as `build_many` does,
    `output/<target>-<precision>`; a list (names or MatrixModel) puts each in `output/<name>/`.
    `machines` pins a target to a GPU kind ({"tensorrt": "H100"}). A cell already published
    with its build key is reused; `output/matrix.json` and `.md` report every cell."""
    from enginekit.builder.matrix import MatrixModel
    from enginekit.builder.matrix import build_matrix as run_matrix
    from enginekit.core.executor import get_executor

    options = options or BuildOptions()
    flat = isinstance(models, (str, Path))
    entries = [m if isinstance(m, MatrixModel) else MatrixModel(str(m), Path(str(m)).stem.replace(":", "_"), options)
               for m in ([models] if flat else models)]
    return run_matrix(entries, list(targets), list(precisions), output, get_executor(executor, workers, address), machines, flat=flat)


def load_matrix(path: str | Path, options: BuildOptions | None = None) -> dict[str, Any]:
    """A matrix file (YAML): `models` (each a name/path/factory, or a mapping with `model` and its
    own data, samples and gate), `targets`, `precisions`, and `machines` ({target: {accelerator:
    KIND}}); returns the keyword arguments of `build_matrix` but `output`."""
    from enginekit.builder.matrix import parse_matrix
    from enginekit.core.errors import InputError
    from enginekit.core.loaders import load_yaml_mapping

    document = load_yaml_mapping(path)
    unknown = sorted(set(document) - {"models", "targets", "precisions", "machines"})
    if unknown:
        raise InputError(f"unknown matrix key(s) {', '.join(unknown)} (known: models, targets, precisions, machines)", path)
    models, machines = parse_matrix(document, options or BuildOptions(), Path(path).parent, Path(path))
    lists = {}
    for key in ("targets", "precisions"):
        value = document.get(key)
        value = value.split(",") if isinstance(value, str) else value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise InputError(f"a matrix lists its {key} (e.g. {key}: [onnxruntime, openvino])", path)
        lists[key] = [v.strip() for v in value]
    return {"models": models, **lists, "machines": machines}


def sensitivity(model: str | Path, targets: Sequence[str] = ("onnxruntime",), output: str | Path | None = None,
                options: BuildOptions | None = None) -> dict[str, Any]:
    """Rank the layers by what keeping each float gains against the gate, on the Q/DQ graphs of
    `targets`' INT8 encodings (reference executor, nothing built); with `output`, also as JSON."""
    from enginekit.builder import sensitivity as rank

    return rank(model, list(targets), options or BuildOptions(), output)


def quantize(model: str | Path, table: str | Path, output: str | Path, target: str = "onnxruntime",
             options: BuildOptions | None = None) -> BuildResult:
    """The INT8 artifact of `target` from a CalibrationTable made earlier: a build with that table."""
    return build(model, target, "int8", output, replace(options or BuildOptions(), table=table))


def bench(artifacts: Iterable[str | Path], output: str | Path | None = None, settings: Any = None,
          source: str | Path | None = None, source_options: SourceOptions | None = None) -> dict[str, Any]:
    """Measure artifact folders the same way (each in its own process, latency interleaved) into
    one report; with `output`, write report.json, .md and .html. With `source` (the model the
    artifacts were built from), the report starts with that model in its own framework (PyTorch
    eager and torch.compile, or Keras), measured by the same rules."""
    from enginekit.benchmark.files import write_report
    from enginekit.benchmark.harness import BenchSettings, bench_artifacts
    from enginekit.benchmark.report import make_report
    from enginekit.core.artifacts import read_manifest
    from enginekit.core.outputs import REPORT, Output, check_outputs, report_paths

    folders = [Path(a) for a in artifacts]
    if output is not None:
        check_outputs([Output(p, REPORT) for p in report_paths(output)], folders)
    settings = settings or BenchSettings()
    rows, note, skipped = [], None, []
    if source is not None and folders:
        from enginekit.benchmark.source import source_rows
        from enginekit.core.errors import EnginekitError

        try:
            rows, note = source_rows(source, source_options, read_manifest(folders[0]))
        except EnginekitError as exc:  # the artifacts are measured all the same; the report says why the source is not
            note = f"the source cannot be measured here: {exc}"
    report = make_report(bench_artifacts([*rows, *folders], settings, skipped=skipped), settings)
    report["skipped"], report["source_note"] = skipped, note
    if output is not None:
        write_report(report, output)
    return report


def compare(old: str | Path | dict[str, Any], new: str | Path | dict[str, Any], max_regression: float = 0.10,
            max_accuracy_drop: float = 0.01, min_effect: float = 0.02):
    """Per artifact and metric, what got faster, slower or less accurate; `.failures` lists what
    breaks the limits."""
    from enginekit.benchmark.compare import compare_reports
    from enginekit.benchmark.report import load_report

    old_report = old if isinstance(old, dict) else load_report(old)
    new_report = new if isinstance(new, dict) else load_report(new)
    return compare_reports(old_report, new_report, max_regression, max_accuracy_drop, min_effect)


def load(folder: str | Path, threads: int | None = None, **runtime: Any) -> Runner:
    """An artifact folder (its files verified against the manifest's hashes) as a Runner:
    `runner.infer({input: array}) -> {output: array}`, float in and out on every target. A model
    folder `enginekit deploy` wrote opens its latest version (each version is the artifact)."""
    from enginekit.deploy.repository import latest_version
    from enginekit.targets.registry import open_artifact

    runner, _ = open_artifact(latest_version(Path(folder)) or folder, threads=threads, **runtime)
    return runner


def deploy_triton(artifacts: Iterable[str | Path], output: str | Path, options: Any = None, report: str | Path | dict[str, Any] | None = None,
                  names: dict[str, str] | None = None, plan_tensorrt: Iterable[str | Path] = ()) -> list[Any]:
    """A Triton model repository at `output`: per artifact `<name>/config.pbtxt` and a version
    folder holding the artifact; `report` (default: a report.json beside the artifacts) gives
    the preferred batch sizes; `plan_tensorrt` ONNX Runtime artifacts also get the config of the
    TensorRT engine that would be built from their graph. `options`: `deploy.TritonOptions`."""
    from enginekit.deploy import deploy_triton as write

    return write(list(artifacts), output, options, _deploy_report(artifacts, report), names, list(plan_tensorrt))


def deploy_ovms(artifacts: Iterable[str | Path], output: str | Path, names: dict[str, str] | None = None, threads: int | None = None) -> list[Any]:
    """An OpenVINO Model Server repository at `output`: `<name>/<version>/` per artifact and config.json."""
    from enginekit.deploy import deploy_ovms as write

    return write(list(artifacts), output, names, threads)


def check_deployment(folder: str | Path) -> Any:
    """The problems of a Triton or OVMS repository (written by enginekit or by hand), per model."""
    from enginekit.deploy import check_repository

    return check_repository(folder)


def _deploy_report(artifacts: Iterable[str | Path], report: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
    """The benchmark entries for deployment: the report given, else those of every build's
    report.json beside the artifacts (entries are matched to artifacts by file hashes)."""
    from enginekit.benchmark.report import load_report

    if isinstance(report, dict):
        return report
    if report is not None:
        return load_report(report)
    beside = sorted({Path(a).resolve().parent / "report.json" for a in artifacts})
    return {"artifacts": [entry for path in beside if path.is_file() for entry in load_report(path)["artifacts"]]}
