"""Benchmark: enginekit's one-pass calibration vs ONNX Runtime's quantize_static, on
efficientnet_lite0 with the same 256 calibration crops, plus INT8 vs FP32 latency.

    python -m studies.calibration [--samples 256] [--json out.json]

Each calibration runs in its own process so wall time and peak RSS (VmHWM) belong to it alone.
Accuracy of every resulting INT8 model is scored against FP32 on the same 256 held-out crops.
Prints a table and writes JSON (default artifacts/benchmarks/calibration.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from enginekit.core.machine import process_memory_mb

MODEL = "efficientnet_lite0"
ORT_METHODS = ("MinMax", "Entropy", "Percentile")


def _worker(kind: str, samples: int, out: str) -> None:
    """Runs in a child process: one calibration, then prints {seconds, peak_rss_mb} as JSON."""
    import enginekit as ek
    from enginekit.exporter.reference import load_fp32

    fp32 = load_fp32(MODEL)
    baseline = process_memory_mb("VmHWM")
    start = time.perf_counter()
    if kind == "ours":
        ek.calibrate(MODEL, None, methods=["minmax", "percentile", "entropy", "mse"], num_samples=samples, output=Path(out) / "ranges.json")
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from studies.common import ort_calibration_reader

        crops = fp32.spec.dataset().samples("calibration", samples)["image"]
        quantize_static(str(fp32.path), str(Path(out) / f"ort_{kind}.onnx"), ort_calibration_reader("image", crops), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        calibrate_method=getattr(CalibrationMethod, kind))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": process_memory_mb("VmHWM"), "baseline_rss_mb": baseline}))


def _run_worker(kind: str, samples: int, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "studies.calibration", "--worker", kind, "--samples", str(samples), "--out", str(out)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--json", default="artifacts/benchmarks/calibration.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.samples, args.out)
        return

    import enginekit as ek
    from enginekit.accuracy import collect_outputs
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.builder import BuildOptions
    from enginekit.core.console import markdown_table
    from enginekit.exporter.reference import load_fp32
    from enginekit.onnx.session import Session
    from enginekit.targets.onnxruntime import OrtRunner
    from studies.common import score, work_folder, write_json

    fp32 = load_fp32(MODEL)  # export once, outside the timed runs
    results: dict = {"model": MODEL, "samples": args.samples, "calibration": {}, "accuracy": {}, "rss_scaling": {}}
    work = work_folder("ek-bench-")
    print(f"calibrating {MODEL} with {args.samples} crops (each run in its own process)...", file=sys.stderr)
    results["calibration"]["enginekit (4 methods, one pass)"] = _run_worker("ours", args.samples, work)
    for method in ORT_METHODS:
        results["calibration"][f"ORT quantize_static {method}"] = _run_worker(method, args.samples, work)
    for n in (64, 512):
        results["rss_scaling"][n] = _run_worker("ours", n, work / f"n{n}")
    ours = results["calibration"]["enginekit (4 methods, one pass)"]
    ort_total = sum(results["calibration"][f"ORT quantize_static {m}"]["seconds"] for m in ORT_METHODS)

    eval_feeds = fp32.spec.dataset().samples("evaluation", 256)
    batches = [{"image": eval_feeds["image"][i : i + 32]} for i in range(0, 256, 32)]
    reference = collect_outputs(Session(fp32.path, threads=2).run, batches)
    candidates = {}
    for method in ("minmax", "percentile", "entropy", "mse"):
        print(f"quantizing with {method} ranges + bias correction...", file=sys.stderr)
        out = work / f"q_{method}"
        ek.quantize(MODEL, work / f"ranges.{method}.json", out, options=BuildOptions(threads=2))
        candidates[f"enginekit {method}"] = out / "model.int8.onnx"
    for method in ORT_METHODS:
        candidates[f"ORT {method}"] = work / f"ort_{method}.onnx"
    for name, path in candidates.items():
        metrics = score(reference, OrtRunner(path, threads=2), batches)
        results["accuracy"][name] = {k: metrics[k] for k in ("top1_agreement", "top5_overlap", "cosine")}

    ek.build(MODEL, "onnxruntime", "fp32", work / "fp32", BuildOptions(threads=2))
    report = ek.bench([work / "fp32", work / "q_minmax"], settings=BenchSettings(threads=2, batch_sizes=(1,), rounds=5))
    fp32_entry, int8_entry = report["artifacts"]  # the product harness: own processes, interleaved rounds
    results["latency_ms"] = {"fp32_p50": fp32_entry["latency_ms"]["p50_ms"], "int8_p50": int8_entry["latency_ms"]["p50_ms"]}

    rows = [[name, r["seconds"], r["peak_rss_mb"] / 1024, r["baseline_rss_mb"] / 1024] for name, r in results["calibration"].items()]
    print(f"\nCalibration of {MODEL}, {args.samples} crops (wall time of the calibration call, peak RSS of its process)\n")
    print(markdown_table(["run", "seconds", "peak RSS GiB", "RSS after imports GiB"], rows))
    print(f"\nenginekit all 4 methods: {ours['seconds']:.1f} s vs ORT's three runs {ort_total:.1f} s -> {ort_total / ours['seconds']:.1f}x faster (goal >= 5x)")
    print(f"enginekit peak RSS {ours['peak_rss_mb'] / 1024:.2f} GiB (goal <= 1 GiB)")
    r64, r512 = results["rss_scaling"][64]["peak_rss_mb"], results["rss_scaling"][512]["peak_rss_mb"]
    print(f"peak RSS at N=512 / N=64: {r512:.0f} / {r64:.0f} MiB = {r512 / r64:.2f} (goal <= 1.3)")
    print("\nAccuracy vs FP32 on 256 held-out crops (enginekit rows include sequential bias correction)\n")
    print(markdown_table(["model", "top-1 agreement", "top-5 overlap", "cosine"], [[k, v["top1_agreement"], v["top5_overlap"], v["cosine"]] for k, v in results["accuracy"].items()]))
    lat = results["latency_ms"]
    print(f"\nONNX Runtime batch-1 latency, 2 threads: FP32 {lat['fp32_p50']:.2f} ms, INT8 {lat['int8_p50']:.2f} ms -> {lat['fp32_p50'] / lat['int8_p50']:.2f}x (goal >= 1.8x)")
    results["ratios"] = {"speedup_vs_ort": ort_total / ours["seconds"], "rss_512_over_64": r512 / r64, "int8_speedup": lat["fp32_p50"] / lat["int8_p50"]}
    write_json(args.json, results)


if __name__ == "__main__":
    main()
