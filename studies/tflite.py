"""Study: TFLite fp32, fp16 and int8 (enginekit) for efficientnet_lite0 and digits_keras, plus
the plain TFLite converter's own full-int8 (representative dataset, its min-max) of digits_keras,
side by side in one run.

    python -m studies.tflite [--threads 2] [--json out.json]

Latency: the product harness (`enginekit.benchmark`), batch 1, LiteRT with XNNPACK, `--threads`
threads, each artifact in its own process, rounds interleaved across the artifacts of a model. Accuracy: against the FP32 ONNX on the held-out
split (digits: the labelled 540-image test split; efficientnet: 256 crops), all through the same
float-in / float-out runner, so integer I/O is quantized with each file's own parameters.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MODELS = ("efficientnet_lite0", "digits_keras")


def plain_converter_int8(model_name: str, samples: int = 256) -> bytes:
    """What a user gets from the TFLite converter alone: full-int8 with a representative dataset."""
    import tensorflow as tf

    from enginekit.exporter.reference import load_fp32

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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="artifacts/benchmarks/tflite.json")
    args = parser.parse_args()

    import enginekit as ek
    from enginekit.accuracy import collect_outputs
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.core.artifacts import read_manifest
    from enginekit.core.console import markdown_table
    from enginekit.exporter.reference import load_fp32
    from enginekit.models.spec import iter_batches
    from enginekit.onnx.session import Session
    from studies.common import latency_by_name, score, wrap_artifact, work_folder, write_json

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    work = work_folder("ek-tflite-study-")
    results: dict = {"threads": args.threads, "models": {}}
    rows = []
    for model in MODELS:
        fp32 = load_fp32(model)
        dataset = fp32.spec.dataset()
        labels_available = dataset.labels("evaluation", 1) is not None
        count = dataset.size("evaluation") if labels_available else 256
        folders: dict[str, Path] = {}
        for precision in ("fp32", "fp16", "int8"):
            log(f"{model}: building tflite {precision}...")
            name = f"{precision} enginekit" if precision == "int8" else precision
            folders[name] = ek.build(model, "tflite", precision, work / f"{model}-{precision}").folder
        if fp32.is_keras:
            log(f"{model}: plain TFLite converter full-int8 (representative dataset, its min-max)...")
            manifest = read_manifest(folders["fp32"])
            folders["int8 plain converter"] = wrap_artifact(work / f"{model}-plain", {"model.tflite": plain_converter_int8(model)}, model,
                                                            "tflite", "int8", manifest["inputs"], manifest["outputs"], "tf.lite.TFLiteConverter")
        batches = list(iter_batches(dataset, "evaluation", count, 32))
        labels = dataset.labels("evaluation", count) if labels_available else None
        reference = collect_outputs(Session(fp32.path).run, batches)
        accuracy = {name: score(reference, ek.load(folder, threads=args.threads), batches, labels) for name, folder in folders.items()}
        log(f"{model}: latency with the product harness, {args.rounds} interleaved rounds...")
        report = ek.bench(folders.values(), settings=BenchSettings(threads=args.threads, batch_sizes=(1,), rounds=args.rounds))
        measured = latency_by_name(report, list(folders))
        entries = {}
        for name, metrics in accuracy.items():
            entry = {"latency_p50_ms": measured[name]["latency_ms"]["p50_ms"], "size_mb": measured[name]["size_mb"],
                     "top1_agreement": metrics.get("top1_agreement"), "accuracy": metrics.get("accuracy"),
                     "fp32_accuracy": metrics.get("fp32_accuracy")}
            entries[name] = entry
            rows.append([model, name, entry["latency_p50_ms"], entry["size_mb"], entry["top1_agreement"], entry["accuracy"]])
        entries["int8_speedup_vs_fp32"] = entries["fp32"]["latency_p50_ms"] / entries["int8 enginekit"]["latency_p50_ms"]
        results["models"][model] = entries
    print(f"\nTFLite (ai-edge-litert, XNNPACK, {args.threads} threads), batch-1 latency, {args.rounds} interleaved rounds\n")
    print(markdown_table(["model", "artifact", "latency p50 ms", "size MB", "top-1 agreement", "task accuracy"], rows))
    for model in MODELS:
        print(f"{model}: int8 is {results['models'][model]['int8_speedup_vs_fp32']:.2f}x faster than fp32")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
