"""Benchmark: TFLite fp32, fp16 and int8 (enginekit) for efficientnet_lite0 and digits_keras, plus
the plain TFLite converter's own full-int8 (representative dataset, its min-max) of digits_keras,
side by side in one run.

    python -m enginekit.benchmarks.tflite [--threads 2] [--json out.json]

Latency: batch 1, LiteRT interpreter with XNNPACK, `--threads` threads, rounds interleaved across
the artifacts of a model (median of rounds). Accuracy: against the FP32 ONNX on the held-out
split (digits: the labelled 540-image test split; efficientnet: 256 crops), all through the same
float-in / float-out runner, so integer I/O is quantized with each file's own parameters.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS = ("efficientnet_lite0", "digits_keras")


def plain_converter_int8(model_name: str, samples: int = 256) -> bytes:
    """What a user gets from the TFLite converter alone: full-int8 with a representative dataset."""
    import tensorflow as tf

    from enginekit.export.reference import load_fp32

    fp32 = load_fp32(model_name)
    keras_model = fp32.keras_model()
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model.owner)
    calibration = fp32.spec.dataset().samples("calibration", samples)
    name = keras_model.inputs[0].name
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[name][i : i + 1]] for i in range(samples))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="artifacts/benchmarks/tflite.json")
    args = parser.parse_args()

    from enginekit.benchmarks.latency import measure_latency
    from enginekit.build import BuildOptions, build
    from enginekit.console import markdown_table
    from enginekit.engines.onnxruntime import OrtRunner
    from enginekit.engines.tflite.runner import MODEL_FILE, TfliteRunner
    from enginekit.export.reference import load_fp32
    from enginekit.models.spec import iter_batches
    from enginekit.quantize.accuracy import evaluate

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="ek-tflite-bench-"))
    results: dict = {"threads": args.threads, "models": {}}
    rows = []
    for model in MODELS:
        fp32 = load_fp32(model)
        dataset = fp32.spec.dataset()
        labels_available = dataset.labels("evaluation", 1) is not None
        count = dataset.size("evaluation") if labels_available else 256
        artifacts: dict[str, tuple[TfliteRunner, int]] = {}
        for precision in ("fp32", "fp16", "int8"):
            log(f"{model}: building tflite {precision}...")
            folder = work / f"{model}-{precision}"
            build(model, "tflite", precision, folder, BuildOptions())
            artifacts[f"{precision} enginekit" if precision == "int8" else precision] = (
                TfliteRunner((folder / MODEL_FILE).read_bytes(), threads=args.threads), (folder / MODEL_FILE).stat().st_size)
        if fp32.is_keras:
            log(f"{model}: plain TFLite converter full-int8 (representative dataset, its min-max)...")
            plain = plain_converter_int8(model)
            artifacts["int8 plain converter"] = (TfliteRunner(plain, threads=args.threads), len(plain))
        reference = OrtRunner(fp32.path)
        batches = list(iter_batches(dataset, "evaluation", count, 32))
        labels = dataset.labels("evaluation", count) if labels_available else None
        one = dataset.samples("evaluation", 1)
        accuracy, latency = {}, {name: [] for name in artifacts}
        for name, (runner, _) in artifacts.items():
            accuracy[name] = evaluate(reference.infer, runner.infer, batches, labels)  # outputs compared by position
        log(f"{model}: latency, {args.rounds} interleaved rounds...")
        for _ in range(args.rounds):
            for name, (runner, _) in artifacts.items():
                latency[name].append(measure_latency(lambda r=runner: r.infer(one), min_seconds=2.0).p50_ms)
        entries = {}
        for name, (runner, size) in artifacts.items():
            metrics = accuracy[name]
            entry = {"latency_p50_ms": float(np.median(latency[name])), "size_mb": size / 1e6,
                     "top1_agreement": metrics.get("top1_agreement"), "accuracy": metrics.get("accuracy"),
                     "fp32_accuracy": metrics.get("fp32_accuracy")}
            entries[name] = entry
            rows.append([model, name, entry["latency_p50_ms"], entry["size_mb"], entry["top1_agreement"], entry["accuracy"]])
        entries["int8_speedup_vs_fp32"] = entries["fp32"]["latency_p50_ms"] / entries["int8 enginekit"]["latency_p50_ms"]
        results["models"][model] = entries
    print(f"\nTFLite (ai-edge-litert, XNNPACK, {args.threads} threads), batch-1 latency median of {args.rounds} interleaved rounds\n")
    print(markdown_table(["model", "artifact", "latency p50 ms", "size MB", "top-1 agreement", "task accuracy"], rows))
    for model in MODELS:
        print(f"{model}: int8 is {results['models'][model]['int8_speedup_vs_fp32']:.2f}x faster than fp32 (goal >= 1.6x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
