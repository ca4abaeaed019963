"""Benchmark: OpenVINO FP32 (f32 hint), BF16, INT8 (enginekit) and INT8 (nncf.quantize, default
preset, the same 256 calibration crops) on efficientnet_lite0, side by side in one run.

    python -m enginekit.benchmarks.openvino [--eval-samples 1024] [--json out.json]

Latency: batch 1, LATENCY hint, synchronous, rounds interleaved across the four IRs (median of
rounds). Throughput: THROUGHPUT hint with an AsyncInferQueue. Accuracy: top-1 agreement and
top-5 overlap with the FP32 ONNX on held-out crops; 1024 by default because at 256 crops one
crop is 0.39 point and the 95 % interval is about +-2.5 points, too coarse to compare runtimes.
The ONNX Runtime INT8 artifact built from the same CalibrationTable is scored on the same crops.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

MODEL = "efficientnet_lite0"


def _nncf_ir(fp32_onnx: Path, calibration: np.ndarray, folder: Path) -> Path:
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
    return folder


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.*") if p.suffix in (".xml", ".bin")) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-samples", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default="artifacts/benchmarks/openvino.json")
    args = parser.parse_args()

    from enginekit.benchmarks.latency import measure_latency
    from enginekit.build import build
    from enginekit.calibrate.pipeline import calibrate, write_tables
    from enginekit.console import markdown_table
    from enginekit.engines import openvino as ov_target
    from enginekit.engines.onnxruntime import OrtRunner
    from enginekit.export.reference import load_fp32
    from enginekit.models.spec import iter_batches
    from enginekit.quantize.accuracy import output_metrics

    fp32 = load_fp32(MODEL)
    work = Path(tempfile.mkdtemp(prefix="ek-ov-bench-"))
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    log("calibrating once (256 crops, minmax)...")
    run = calibrate(MODEL, None, ["minmax"], num_samples=256, progress=False)
    table = write_tables(run, work / "ranges.json")[0]
    from enginekit.build import BuildOptions

    folders: dict[str, Path] = {}
    precisions = {"FP32 (f32 hint)": "fp32", "INT8 enginekit": "int8"}
    if "BF16" in ov_target.device_info()["capabilities"]:
        precisions["BF16"] = "bf16"
    for name, precision in precisions.items():
        log(f"building OpenVINO {precision}...")
        folders[name] = work / precision
        build(MODEL, "openvino", precision, folders[name], BuildOptions(table=str(table)))
    log("building ONNX Runtime int8 from the same table...")
    build(MODEL, "onnxruntime", "int8", work / "ort-int8", BuildOptions(table=str(table)))
    log("running nncf.quantize (default preset, same 256 crops)...")
    folders["INT8 NNCF"] = _nncf_ir(fp32.path, fp32.spec.dataset().samples("calibration", 256)["image"], work / "nncf")
    order = ["FP32 (f32 hint)", *(["BF16"] if "BF16" in folders else []), "INT8 enginekit", "INT8 NNCF"]
    precision_of = {"FP32 (f32 hint)": "fp32", "BF16": "bf16", "INT8 enginekit": "int8", "INT8 NNCF": "int8"}

    runners = {name: ov_target.OpenVinoRunner(folders[name], precision_of[name], hint="LATENCY") for name in order}
    log(f"scoring accuracy on {args.eval_samples} held-out crops...")
    reference = OrtRunner(fp32.path)
    ort_int8 = OrtRunner(work / "ort-int8" / "model.int8.onnx")
    outputs: dict[str, list] = {name: [] for name in [*order, "ORT INT8 (same table)", "ref"]}
    for batch in iter_batches(fp32.spec.dataset(), "evaluation", args.eval_samples, 32):
        outputs["ref"].append(reference.infer(batch)[0])
        outputs["ORT INT8 (same table)"].append(ort_int8.infer(batch)[0])
        for name in order:
            outputs[name].append(runners[name].infer(batch)[0])
    ref = np.concatenate(outputs.pop("ref"))
    accuracy = {name: output_metrics(ref, np.concatenate(parts)) for name, parts in outputs.items()}

    one = {"image": fp32.spec.dataset().samples("evaluation", 1)["image"]}
    latencies: dict[str, list[float]] = {name: [] for name in order}
    log("measuring latency (interleaved rounds)...")
    for _ in range(args.rounds):
        for name in order:
            latencies[name].append(measure_latency(lambda r=runners[name]: r.infer(one), min_seconds=2.0).p50_ms)
    throughput = {}
    for name in order:
        runner = ov_target.OpenVinoRunner(folders[name], precision_of[name], hint="THROUGHPUT")
        throughput[name] = runner.throughput(one, seconds=3.0)
    executed = {name: ov_target.executed_precisions(runners[name].compiled) for name in order}

    results = {"model": MODEL, "eval_samples": args.eval_samples, "device": ov_target.device_info(), "rows": {}}
    rows = []
    for name in order:
        p50 = float(np.median(latencies[name]))
        entry = {"latency_p50_ms": p50, "throughput_per_s": throughput[name], "size_mb": _size_mb(folders[name]),
                 "top1_agreement": accuracy[name].get("top1_agreement"), "top5_overlap": accuracy[name].get("top5_overlap"),
                 "executed": executed[name]["by_precision"]}
        results["rows"][name] = entry
        rows.append([name, p50, throughput[name], entry["top1_agreement"], entry["top5_overlap"], entry["size_mb"], str(entry["executed"])])
    ort_row = accuracy["ORT INT8 (same table)"]
    results["rows"]["ORT INT8 (same table)"] = {"top1_agreement": ort_row["top1_agreement"], "top5_overlap": ort_row["top5_overlap"]}
    rows.append(["ORT INT8 (same table)", None, None, ort_row["top1_agreement"], ort_row["top5_overlap"], None, "-"])
    print(f"\nOpenVINO {results['device']['openvino']} on {results['device']['full_name']}, {MODEL}, accuracy on {args.eval_samples} held-out crops\n")
    print(markdown_table(["artifact", "latency p50 ms", "throughput /s", "top-1 agreement", "top-5 overlap", "size MB", "executed compute layers"], rows))
    r = results["rows"]
    speedup = r["FP32 (f32 hint)"]["latency_p50_ms"] / r["INT8 enginekit"]["latency_p50_ms"]
    vs_nncf = r["INT8 enginekit"]["latency_p50_ms"] / r["INT8 NNCF"]["latency_p50_ms"]
    gap = abs(r["INT8 enginekit"]["top1_agreement"] - ort_row["top1_agreement"]) * 100
    print(f"\nINT8 enginekit vs FP32: {speedup:.2f}x faster (goal >= 2x); latency vs NNCF INT8: {vs_nncf:.3f}x (goal <= 1.05x)")
    print(f"top-1 agreement: enginekit {r['INT8 enginekit']['top1_agreement']:.4f} vs NNCF {r['INT8 NNCF']['top1_agreement']:.4f} (goal >=); "
          f"vs ORT INT8 from the same table {ort_row['top1_agreement']:.4f}: {gap:.2f} points apart (goal <= 0.5)")
    results["ratios"] = {"int8_speedup_vs_fp32": speedup, "latency_vs_nncf": vs_nncf, "top1_gap_vs_ort_points": gap}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
