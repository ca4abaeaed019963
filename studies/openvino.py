"""Study: OpenVINO FP32 (f32 hint), BF16, INT8 (enginekit) and INT8 (nncf.quantize, default
preset, the same 256 calibration crops) on efficientnet_lite0, side by side in one run.

    python -m studies.openvino [--eval-samples 1024] [--json out.json]

Latency and throughput come from the product harness (`enginekit.benchmark`): each IR in its own
process, batch-1 latency in rounds interleaved across the IRs, throughput over batch sizes and
OpenVINO streams. Accuracy: the product metrics against the FP32 ONNX on held-out crops; 1024 by
default because at 256 crops one crop is 0.39 point and the 95 % interval is about +-2.5 points.
The ONNX Runtime INT8 artifact built from the same CalibrationTable is scored on the same crops.
"""

from __future__ import annotations

import argparse
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-samples", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="artifacts/benchmarks/openvino.json")
    args = parser.parse_args()

    import enginekit as ek
    from enginekit.accuracy import collect_outputs
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.builder import BuildOptions
    from enginekit.core.artifacts import read_manifest
    from enginekit.core.console import markdown_table
    from enginekit.exporter.reference import load_fp32
    from enginekit.models.spec import iter_batches
    from enginekit.onnx.session import Session
    from enginekit.targets import openvino as ov_target
    from studies.common import latency_by_name, score, wrap_artifact, work_folder, write_json

    fp32 = load_fp32(MODEL)
    work = work_folder("ek-ov-study-")
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    log("calibrating once (256 crops, minmax)...")
    table = ek.calibrate(MODEL, None, methods=["minmax"], num_samples=256, output=work / "ranges.json").written[0]
    options = BuildOptions(table=table)
    precisions = {"FP32 (f32 hint)": "fp32", "INT8 enginekit": "int8"}
    if "BF16" in ov_target.device_info()["capabilities"]:
        precisions["BF16"] = "bf16"
    folders: dict[str, Path] = {}
    for name, precision in precisions.items():
        log(f"building OpenVINO {precision}...")
        folders[name] = ek.build(MODEL, "openvino", precision, work / precision, options).folder
    log("building ONNX Runtime int8 from the same table...")
    ort_int8 = ek.build(MODEL, "onnxruntime", "int8", work / "ort-int8", options).folder
    log("running nncf.quantize (default preset, same 256 crops)...")
    nncf_files = _nncf_ir(fp32.path, fp32.spec.dataset().samples("calibration", 256)["image"], work / "nncf-raw")
    manifest = read_manifest(folders["INT8 enginekit"])
    folders["INT8 NNCF"] = wrap_artifact(work / "nncf", {"model.xml": nncf_files / "model.xml", "model.bin": nncf_files / "model.bin"},
                                         MODEL, "openvino", "int8", manifest["inputs"], manifest["outputs"], "nncf.quantize (default preset)")
    order = ["FP32 (f32 hint)", *(["BF16"] if "BF16" in folders else []), "INT8 enginekit", "INT8 NNCF"]

    log(f"scoring accuracy on {args.eval_samples} held-out crops...")
    batches = list(iter_batches(fp32.spec.dataset(), "evaluation", args.eval_samples, 32))
    reference = collect_outputs(Session(fp32.path).run, batches)
    accuracy = {name: score(reference, ek.load(folders[name]), batches) for name in order}
    accuracy["ORT INT8 (same table)"] = score(reference, ek.load(ort_int8), batches)
    executed = {name: ov_target.executed_precisions(ek.load(folders[name]).compiled) for name in order}

    log("measuring latency and throughput with the product harness (interleaved rounds)...")
    report = ek.bench([folders[name] for name in order], settings=BenchSettings(rounds=args.rounds, min_seconds=2.0 * args.rounds / 5))
    entries = latency_by_name(report, order)

    results = {"model": MODEL, "eval_samples": args.eval_samples, "device": ov_target.device_info(), "rows": {}}
    rows = []
    for name in order:
        entry = {"latency_p50_ms": entries[name]["latency_ms"]["p50_ms"], "throughput_per_s": entries[name]["best_throughput_per_s"],
                 "size_mb": entries[name]["size_mb"], "top1_agreement": accuracy[name].get("top1_agreement"),
                 "top5_overlap": accuracy[name].get("top5_overlap"), "executed": executed[name]["by_precision"]}
        results["rows"][name] = entry
        rows.append([name, entry["latency_p50_ms"], entry["throughput_per_s"], entry["top1_agreement"], entry["top5_overlap"],
                     entry["size_mb"], str(entry["executed"])])
    ort_row = accuracy["ORT INT8 (same table)"]
    results["rows"]["ORT INT8 (same table)"] = {"top1_agreement": ort_row["top1_agreement"], "top5_overlap": ort_row["top5_overlap"]}
    rows.append(["ORT INT8 (same table)", None, None, ort_row["top1_agreement"], ort_row["top5_overlap"], None, "-"])
    print(f"\nOpenVINO {results['device']['openvino']} on {results['device']['full_name']}, {MODEL}, accuracy on {args.eval_samples} held-out crops\n")
    print(markdown_table(["artifact", "latency p50 ms", "throughput /s", "top-1 agreement", "top-5 overlap", "size MB", "executed compute layers"], rows))
    r = results["rows"]
    speedup = r["FP32 (f32 hint)"]["latency_p50_ms"] / r["INT8 enginekit"]["latency_p50_ms"]
    vs_nncf = r["INT8 enginekit"]["latency_p50_ms"] / r["INT8 NNCF"]["latency_p50_ms"]
    gap = abs(r["INT8 enginekit"]["top1_agreement"] - ort_row["top1_agreement"]) * 100
    print(f"\nINT8 enginekit vs FP32: {speedup:.2f}x faster; latency vs NNCF INT8: {vs_nncf:.3f}x")
    print(f"top-1 agreement: enginekit {r['INT8 enginekit']['top1_agreement']:.4f} vs NNCF {r['INT8 NNCF']['top1_agreement']:.4f}; "
          f"vs ORT INT8 from the same table {ort_row['top1_agreement']:.4f}: {gap:.2f} points apart")
    results["ratios"] = {"int8_speedup_vs_fp32": speedup, "latency_vs_nncf": vs_nncf, "top1_gap_vs_ort_points": gap}
    write_json(args.json, results)


if __name__ == "__main__":
    main()
