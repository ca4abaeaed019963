"""The `enginekit` command line. Every user-facing failure ends as one line on stderr:
exit 2 for unusable input, exit 1 for a failed quality gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from enginekit import __version__
from enginekit.errors import EnginekitError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="enginekit")
def cli() -> None:
    """Turn a trained model into checked, calibrated inference artifacts.

    \b
    Typical flow:
      enginekit zoo list                                   # the reference models
      enginekit export -m efficientnet_lite0 -o out/onnx   # checked ONNX + parity
      enginekit export -m pkg.nets:build -w w.safetensors --input-shape x=batchx3x224x224
      enginekit export -m model.onnx -o out/onnx           # validate + normalize a file
      enginekit calibrate -m efficientnet_lite0 --method all -o ranges.json
      enginekit quantize -m efficientnet_lite0 -t ranges.minmax.json -o out/int8 --report
      enginekit build -m efficientnet_lite0 --targets onnxruntime,openvino,tensorrt \\
          --precisions fp32,int8 -o out/all

    Exit codes: 0 ok, 1 a quality gate failed (parity, accuracy), 2 unusable input.
    """


@cli.command()
@click.option("--model", "-m", required=True, help="Zoo name, 'package.module:factory' (PyTorch or Keras), a .onnx file, a .keras/.h5 file or a SavedModel folder.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="state_dict for the model: .safetensors (preferred) or .pt/.pth (weights only).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Artifact folder to write (default: artifacts/<model>/onnx).")
@click.option("--opset", type=click.IntRange(13, 25), help="ONNX opset (default 20 for PyTorch sources: the newest ONNX Runtime, OpenVINO and TensorRT 10 all read; an ONNX file keeps its own).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True, help="Keep the batch dim symbolic, or fix it to 1.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS", help="Input shape, e.g. image=1x3x256x256 or input_ids=batchxsequence (repeatable). Required for factories.")
@click.option("--atol", type=float, default=None, help="Parity gate: largest allowed |onnx - source| (default 1e-3).")
@click.option("--min-cosine", type=float, default=None, help="Parity gate: smallest allowed cosine similarity (default 0.99999).")
@click.option("--unsafe-allow-lambda", is_flag=True, help="Load a Keras file whose Lambda/custom layers run Python code from the file (only for files you trust).")
def export(model, weights, output, opset, dynamic_batch, input_shapes, atol, min_cosine, unsafe_allow_lambda) -> None:
    """Export a model to ONNX, check it, and prove parity with its source."""
    from enginekit.export.parity import DEFAULT_MAX_ABS, DEFAULT_MIN_COSINE
    from enginekit.export.pipeline import ExportOptions, export_model

    options = ExportOptions(opset, dynamic_batch, DEFAULT_MAX_ABS if atol is None else atol, DEFAULT_MIN_COSINE if min_cosine is None else min_cosine)
    out = Path(output) if output else Path("artifacts") / _safe_name(model) / "onnx"
    manifest = export_model(model, out, weights, input_shapes, options, allow_unsafe_keras=unsafe_allow_lambda)
    parity = manifest["parity"]
    io = ", ".join(f"{i['name']}{list(i['shape'])}" for i in manifest["inputs"])
    click.echo(f"wrote {out / 'model.onnx'} (opset {manifest['opset']}; inputs {io})")
    click.echo(f"parity vs {parity['reference']}: max_abs {parity['max_abs']:.3g}, cosine {parity['cosine']:.8f} over {len(parity['cases'])} case(s) - passed")


@cli.command()
@click.option("--model", "-m", required=True, help="Export artifact folder, .onnx file, or zoo name (exported on first use).")
@click.option("--data", "-d", default=None, help="npy | npz | image folder | 'zoo' (default for zoo models: its calibration split).")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile", "mse", "all"]), default="minmax", show_default=True, help="minmax is the default: with bias correction it is as accurate as any on the zoo (see README).")
@click.option("--percentile", "pct", type=click.FloatRange(50, 100), default=99.99, show_default=True, help="Percentile of |x| for --method percentile.")
@click.option("--num-samples", "-n", type=int, default=256, show_default=True)
@click.option("--batch-size", "-b", type=click.IntRange(1), default=4, show_default=True, help="Samples per ONNX Runtime run; memory grows with it.")
@click.option("--skip-nonfinite", is_flag=True, help="Drop samples with NaN/Inf (counted) instead of failing.")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="ranges.json", show_default=True, help="Table path; with several methods, <stem>.<method>.json each.")
@click.option("--trt-cache", type=click.Path(dir_okay=False), default=None, help="Also write a TensorRT-style calibration cache text.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores).")
def calibrate(model, data, method, pct, num_samples, batch_size, skip_nonfinite, output, trt_cache, threads) -> None:
    """Collect activation ranges in one streaming pass; every method from the same histograms."""
    from enginekit.calibrate.pipeline import calibrate as run_calibration
    from enginekit.calibrate.pipeline import side_by_side, table_outputs, write_tables
    from enginekit.outputs import check_outputs

    methods = ["minmax", "percentile", "entropy", "mse"] if method == "all" else [method]
    check_outputs(table_outputs(Path(output), methods, Path(trt_cache) if trt_cache else None), [model, data])
    run = run_calibration(model, data, methods, pct, num_samples, batch_size, skip_nonfinite, threads)
    for note in run.warnings:
        click.echo(f"warning: {note}", err=True)
    written = write_tables(run, Path(output), Path(trt_cache) if trt_cache else None)
    table = next(iter(run.tables.values()))
    click.echo(f"{run.model.name}: {len(run.histograms)} tensors, {table.num_samples} samples, data sha256 {table.data_sha256[:12]}")
    click.echo(side_by_side(run))
    for path in written:
        click.echo(f"wrote {path}")


@cli.command()
@click.option("--model", "-m", required=True, help="The FP32 model the table was made for (artifact folder, .onnx, zoo name).")
@click.option("--table", "-t", "table_path", required=True, type=click.Path(dir_okay=False), help="CalibrationTable from `enginekit calibrate`.")
@click.option("--target", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime", show_default=True, help="Chooses the integer encoding the target runs fastest.")
@click.option("--encoding", type=click.Choice(["uint8", "int8", "mixed"]), default=None, help="Override: uint8 (ORT CPU), int8 (TensorRT), mixed (OpenVINO).")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True, help="Sequential bias correction on the calibration data.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales instead of per-channel.")
@click.option("--exclude-node", multiple=True, help="Keep this node in float (repeatable).")
@click.option("--exclude-op", multiple=True, help="Keep every node of this op type in float (repeatable).")
@click.option("--exclude-after", multiple=True, help="Keep compute ops that read this op type's output in float (zoo default for minilm_l6: Gelu).")
@click.option("--keep-first-last-float", is_flag=True, help="Keep the first and last compute layers in float.")
@click.option("--data", "-d", default=None, help="Calibration data for bias correction (default: the zoo's).")
@click.option("--eval-data", default=None, help="Held-out data for the accuracy check (default: the zoo's evaluation split).")
@click.option("--eval-samples", type=int, default=None, help="Held-out samples to score (default: a labelled split whole, else 256).")
@click.option("--min-accuracy", default=None, help="Gate, e.g. 'top1_agreement>=0.90' or 'cosine>=0.99,accuracy>=0.97'.")
@click.option("--report", is_flag=True, help="Per-layer report: range, clipped share and SQNR per tensor, worst first.")
@click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="Artifact folder to write.")
@click.option("--threads", type=int, default=None)
def quantize(model, table_path, target, encoding, bias_correction, per_tensor, exclude_node, exclude_op, exclude_after,
             keep_first_last_float, data, eval_data, eval_samples, min_accuracy, report, output, threads) -> None:
    """Write the Q/DQ INT8 ONNX from a CalibrationTable, check its accuracy against FP32."""
    import json

    from enginekit.quantize.pipeline import QuantizeOptions
    from enginekit.quantize.pipeline import quantize as run_quantize
    from enginekit.quantize.report import format_layer_report

    options = QuantizeOptions(
        target=target, encoding=encoding, bias_correction=bias_correction, per_channel=not per_tensor,
        exclude_nodes=exclude_node, exclude_ops=exclude_op, exclude_after=exclude_after or None,
        keep_first_last_float=keep_first_last_float, data=data, eval_data=eval_data, eval_samples=eval_samples,
        min_accuracy=min_accuracy, layer_report=report, threads=threads,
    )
    manifest = run_quantize(model, table_path, Path(output), options)
    click.echo(f"wrote {Path(output) / 'model.int8.onnx'} ({manifest['encoding']} encoding, {manifest['calibration']['method']} ranges)")
    _echo_accuracy(manifest)
    if "integer_ops" in manifest:
        ops = manifest["integer_ops"]
        click.echo(f"ONNX Runtime runs {ops['integer_compute_ops']}/{ops['compute_ops']} compute ops as integer kernels")
    if report:
        click.echo(format_layer_report(json.loads((Path(output) / "layers.json").read_text())))


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Options from a YAML file become defaults, so flags on the command line still win."""
    if not value:
        return
    import yaml

    from enginekit.errors import InputError

    try:
        config = yaml.safe_load(Path(value).read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML ({' '.join(str(exc).split())[:200]})", value) from None
    if not isinstance(config, dict):
        raise InputError("a build config must be a mapping of option names to values", value)
    known = {p.name for p in ctx.command.params if p.name}
    config = {str(k).replace("-", "_"): v for k, v in config.items()}
    aliases = {"target": "targets", "precision": "precisions", "profile": "profiles", "builder": "tensorrt_builder"}
    config = {aliases.get(k, k): v for k, v in config.items()}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'config'}))}", value)
    for key in ("targets", "precisions"):
        if isinstance(config.get(key), list):
            config[key] = ",".join(str(v) for v in config[key])
    if isinstance(config.get("profiles"), dict):
        config["profiles"] = [f"{k}={','.join(str(x) for x in v)}" for k, v in config["profiles"].items()]
    ctx.default_map = {**(ctx.default_map or {}), **config}


@cli.command()
@click.option("--model", "-m", required=True, help="Export artifact folder, .onnx file, or zoo name.")
@click.option("--targets", "--target", "targets", required=True, help="Comma-separated: onnxruntime, openvino, tflite, tensorrt.")
@click.option("--precisions", "--precision", "precisions", default="fp32", show_default=True, help="Comma-separated: fp32, bf16, fp16, int8.")
@click.option("--tflite-io", type=click.Choice(["int8", "uint8"]), default="int8", show_default=True, help="Input/output type of int8 .tflite files.")
@click.option("--unsafe-allow-lambda", is_flag=True, help="Keras file with Lambda/custom layers: allow running its code (only for files you trust).")
@click.option("--table", "-t", default=None, type=click.Path(dir_okay=False), help="Reuse a CalibrationTable (INT8); default: calibrate here once.")
@click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile", "mse"]), default="minmax", show_default=True)
@click.option("--calib-data", default=None, help="Calibration data (default: the zoo's).")
@click.option("--num-samples", "-n", type=int, default=256, show_default=True)
@click.option("--eval-data", default=None, help="Held-out data for the accuracy gate (default: the zoo's evaluation split).")
@click.option("--min-accuracy", default=None, help="Gate, e.g. 'top1_agreement>=0.90'.")
@click.option("--profile", "profiles", multiple=True, metavar="DIM=MIN,OPT,MAX", help="TensorRT optimization profile per symbolic dim (default batch=1,8,32 sequence=1,128,512).")
@click.option("--workspace-mb", type=click.IntRange(64), default=4096, show_default=True, help="TensorRT workspace limit.")
@click.option("--builder", "tensorrt_builder", type=click.Choice(["api", "trtexec"]), default="api", show_default=True, help="TensorRT: build through the Python API, or with trtexec (same flags; its timings go into the manifest).")
@click.option("--threads", type=int, default=None)
@click.option("--bench/--no-bench", default=True, show_default=True, help="With several artifacts: benchmark them into one report (JSON, Markdown, HTML).")
@click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="The artifact folder (one target x precision) or the root of several.")
@click.option("--config", "-c", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False, callback=_load_config,
              help="YAML file whose keys are these options (targets, precisions, calib_method, ...); flags given on the command line win.")
def build(model, targets, precisions, tflite_io, unsafe_allow_lambda, table, calib_method, calib_data, num_samples, eval_data, min_accuracy, profiles, workspace_mb,
          tensorrt_builder, threads, bench, output) -> None:
    """Build target x precision artifacts (calibrating once for INT8), each gated on accuracy.

    A target whose library or hardware is absent is listed as skipped with the reason when
    several are asked for; asked for alone, it is an error (exit 2).
    """
    from enginekit.build import BuildOptions, build_many
    from enginekit.build import build as build_one
    from enginekit.console import markdown_table
    from enginekit.engines.tensorrt.builder import parse_dim_ranges
    from enginekit.quantize.pipeline import QuantizeOptions

    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    options = BuildOptions(table=table, calib_method=calib_method, calib_data=calib_data, num_samples=num_samples,
                           quantize=QuantizeOptions(progress=True, eval_data=eval_data), min_accuracy=min_accuracy,
                           threads=threads, dim_ranges=parse_dim_ranges(profiles), workspace_mb=workspace_mb,
                           tensorrt_builder=tensorrt_builder, tflite_io=tflite_io, allow_unsafe_keras=unsafe_allow_lambda)
    if len(target_list) == 1 and len(precision_list) == 1:
        manifest = build_one(model, target_list[0], precision_list[0], Path(output), options)
        _echo_build(Path(output), manifest)
        return
    rows = []
    outcomes = build_many(model, target_list, precision_list, Path(output), options)
    for outcome in outcomes:
        if outcome.skipped:
            rows.append([outcome.target, outcome.precision, "skipped", outcome.skipped])
            continue
        metrics = outcome.manifest["accuracy"]["metrics"]
        key = "top1_agreement" if "top1_agreement" in metrics else "cosine"
        cached = " (cache hit)" if outcome.manifest.get("cache_hit") else ""
        rows.append([outcome.target, outcome.precision, f"{outcome.folder}{cached}", f"{key} {metrics[key]:.4f}"])
    click.echo(markdown_table(["target", "precision", "artifact", "accuracy vs FP32 / reason skipped"], rows))
    built = [o.folder for o in outcomes if o.folder is not None]
    if bench and built:
        from enginekit.benchmarks.harness import BenchSettings, bench_artifacts
        from enginekit.benchmarks.report import make_report, markdown, write_report

        settings = BenchSettings(threads=threads)
        report = make_report(bench_artifacts(built, settings), settings)
        report["skipped"] = [{"target": o.target, "precision": o.precision, "reason": o.skipped} for o in outcomes if o.skipped]
        paths = write_report(report, Path(output) / "report.json")
        click.echo("\n" + markdown(report))
        click.echo(f"\nreport: {paths[0]} (HTML: {paths[2]})")


def _echo_accuracy(manifest: dict) -> None:
    metrics = manifest["accuracy"]["metrics"]
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("samples", "finite"))
    click.echo(f"accuracy vs FP32 on {int(metrics['samples'])} held-out samples: {shown}")


def _echo_build(output: Path, manifest: dict) -> None:
    click.echo(f"wrote {output} ({manifest['target']} {manifest['precision']})")
    _echo_accuracy(manifest)
    executed = manifest.get("openvino", {}).get("executed")
    if executed:
        click.echo(f"OpenVINO executes {executed['compute_layers']} compute layers as {executed['by_precision']}")


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="report.json", show_default=True, help="Report JSON (a .md rendering is written beside it).")
@click.option("--threads", type=int, default=None, help="Runtime threads (default: all cores); recorded.")
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Throughput sweep (dynamic-batch artifacts).")
@click.option("--min-iterations", type=click.IntRange(1), default=50, show_default=True)
@click.option("--min-seconds", type=click.FloatRange(0), default=2.0, show_default=True, help="Batch-1 latency time per artifact, all rounds together.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True, help="Latency slices per artifact, interleaved across the artifacts.")
@click.option("--cpus", default=None, help="Pin each benchmark process to these cores, e.g. 0,1 (recorded either way).")
def bench(artifacts, output, threads, batch_sizes, min_iterations, min_seconds, rounds, cpus) -> None:
    """Benchmark artifact folders the same way and write one report (JSON, Markdown, HTML)."""
    from enginekit.benchmarks.harness import BenchSettings, bench_artifacts
    from enginekit.benchmarks.report import make_report, markdown, write_report

    from enginekit.outputs import REPORT, Output, check_outputs, report_paths

    check_outputs([Output(p, REPORT) for p in report_paths(output)], artifacts)
    sizes = tuple(_integers(batch_sizes, "--batch-sizes", "integers"))
    cores = _integers(cpus, "--cpus", "core numbers") if cpus else None
    settings = BenchSettings(threads=threads, batch_sizes=sizes, min_iterations=min_iterations, min_seconds=min_seconds, rounds=rounds, cpus=cores)
    report = make_report(bench_artifacts(artifacts, settings), settings)
    json_path, md_path, html_path = write_report(report, output)
    click.echo(markdown(report))
    click.echo(f"\nwrote {json_path}, {md_path} and {html_path}")


def _integers(text: str, option: str, what: str) -> list[int]:
    """A comma-separated option value as integers, or a usage error naming the option."""
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of {what}", param_hint=option) from None


@cli.command()
@click.argument("old", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--max-regression", type=click.FloatRange(0), default=0.10, show_default=True, help="Fail when a significant latency increase exceeds this fraction.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0), default=0.01, show_default=True, help="Fail when an accuracy metric drops by more than this.")
@click.option("--min-effect", type=click.FloatRange(0), default=0.02, show_default=True, help="Smallest relative change called faster/slower.")
def compare(old, new, max_regression, max_accuracy_drop, min_effect) -> None:
    """Compare two reports per artifact and metric; exit 1 on a regression beyond the limits."""
    import sys

    from enginekit.benchmarks.compare import compare_reports
    from enginekit.benchmarks.report import load_report

    result = compare_reports(load_report(old), load_report(new), max_regression, max_accuracy_drop, min_effect)
    click.echo(result.render())
    if result.failures:
        sys.exit(1)


@cli.group()
def zoo() -> None:
    """The reference model zoo."""


@zoo.command("list")
def zoo_list() -> None:
    """Each zoo model with its parameters, input spec, data and metric."""
    from enginekit.models import get_spec, zoo_names

    for name in zoo_names():
        spec = get_spec(name)
        click.echo(f"{spec.name}: {spec.summary}")
        click.echo(f"  parameters : {spec.parameter_count():,}")
        for tensor in spec.inputs:
            click.echo(f"  input      : {tensor.name} {list(tensor.shape)} {tensor.dtype}")
        for tensor in spec.outputs:
            click.echo(f"  output     : {tensor.name} {list(tensor.shape)} {tensor.dtype}")
        click.echo(f"  preprocess : {spec.preprocessing}")
        click.echo(f"  data       : {spec.dataset().description}")
        click.echo(f"  metric     : {spec.metric}")
        click.echo(f"  weights    : {spec.weights_source}")


@cli.command()
@click.option("--output", "-o", type=click.Path(file_okay=False), default="artifacts/demo", show_default=True)
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores).")
def demo(output, threads) -> None:
    """Export every zoo model and print parity and ONNX Runtime FP32 batch-1 latency."""
    from enginekit.benchmarks.demo import run_demo

    click.echo(run_demo(Path(output), threads))


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _safe_name(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).stem if model) or "model"


def _terminate(_signum, _frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so staging folders are removed and nothing partial is left."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to one line plus an exit code."""
    import signal

    if threading_main():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(args=argv, prog_name="enginekit", standalone_mode=False)
    except EnginekitError as exc:
        click.echo(f"enginekit: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("enginekit: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("enginekit: interrupted", err=True)
        sys.exit(130)
