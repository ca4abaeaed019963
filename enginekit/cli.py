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
      enginekit zoo list                          # the reference models
      enginekit export --model efficientnet_lite0 -o out/onnx
      enginekit export --model mypkg.nets:build --weights w.safetensors --input-shape input=batchx3x224x224
      enginekit export --model model.onnx -o out/onnx   # validate + normalize an existing file
    """


@cli.command()
@click.option("--model", "-m", required=True, help="Zoo name, 'package.module:factory', or a path to a .onnx file.")
@click.option("--weights", "-w", type=click.Path(dir_okay=False), help="state_dict for the model: .safetensors (preferred) or .pt/.pth (weights only).")
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Artifact folder to write (default: artifacts/<model>/onnx).")
@click.option("--opset", type=click.IntRange(13, 25), help="ONNX opset (default 20 for PyTorch sources: the newest ONNX Runtime, OpenVINO and TensorRT 10 all read; an ONNX file keeps its own).")
@click.option("--dynamic-batch/--static-batch", default=True, show_default=True, help="Keep the batch dim symbolic, or fix it to 1.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS", help="Input shape, e.g. image=1x3x256x256 or input_ids=batchxsequence (repeatable). Required for factories.")
@click.option("--atol", type=float, default=None, help="Parity gate: largest allowed |onnx - source| (default 1e-3).")
@click.option("--min-cosine", type=float, default=None, help="Parity gate: smallest allowed cosine similarity (default 0.99999).")
def export(model, weights, output, opset, dynamic_batch, input_shapes, atol, min_cosine) -> None:
    """Export a model to ONNX, check it, and prove parity with its source."""
    from enginekit.export.parity import DEFAULT_MAX_ABS, DEFAULT_MIN_COSINE
    from enginekit.export.pipeline import ExportOptions, export_model

    options = ExportOptions(opset, dynamic_batch, DEFAULT_MAX_ABS if atol is None else atol, DEFAULT_MIN_COSINE if min_cosine is None else min_cosine)
    out = Path(output) if output else Path("artifacts") / _safe_name(model) / "onnx"
    manifest = export_model(model, out, weights, input_shapes, options)
    parity = manifest["parity"]
    io = ", ".join(f"{i['name']}{list(i['shape'])}" for i in manifest["inputs"])
    click.echo(f"wrote {out / 'model.onnx'} (opset {manifest['opset']}; inputs {io})")
    click.echo(f"parity vs {parity['reference']}: max_abs {parity['max_abs']:.3g}, cosine {parity['cosine']:.8f} over {len(parity['cases'])} case(s) - passed")


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


def _safe_name(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model).stem if model) or "model"


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to one line plus an exit code."""
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
