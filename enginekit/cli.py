"""The `enginekit` command line: a thin layer that parses flags into calls of the public API
(enginekit.api) and prints their results. Every user-facing failure ends as one line on stderr:
exit 2 for unusable input, 1 for a failed quality gate, 130 when interrupted."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from enginekit import __version__
from enginekit.core.errors import EnginekitError, unexpected_line
from enginekit.onnx.smoothing import DEFAULT_ALPHA as DEFAULT_SMOOTHQUANT_ALPHA

# The flag that fixes an error about a setting, per command where the flags differ.
_FLAGS = {"min_accuracy": "--min-accuracy", "num_samples": "--num-samples", "evaluation_data": "--eval-data",
          "targets": "--targets", "precisions": "--precisions", "encoding": "--encoding", "method": "--method",
          "input_shapes": "--input-shape", "calibration_data": "--calib-data", "weights": "--weights", "opset": "--opset",
          "skip_nonfinite": "--skip-nonfinite", "unsafe_allow_lambda": "--unsafe-allow-lambda", "profiles": "--trt-profile",
          "builder": "--builder", "timeout": "--timeout", "max_float_layers": "--max-float-layers",
          "name": "--name", "max_batch_size": "--max-batch-size", "weight_type": "--weight-type",
          "tflite_io": "--tflite-io", "tflite_output_bits": "--tflite-output-bits", "exclude_nodes": "--exclude-node",
          "max_abs": "--atol", "rtol": "--rtol", "weight_rounding": "--weight-rounding"}
_COMMAND_FLAGS = {"calibrate": {"calibration_data": "--data"}, "quantize": {"calibration_data": "--data", "targets": "--target"}}

_smoothquant_option = click.option(
    "--smoothquant", type=click.FloatRange(0, 1), default=DEFAULT_SMOOTHQUANT_ALPHA, show_default=True, metavar="ALPHA",
    help="SmoothQuant: divide the inputs of transformer MatMuls (tokens x channels) per channel by "
         "peak^ALPHA / weight_peak^(1-ALPHA) and fold that into the weights, before calibrating; 0: off.")
_equalize_option = click.option(
    "--equalize", is_flag=True,
    help="Cross-layer equalisation: rescale consecutive convolutions (through Relu, PRelu, LeakyRelu or MaxPool) so their "
         "per-channel weight ranges match, before calibrating (same function; the divisors go into the table). Off by default.")



def _source_options(command):
    """The source options export takes (--weights, --input-shape, --opset, --unsafe-allow-lambda),
    for commands that start from a source: they arrive as one `source` (SourceOptions)."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, weights=None, input_shapes=(), opset=None, unsafe_allow_lambda=False, **kwargs):
        from enginekit.exporter.reference import SourceOptions

        return command(*args, source=SourceOptions(weights, tuple(input_shapes), opset, unsafe_allow_lambda), **kwargs)

    for option in reversed([
        click.option("--weights", "-w", type=click.Path(dir_okay=False), help="state_dict for a PyTorch zoo model or factory (.safetensors or .pt)."),
        click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS[:DTYPE[:LOW..HIGH]]",
                     help="Input shape, dtype and value range, e.g. input_ids=batchxsequence:int64:0..30521 (repeatable)."),
        click.option("--opset", type=click.IntRange(13, 25), help="ONNX opset of the export (default: 20 for PyTorch; an ONNX file keeps its own, upgraded to 14 when older)."),
        click.option("--unsafe-allow-lambda", is_flag=True, help="Keras file with Lambda/custom layers: allow running its code (only for files you trust)."),
    ]):
        wrapped = option(wrapped)
    return wrapped


def _data_options(command):
    """--table, --calib-method, --calib-data, --num-samples and --eval-data: what a build (or a
    sensitivity ranking) calibrates and evaluates with."""
    for option in reversed([
        click.option("--table", "-t", default=None, type=click.Path(dir_okay=False), help="Reuse a CalibrationTable (INT8); default: calibrate here once."),
        click.option("--calib-method", type=click.Choice(["minmax", "entropy", "percentile", "mse", "auto", "per-tensor"]), default="minmax", show_default=True,
                     help="auto: all four from one pass, the one whose INT8 agrees best with FP32 on calibration samples; per-tensor: per tensor, "
                          "the one whose error reaches the tensor's readers the least."),
        click.option("--calib-data", default=None, help="Calibration data (default: the zoo's)."),
        click.option("--num-samples", "-n", type=int, default=256, show_default=True),
        click.option("--eval-data", default=None, help="Held-out data for the accuracy gate (default: the zoo's evaluation split)."),
    ]):
        command = option(command)
    return command


def _executor_options(command):
    """--executor local|ray, --address, --workers: where independent work (shards, cells) runs."""
    for option in reversed([
        click.option("--executor", type=click.Choice(["local", "ray"]), default=None,
                     help="local (the default): worker processes on this machine; ray: tasks on a Ray cluster (pip install 'enginekit[ray]')."),
        click.option("--address", default=None, help="Ray cluster address ('auto': the cluster this node belongs to; default: a new local one)."),
        click.option("--workers", type=click.IntRange(1), default=None, help="Local worker processes (default: one per two cores)."),
    ]):
        command = option(command)
    return command


def _with_run_limit(command):
    """A `--timeout SECONDS` option: each run of a graph (parity, calibration, evaluation) is
    stopped and fails after that long; the default comes from core.limits."""
    import functools

    @functools.wraps(command)
    def wrapped(*args, timeout=None, **kwargs):
        from enginekit.core.interrupt import run_time_limit

        with run_time_limit(timeout):
            return command(*args, **kwargs)

    help_text = "Stop any single run of the model (parity, calibration, evaluation) after this many seconds (default 600)."
    return click.option("--timeout", type=click.FloatRange(min=0.1), default=None, help=help_text)(wrapped)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="enginekit")
def cli() -> None:
    """Turn a trained model into checked, calibrated inference artifacts.

    \b
    Typical flow:
      enginekit zoo list                                   # the reference models
      enginekit targets                                    # targets, precisions, availability here
      enginekit export -m efficientnet_lite0 -o out/onnx   # checked ONNX + parity
      enginekit export -m pkg.nets:build -w w.safetensors --input-shape x=batchx3x224x224
      enginekit export -m model.onnx -o out/onnx           # validate + normalize a file
      enginekit calibrate -m efficientnet_lite0 --method all -o ranges.json
      enginekit quantize -m efficientnet_lite0 -t ranges.minmax.json -o out/int8 --report
      enginekit build -m efficientnet_lite0 --targets onnxruntime,openvino,tensorrt \\
          --precisions fp32,int8 -o out/all

    Exit codes: 0 ok, 1 a quality gate failed (parity, accuracy), 2 unusable input, 130 interrupted.
    --debug (anywhere on the line) shows the traceback of an unexpected error.
    """


@cli.command()
@click.option("--model", "-m", required=True, help="Zoo name, 'package.module:factory' (PyTorch or Keras), a .onnx file, a .keras/.h5 file or a SavedModel folder.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="state_dict for the model: .safetensors (preferred) or .pt/.pth (weights only).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Artifact folder to write (default: artifacts/<model>/onnx).")
@click.option("--opset", type=click.IntRange(13, 25), help="ONNX opset (default 20 for PyTorch sources: the newest ONNX Runtime, OpenVINO and TensorRT 10 all read; an ONNX file keeps its own).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True, help="Keep the batch dim symbolic, or fix it to 1.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS[:DTYPE[:LOW..HIGH]]", help="Input shape, dtype and value range, e.g. image=1x3x256x256 or input_ids=batchxsequence:int64:0..30521 (repeatable). Required for factories.")
@click.option("--atol", type=float, default=None, help="Parity gate: largest allowed |onnx - source|, plus --rtol x the output's largest magnitude (default 1e-3).")
@click.option("--rtol", type=float, default=None, help="Parity gate: the share of each output's largest magnitude it may differ by, beyond --atol (default 1e-4).")
@click.option("--min-cosine", type=float, default=None, help="Parity gate: smallest allowed cosine similarity (default 0.99999).")
@click.option("--unsafe-allow-lambda", is_flag=True, help="Load a Keras file whose Lambda/custom layers run Python code from the file (only for files you trust).")
@_with_run_limit
def export(model, weights, output, opset, dynamic_batch, input_shapes, atol, rtol, min_cosine, unsafe_allow_lambda) -> None:
    """Export a model to ONNX, check it, and prove parity with its source."""
    from enginekit import api
    from enginekit.exporter.parity import DEFAULT_MAX_ABS, DEFAULT_MIN_COSINE, DEFAULT_RTOL

    out = Path(output) if output else Path("artifacts") / _safe_name(model) / "onnx"
    manifest = api.export(model, out, weights=weights, input_shapes=input_shapes, opset=opset, dynamic_batch=dynamic_batch,
                          max_abs=DEFAULT_MAX_ABS if atol is None else atol, rtol=DEFAULT_RTOL if rtol is None else rtol,
                          min_cosine=DEFAULT_MIN_COSINE if min_cosine is None else min_cosine,
                          allow_unsafe_keras=unsafe_allow_lambda)
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
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime threads (default: all cores).")
@click.option("--shards", type=click.IntRange(1), default=1, show_default=True, help="Split the pass over this many workers (the table is byte-identical).")
@_smoothquant_option
@_equalize_option
@_executor_options
@_with_run_limit
@_source_options
def calibrate(model, data, method, pct, num_samples, batch_size, skip_nonfinite, output, trt_cache, threads, shards, smoothquant, equalize,
              executor, address, workers, source) -> None:
    """Collect activation ranges in one streaming pass; every method from the same histograms."""
    from enginekit import api
    from enginekit.calibration.pipeline import side_by_side

    result = api.calibrate(model, data, methods=[method], percentile=pct, num_samples=num_samples, batch_size=batch_size,
                           skip_nonfinite=skip_nonfinite, threads=threads, output=output, trt_cache=trt_cache, source=source,
                           shards=shards, executor=executor or "local", address=address, workers=workers, smoothquant=smoothquant,
                           equalize=equalize)
    for note in result.warnings:
        click.echo(f"warning: {note}", err=True)
    table = next(iter(result.tables.values()))
    click.echo(f"{result.model}: {len(result.histograms)} tensors, {table.num_samples} samples, data sha256 {table.data_sha256[:12]}")
    if "equalization" in table.parameters:
        click.echo(f"cross-layer equalisation: {table.parameters['equalization']['pairs']} convolution pairs rescaled (divisors in the table)")
    click.echo(side_by_side(result.tables, result.histograms))
    for path in result.written:
        click.echo(f"wrote {path}")


def _quantize_settings(encoding, bias_correction, per_tensor, exclude_node, exclude_op, exclude_after, keep_first_last_float, report,
                       weight_type, weight_rounding):
    from enginekit.quantization.pipeline import QuantizeSettings

    return QuantizeSettings(encoding=encoding, bias_correction=bias_correction, per_channel=not per_tensor,
                            exclude_nodes=tuple(exclude_node), exclude_ops=tuple(exclude_op), exclude_after=tuple(exclude_after) or None,
                            keep_first_last_float=keep_first_last_float, layer_report=report, weight_type=weight_type,
                            weight_rounding=weight_rounding)


_weight_rounding_option = click.option(
    "--weight-rounding", type=click.Choice(["gptq", "gptaq", "nearest"]), default="gptq", show_default=True,
    help="INT8 weight integers: gptq rounds each layer's weights to minimise its output error on the calibration data "
         "(same grid and scales as nearest); gptaq also makes each layer's weights absorb the error its quantized inputs "
         "carry (layer by layer: slower to build); nearest rounds each weight alone.")

_weight_type_option = click.option(
    "--weight-type", type=click.Choice(["auto", "int8", "uint8"]), default="auto", show_default=True,
    help="INT8 weights as int8, or as uint8 zero point 128 (the same grid): auto takes uint8 on an x86 CPU without VNNI, "
         "whose u8 x s8 kernels (ONNX Runtime, OpenVINO) saturate.")


def _exclusion_options(command):
    """The manual float switches, on `quantize` and `build` alike (a failing INT8 gate names
    layers: these keep them float)."""
    for option in reversed([
            click.option("--exclude-node", multiple=True, help="Keep this node, or the node writing this tensor, in float (repeatable)."),
            click.option("--exclude-op", multiple=True, help="Keep every node of this op type in float (repeatable)."),
            click.option("--exclude-after", multiple=True, help="Keep compute ops that read this op type's output in float (e.g. Gelu)."),
            click.option("--keep-first-last-float", is_flag=True, help="Keep the first and last compute layers in float.")]):
        command = option(command)
    return command


@cli.command()
@click.option("--model", "-m", required=True, help="The FP32 model the table was made for (artifact folder, .onnx, zoo name).")
@click.option("--table", "-t", "table_path", required=True, type=click.Path(dir_okay=False), help="CalibrationTable from `enginekit calibrate`.")
@click.option("--target", default="onnxruntime", show_default=True, help="The target to build (see `enginekit targets`); it chooses the integer encoding it runs fastest.")
@click.option("--encoding", type=click.Choice(["uint8", "int8", "mixed"]), default=None, help="Override: uint8 (ORT CPU), int8 (TensorRT), mixed (OpenVINO), where the target accepts it.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True, help="Sequential bias correction on the calibration data.")
@click.option("--per-tensor", is_flag=True, help="Per-tensor weight scales instead of per-channel.")
@_exclusion_options
@_weight_type_option
@_weight_rounding_option
@click.option("--data", "-d", default=None, help="Calibration data for bias correction (default: the zoo's).")
@click.option("--eval-data", default=None, help="Held-out data for the accuracy check (default: the zoo's evaluation split).")
@click.option("--eval-samples", type=int, default=None, help="Held-out samples to score (default: a labelled split whole, else 256).")
@click.option("--min-accuracy", default=None, help="Gate, e.g. 'top1_agreement>=0.90' or 'cosine>=0.99,accuracy>=0.97'; default: a task-aware gate; 'none': no gate.")
@click.option("--output-kind", "output_kinds", multiple=True, metavar="NAME=KIND", help="The kind of an output where inferring it is not right.")
@click.option("--report", is_flag=True, help="Per-layer report: range, clipped share and SQNR per tensor, worst first.")
@click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="Artifact folder to write.")
@click.option("--threads", type=click.IntRange(1), default=None)
@_with_run_limit
def quantize(model, table_path, target, encoding, bias_correction, per_tensor, exclude_node, exclude_op, exclude_after,
             keep_first_last_float, weight_type, weight_rounding, data, eval_data, eval_samples, min_accuracy, output_kinds, report, output, threads) -> None:
    """Build the INT8 artifact of a target from a CalibrationTable (a build with a given table)."""
    from enginekit import api
    from enginekit.builder import BuildOptions

    settings = _quantize_settings(encoding, bias_correction, per_tensor, exclude_node, exclude_op, exclude_after, keep_first_last_float, report,
                                  weight_type, weight_rounding)
    options = BuildOptions(calib_data=data, eval_data=eval_data, eval_samples=eval_samples, min_accuracy=min_accuracy,
                           output_kinds=_pairs(output_kinds, "--output-kind"), quantize=settings, threads=threads)
    result = api.quantize(model, table_path, output, target, options)
    _echo_build(result)


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Options from a YAML file become defaults, so flags on the command line still win."""
    if not value:
        return
    from enginekit.core.loaders import load_yaml_mapping

    config = load_yaml_mapping(value)
    matrix = {key: config.pop(key) for key in ("models", "machines") if key in config}
    if matrix:  # a build matrix: its models (and machine kinds) go to `build`, the rest are option defaults
        ctx.meta["matrix"] = (Path(value), matrix)
    known = {p.name for p in ctx.command.params if p.name}
    config = {str(k).replace("-", "_"): v for k, v in config.items()}
    aliases = {"target": "targets", "precision": "precisions", "trt_profile": "profiles", "builder": "tensorrt_builder",
               "input_shape": "input_shapes", "output_kind": "output_kinds"}
    config = {aliases.get(k, k): v for k, v in config.items()}
    unknown = sorted(set(config) - known)
    if unknown:
        from enginekit.core.errors import InputError

        raise InputError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'config'}))}", value)
    for key in ("targets", "precisions"):
        if isinstance(config.get(key), list):
            config[key] = ",".join(str(v) for v in config[key])
    if isinstance(config.get("profiles"), dict):
        config["profiles"] = [f"{k}={','.join(str(x) for x in v)}" for k, v in config["profiles"].items()]
    ctx.default_map = {**(ctx.default_map or {}), **config}


@cli.command()
@click.option("--model", "-m", default=None, help="Export artifact folder, .onnx file, or zoo name (or the models of a matrix file given with -c).")
@click.option("--targets", "--target", "targets", required=True, help="Comma-separated target names (see `enginekit targets`).")
@click.option("--precisions", "--precision", "precisions", default="fp32", show_default=True, help="Comma-separated: fp32, bf16, fp16, int8.")
@click.option("--tflite-io", type=click.Choice(["float32", "int8", "uint8"]), default=None,
              help="Input/output type of int8 .tflite files. Default: float32 (the file quantizes its input and dequantizes "
                   "its outputs itself); int8/uint8 for callers whose data is already integer.")
@click.option("--tflite-output-bits", type=click.Choice(["8", "16"]), default=None,
              help="16: the ops computing an int8 .tflite's outputs run with int16 activations (16x8) and the outputs are int16 "
                   "(no ties between close logits); 8: int8 outputs. Default: the target's (see README).")
@click.option("--tflite-speed-check/--no-tflite-speed-check", "tflite_speed_check", default=None,
              help="Int8 .tflite: time each compute layer's int8 and float kernels here (XNNPACK) and keep float those whose int8 "
                   "kernel is slower, when the file gets faster (default on; off: every layer int8, e.g. for an NPU delegate or "
                   "a device whose CPU differs from this one).")
@_data_options
@click.option("--min-accuracy", default=None, help="Gate, e.g. 'top1_agreement>=0.90' or 'OUTPUT:cosine>=0.99'; default: a task-aware gate for every output; 'none' for no gate.")
@click.option("--output-kind", "output_kinds", multiple=True, metavar="NAME=KIND", help="The kind of an output (classification, embedding, dense, sequence, detection, labels, generic) where inferring it is not right.")
@click.option("--metric", default=None, metavar="MODULE:FUNCTION", help="Your own accuracy metric: f(reference, candidate, labels) -> {name: number}; gates can name its figures.")
@click.option("--auto-fallback", is_flag=True, help="INT8 below the gate: keep in float the fewest layers that make it pass (one set for every target, searched on the Q/DQ graph).")
@click.option("--max-float-layers", type=click.IntRange(0), default=None, help="At most this many float layers for --auto-fallback (default 16).")
@_exclusion_options
@_weight_type_option
@_weight_rounding_option
@_smoothquant_option
@_equalize_option
@click.option("--trt-profile", "profiles", multiple=True, metavar="DIM=MIN,OPT,MAX", help="TensorRT optimization profile per symbolic dim (default batch=1,8,32 sequence=1,128,512).")
@click.option("--workspace-mb", type=click.IntRange(64), default=4096, show_default=True, help="TensorRT workspace limit.")
@click.option("--builder", "tensorrt_builder", type=click.Choice(["api", "trtexec"]), default="api", show_default=True, help="TensorRT: build through the Python API, or with trtexec (same flags; its timings go into the manifest).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Runtime threads for every artifact (default: each artifact's fastest count, see --tune-threads).")
@click.option("--tune-threads/--no-tune-threads", default=None,
              help="Time each CPU artifact at its runtime's default thread count, half the cores and one, and keep the fastest in its "
                   "manifest (default on; measured on this machine; off: the runtime's default, every core).")
@click.option("--bench/--no-bench", default=True, show_default=True, help="With several artifacts: benchmark them into one report (JSON, Markdown, HTML).")
@click.option("--source-row/--no-source-row", default=True, show_default=True, help="The report starts with the source model in its own framework (PyTorch eager and torch.compile, or Keras).")
@click.option("--profile", "show_profile", is_flag=True, help="Print where the build's time went: seconds per stage and per cell, and how often each stage ran (also in report.json).")
@click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="The artifact folder (one target x precision) or the root of several.")
@click.option("--config", "-c", type=click.Path(exists=True, dir_okay=False), is_eager=True, expose_value=False, callback=_load_config,
              help="YAML file whose keys are these options (targets, precisions, calib_method, ...); flags given on the command line win. "
                   "With `models:` (and `machines:`) it is a build matrix, run on --executor.")
@_executor_options
@_with_run_limit
@_source_options
def build(model, targets, precisions, tflite_io, tflite_output_bits, tflite_speed_check, table, calib_method, calib_data, num_samples, eval_data, min_accuracy, output_kinds, metric,
          auto_fallback, max_float_layers, exclude_node, exclude_op, exclude_after, keep_first_last_float, weight_type, weight_rounding, smoothquant, equalize, profiles, workspace_mb, tensorrt_builder, threads, tune_threads, bench, source_row, show_profile, output,
          executor, address, workers, source) -> None:
    """Build target x precision artifacts (calibrating once for INT8), each gated on accuracy.

    A target whose library or hardware is absent is listed as skipped with the reason when
    several are asked for; asked for alone, it is an error (exit 2). A matrix file (-c with
    `models:`) or --executor fans the cells out over worker processes or a Ray cluster.
    """
    from enginekit import api
    from enginekit.builder import BuildOptions
    from enginekit.core.console import markdown_table
    from enginekit.quantization.pipeline import QuantizeSettings
    from enginekit.targets.tensorrt.builder import parse_dim_ranges

    target_list = [t.strip() for t in targets.split(",") if t.strip()]
    precision_list = [p.strip() for p in precisions.split(",") if p.strip()]
    target_options = {"tensorrt": {"profile": parse_dim_ranges(profiles), "workspace_mb": workspace_mb, "builder": tensorrt_builder},
                      "tflite": {**({"io": tflite_io} if tflite_io else {}), **({"output_bits": int(tflite_output_bits)} if tflite_output_bits else {}),
                                 **({"speed_check": tflite_speed_check} if tflite_speed_check is not None else {})}}
    options = BuildOptions(table=table, calib_method=calib_method, calib_data=calib_data, num_samples=num_samples, eval_data=eval_data,
                           min_accuracy=min_accuracy, output_kinds=_pairs(output_kinds, "--output-kind"), metric=metric, threads=threads, tune_threads=tune_threads,
                           auto_fallback=auto_fallback, max_float_layers=max_float_layers, target_options=target_options,
                           quantize=QuantizeSettings(weight_type=weight_type, smoothquant=smoothquant, weight_rounding=weight_rounding,
                                                     equalize=equalize, exclude_nodes=tuple(exclude_node), exclude_ops=tuple(exclude_op),
                                                     exclude_after=tuple(exclude_after) or None, keep_first_last_float=keep_first_last_float),
                           weights=source.weights, input_shapes=source.input_shapes, opset=source.opset,
                           allow_unsafe_keras=source.allow_unsafe_keras)
    matrix = click.get_current_context().meta.get("matrix")
    if matrix is not None or executor is not None:
        _build_matrix(model, matrix, target_list, precision_list, output, options, executor or "local", address, workers)
        return
    if model is None:
        raise click.UsageError("Missing option '--model' (or a matrix file with `models:`, given with -c).")
    if len(target_list) == 1 and len(precision_list) == 1 and not show_profile:
        _echo_build(api.build(model, target_list[0], precision_list[0], output, options))
        return
    cells = api.build_many(model, target_list, precision_list, output, options)
    profile = cells[0].profile if cells else None
    rows = []
    for cell in cells:
        if cell.skipped or cell.failed:
            rows.append([cell.target, cell.precision, "skipped" if cell.skipped else "FAILED", cell.skipped or _hinted(cell.failed, cell.option, "build")])
            continue
        cached = " (cache hit)" if cell.result.cache_hit else ""
        rows.append([cell.target, cell.precision, f"{cell.folder}{cached}", _accuracy_cell(cell.manifest)])
    click.echo(markdown_table(["target", "precision", "artifact", "accuracy vs FP32 / reason skipped or failed"], rows))
    built = [c.folder for c in cells if c.result is not None]
    if show_profile and profile:
        click.echo("\n" + _profile_text(profile))
    if bench and built:
        from enginekit.benchmark.files import write_report
        from enginekit.benchmark.harness import BenchSettings
        from enginekit.benchmark.report import markdown

        report = api.bench(built, settings=BenchSettings(threads=threads), source=model if source_row else None, source_options=source)
        report["skipped"] = [{"target": c.target, "precision": c.precision, "reason": c.skipped} for c in cells if c.skipped] + report["skipped"]
        report["failed"] = [{"target": c.target, "precision": c.precision, "reason": c.failed} for c in cells if c.failed]
        report["build_profile"] = profile
        paths = write_report(report, Path(output) / "report.json")
        click.echo("\n" + markdown(report))
        click.echo(f"\nreport: {paths[0]} (HTML: {paths[2]})")
    failed = [c for c in cells if c.failed]
    if failed:
        click.echo(f"enginekit: error: {len(failed)} of {len(cells)} artifact(s) failed: "
                   + "; ".join(f"{c.target} {c.precision}" for c in failed), err=True)
        sys.exit(1)


def _build_matrix(model, matrix, targets, precisions, output, options, executor, address, workers) -> None:
    """`build` over an executor: a matrix file's models, or the one --model."""
    from enginekit import api
    from enginekit.builder.matrix import matrix_document, matrix_markdown, parse_matrix
    from enginekit.core.errors import InputError

    if matrix is not None and model is not None:
        raise InputError("give --model or a matrix file's models, not both", matrix[0])
    if matrix is None and model is None:
        raise click.UsageError("Missing option '--model' (or a matrix file with `models:`, given with -c).")
    models, machines = (parse_matrix(matrix[1], options, matrix[0].parent, matrix[0]) if matrix is not None else (model, {}))
    result = api.build_matrix(models, targets, precisions, output, options, executor=executor, address=address, workers=workers,
                              machines=machines)
    document = matrix_document(result)
    for row in document["cells"]:  # a failed cell's reason gets the flag that fixes it, as the one-machine build table's do
        row["reason"] = row["reason"] and _hinted(row["reason"], row["option"], "build")
    click.echo(matrix_markdown(document))
    click.echo(f"matrix report: {result.written[0]} ({result.written[1].name}); benchmark the artifacts with `enginekit bench`")
    if result.failed:
        click.echo(f"enginekit: error: {len(result.failed)} of {len(result.cells)} cell(s) failed: "
                   + "; ".join(f"{c.model} {c.target} {c.precision}" for c in result.failed), err=True)
        sys.exit(1)


@cli.command()
@click.option("--model", "-m", required=True, help="Export artifact folder, .onnx file, or zoo name.")
@click.option("--targets", "--target", "targets", default="onnxruntime", show_default=True, help="Comma-separated: whose INT8 encodings to rank on.")
@_data_options
@click.option("--min-accuracy", default=None, help="The gate the margins are measured against (default: the task-aware gate).")
@click.option("--output-kind", "output_kinds", multiple=True, metavar="NAME=KIND", help="The kind of an output where inferring it is not right.")
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Also write the ranking as JSON here.")
@_with_run_limit
@_source_options
def sensitivity(model, targets, table, calib_method, calib_data, num_samples, eval_data, min_accuracy, output_kinds, threads, output, source) -> None:
    """Rank layers by what keeping each in float gains against the accuracy gate (no build).

    Each unit (the op computing a quantized tensor and the ops reading it quantized) is kept float
    alone on the INT8 Q/DQ graph, run in the reference executor; `build --auto-fallback` adds
    units in this order until the gate passes.
    """
    from enginekit import api
    from enginekit.builder import BuildOptions
    from enginekit.core.console import markdown_table

    options = BuildOptions(table=table, calib_method=calib_method, calib_data=calib_data, num_samples=num_samples, eval_data=eval_data,
                           min_accuracy=min_accuracy, output_kinds=_pairs(output_kinds, "--output-kind"), threads=threads,
                           weights=source.weights, input_shapes=source.input_shapes, opset=source.opset,
                           allow_unsafe_keras=source.allow_unsafe_keras)
    result = api.sensitivity(model, [t.strip() for t in targets.split(",") if t.strip()], output, options)
    click.echo(f"{result['model']} all-INT8 ({', '.join(result['encodings'])}): {result['all_int8']} (gate margin {result['all_int8_margin']:+.4f})")
    rows = [[", ".join(r["float_layers"]), f"{r['margin_gain']:+.4f}", r["metrics"]] for r in result["ranking"][:20]]
    click.echo(markdown_table(["kept float (alone)", "margin gain", "accuracy on the first batch"], rows))
    if output:
        click.echo(f"ranking: {output}")


def _profile_text(profile: dict[str, Any]) -> str:
    """The build profile as two tables: every stage (exclusive seconds, runs) and every cell."""
    from enginekit.core.console import markdown_table

    stages = [[name, seconds, profile["counts"].get(name, 0)] for name, seconds in profile["stages"].items()]
    stages.append(["(outside the stages: planning, gates, manifests, publishing)", profile["wall_s"] - sum(profile["stages"].values()), "-"])
    names = sorted({stage for per_cell in profile["cells"].values() for stage in per_cell})
    cells = [[cell, *[per_cell.get(name, 0.0) for name in names]] for cell, per_cell in profile["cells"].items()]
    return (f"build profile (wall {profile['wall_s']:.1f} s; a stage's seconds exclude the stages nested in it)\n\n"
            + markdown_table(["stage", "seconds", "runs"], stages) + "\n\n" + markdown_table(["cell", *[f"{n} s" for n in names]], cells))


def _pairs(values, option: str) -> dict[str, str]:
    """NAME=VALUE options as a dict (the value after the last '=': names may contain '=')."""
    pairs = {}
    for value in values:
        name, sep, kind = value.rpartition("=")
        if not sep or not name:
            raise click.BadParameter(f"'{value}' is not NAME=VALUE", param_hint=option)
        pairs[name] = kind
    return pairs


def _accuracy_cell(manifest: dict[str, Any]) -> str:
    from enginekit.accuracy.metrics import headline

    return headline(manifest["accuracy"]["metrics"])


def _echo_build(result) -> None:
    manifest = result.manifest
    cached = " (cache hit)" if result.cache_hit else ""
    click.echo(f"wrote {result.folder} ({manifest['target']} {manifest['precision']}){cached}")
    metrics = manifest["accuracy"]["metrics"]
    outputs = metrics.get("outputs") or {"": metrics}
    for name, output in outputs.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in output.items() if k not in ("samples", "finite", "kind"))
        what = f" {name} ({output.get('kind')})" if name else ""
        which = "held-out samples" if manifest["accuracy"].get("held_out", True) else "samples of the calibration data"
        click.echo(f"accuracy vs FP32 on {int(metrics['samples'])} {which}{what}: {shown}")
    if metrics.get("user"):
        click.echo("user metric: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics["user"].items()))
    if "quantization" in manifest:
        calibration = manifest.get("calibration", {})
        click.echo(f"INT8 from the {manifest['quantization'].get('encoding')} encoding, {calibration.get('method')} ranges")
    if "integer_ops" in manifest:
        ops = manifest["integer_ops"]
        click.echo(f"ONNX Runtime runs {ops['integer_compute_ops']}/{ops['compute_ops']} compute ops as integer kernels")
    executed = manifest.get("openvino", {}).get("executed")
    if executed:
        click.echo(f"OpenVINO executes {executed['compute_layers']} compute layers as {executed['by_precision']}")
    if "layer_report" in manifest:
        import json

        from enginekit.quantization.report import format_layer_report

        click.echo(format_layer_report(json.loads((Path(result.folder) / manifest["layer_report"]).read_text())))


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), default="report.json", show_default=True, help="Report JSON (a .md rendering is written beside it).")
@click.option("--threads", type=click.IntRange(1), default=None, help="Runtime threads (default: the count each artifact's build measured fastest, else all cores); recorded.")
@click.option("--batch-sizes", default="1,4,16", show_default=True, help="Throughput sweep (dynamic-batch artifacts).")
@click.option("--min-iterations", type=click.IntRange(1), default=50, show_default=True)
@click.option("--min-seconds", type=click.FloatRange(0), default=2.0, show_default=True, help="Batch-1 latency time per artifact, all rounds together.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True, help="Latency slices per artifact, interleaved across the artifacts.")
@click.option("--cpus", default=None, help="Pin each benchmark process to these cores, e.g. 0,1 (recorded either way).")
@click.option("--source", "source_model", default=None, metavar="MODEL", help="The model the artifacts were built from (zoo name, factory, Keras file, export folder): its framework's rows come first.")
@_source_options
def bench(artifacts, output, threads, batch_sizes, min_iterations, min_seconds, rounds, cpus, source_model, source) -> None:
    """Benchmark artifact folders the same way and write one report (JSON, Markdown, HTML)."""
    from enginekit import api
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.benchmark.report import markdown
    from enginekit.core.outputs import report_paths

    sizes = tuple(_integers(batch_sizes, "--batch-sizes", "integers"))
    cores = _integers(cpus, "--cpus", "core numbers") if cpus else None
    settings = BenchSettings(threads=threads, batch_sizes=sizes, min_iterations=min_iterations, min_seconds=min_seconds, rounds=rounds, cpus=cores)
    report = api.bench(artifacts, output, settings, source=source_model, source_options=source)
    json_path, md_path, html_path = report_paths(output)
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
    from enginekit import api

    result = api.compare(old, new, max_regression, max_accuracy_drop, min_effect)
    click.echo(result.render())
    if result.failures:
        sys.exit(1)


@cli.command()
def targets() -> None:
    """Every registered target: its precisions, INT8 encoding, and whether it can build here."""
    from enginekit.core.console import markdown_table
    from enginekit.targets.registry import get_target, target_names

    rows = []
    for name in target_names():
        target = get_target(name)
        reasons = {p: target.unavailable(p) for p in target.precisions}
        here = [p for p, reason in reasons.items() if reason is None]
        missing = next((r for r in reasons.values() if r), "")
        rows.append([name, ", ".join(target.precisions), target.encoding, ", ".join(here) or "none", missing])
    click.echo(markdown_table(["target", "precisions", "int8 encoding", "buildable here", "why not"], rows))


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
        click.echo(f"  parameters : {spec.parameters or spec.parameter_count():,}")
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
@click.option("--threads", type=click.IntRange(1), default=None, help="ONNX Runtime threads (default: all cores).")
def demo(output, threads) -> None:
    """Export every zoo model and print parity and ONNX Runtime FP32 batch-1 latency."""
    from enginekit.benchmark.demo import run_demo

    click.echo(run_demo(Path(output), threads))


@cli.group(invoke_without_command=True)
@click.option("--check", "check", type=click.Path(), default=None, metavar="REPO", help="Check an existing Triton or OVMS repository (any, also one written by hand); exit 1 on a problem.")
@click.pass_context
def deploy(ctx, check) -> None:
    """Model-server repositories from artifact folders: `deploy triton`, `deploy ovms`, `deploy --check REPO`."""
    if check is not None:
        _echo_check(check)
    elif ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _echo_check(folder: str) -> None:
    from enginekit import api

    result = api.check_deployment(folder)
    click.echo("\n".join(result.lines()))
    if not result.ok:
        bad = sum(1 for problems in result.problems.values() if problems)
        click.echo(f"enginekit: error: {folder}: {bad} model(s) of this {result.service} repository have problems", err=True)
        sys.exit(1)


def _deploy_options(command):
    command = click.option("--name", "names", multiple=True, metavar="ARTIFACT=NAME", help="Model name of an artifact (default <model>-<target>-<precision>).")(command)
    command = click.option("--output", "-o", type=click.Path(file_okay=False), required=True, help="The repository folder (new, or one to add models to).")(command)
    return click.argument("artifacts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))(command)


@deploy.command("triton")
@_deploy_options
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Benchmark report whose best batch sizes dynamic batching prefers (default: report.json beside the artifacts).")
@click.option("--plan-tensorrt", "plan_tensorrt", multiple=True, type=click.Path(exists=True, file_okay=False), metavar="ARTIFACT",
              help="Also write the config of the TensorRT engine that would be built from this ONNX Runtime artifact's graph (marked planned; repeatable).")
@click.option("--max-batch-size", type=click.IntRange(1), default=None, help="Largest batch Triton forms (default: a TensorRT profile's largest, else 16).")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="Instances per model (instance_group count).")
@click.option("--threads", type=click.IntRange(1), default=None, help="OpenVINO INFERENCE_NUM_THREADS (default: the cores of the machine that built it).")
def deploy_triton(artifacts, output, names, report, plan_tensorrt, max_batch_size, instances, threads) -> None:
    """Write a Triton model repository: config.pbtxt and a version folder per artifact."""
    from enginekit import api
    from enginekit.deploy import TritonOptions

    options = TritonOptions(max_batch_size=max_batch_size, instances=instances, threads=threads)
    models = api.deploy_triton(artifacts, output, options, report, _pairs(names, "--name"), plan_tensorrt)
    _echo_deployed(models, output)


@deploy.command("ovms")
@_deploy_options
@click.option("--threads", type=click.IntRange(1), default=None, help="INFERENCE_NUM_THREADS in each model's plugin_config (default: OpenVINO's).")
def deploy_ovms(artifacts, output, names, threads) -> None:
    """Write an OpenVINO Model Server repository: a folder per model and config.json."""
    from enginekit import api

    _echo_deployed(api.deploy_ovms(artifacts, output, _pairs(names, "--name"), threads), output)


def _echo_deployed(models, output: str) -> None:
    from enginekit.core.console import markdown_table

    from enginekit.core.errors import MissingDependencyError

    rows = [[m.name, m.version, "planned" if m.planned else ("same build, kept" if m.reused else "new"), str(m.artifact.folder)] for m in models]
    click.echo(markdown_table(["model", "version", "version is", "from artifact"], rows))
    try:
        _echo_check(output)
    except MissingDependencyError as exc:  # written from the manifests; the proto check needs tritonclient
        click.echo(f"enginekit: note: the configs were not parsed with Triton's own proto: {exc}", err=True)


def _safe_name(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).stem if model) or "model"


def _message(exc: EnginekitError, argv: list[str]) -> str:
    """The error's own line, plus the flag that fixes it where the error names a setting."""
    return _hinted(str(exc), exc.option, next((a for a in argv if not a.startswith("-")), ""))


def _hinted(line: str, option: str | None, command: str) -> str:
    """`line` plus the flag of `command` that sets `option`, where it has one."""
    flag = {**_FLAGS, **_COMMAND_FLAGS.get(command, {})}.get(option or "")
    known = cli.commands.get(command)
    if flag and known is not None and not any(flag in param.opts for param in known.params):
        flag = None  # a setting this command does not take (build has no --skip-nonfinite): no flag to point at
    return f"{line} (see {flag})" if flag and flag not in line else line


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to one line plus an exit code."""
    import signal
    import threading

    from enginekit.core.progress import reporting
    from enginekit.core.console import ProgressPrinter, print_warnings_on_one_line
    from enginekit.core.interrupt import install_signal_wakeup, request_stop, stop_requested

    # TensorFlow's C++ start-up chatter would bury enginekit's one-line messages
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("ENGINEKIT_DEBUG"))
    args = [a for a in args if a != "--debug"]
    if debug:  # the library raises unexpected errors where they happen (a build's cells no longer catch them)
        os.environ["ENGINEKIT_DEBUG"] = "1"
    if not debug:
        print_warnings_on_one_line()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)  # SIGTERM unwinds like Ctrl-C: nothing partial is left
        signal.signal(signal.SIGINT, request_stop)
        install_signal_wakeup()  # Ctrl-C and SIGTERM reach runs inside native code too
    try:
        with reporting(ProgressPrinter(sys.stderr)):
            cli.main(args=args, prog_name="enginekit", standalone_mode=False)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _exit_interrupted()
    except Exception as exc:
        if stop_requested():  # a library turned the interrupt into an error of its own (torch.onnx does)
            _exit_interrupted()
        _exit_with_error(exc, args, debug)


def _exit_interrupted() -> None:
    click.echo("enginekit: interrupted", err=True)
    sys.exit(130)


def _exit_with_error(exc: Exception, args: list[str], debug: bool) -> None:
    """One line for the error and its exit code; the traceback only with --debug."""
    if isinstance(exc, EnginekitError):
        click.echo(f"enginekit: error: {_message(exc, args)}", err=True)
        sys.exit(exc.exit_code)
    if isinstance(exc, click.ClickException):
        exc.show()
        sys.exit(exc.exit_code)
    if debug:
        raise exc
    if isinstance(exc, OSError):  # a full disk, a read-only or missing folder, a file we may not read
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"enginekit: error: {where}{exc.strerror or type(exc).__name__}", err=True)
        sys.exit(2)
    # a bug or an unforeseen library failure
    click.echo(f"enginekit: error: {unexpected_line(exc)}", err=True)
    sys.exit(2)
