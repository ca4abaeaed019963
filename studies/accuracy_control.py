"""Study: enginekit's `--auto-fallback` against NNCF's `quantize_with_accuracy_control` on the same
model, data and gate, side by side in one run.

    python -m studies.accuracy_control [--gate 0.98] [--eval-samples 1024] [--rounds 3] [--max-float-layers 16]
        [--weight-rounding gptq|gptaq|nearest] [--only enginekit|nncf] [--json out.json]

efficientnet_lite0; calibration: the zoo's 256 calibration crops for both; the gate: top-1
agreement with the FP32 model >= `--gate` on the same `--eval-samples` held-out crops, which both
searches also judge on (NNCF's validation set, enginekit's evaluation data).
- enginekit: `build --targets onnxruntime,openvino,tflite --precisions int8 --auto-fallback
  --min-accuracy top1_agreement>=GATE` (one float set for every target, searched once on the Q/DQ
  graph, then verified on each target's runtime);
- NNCF 3.x: `nncf.quantize_with_accuracy_control` on the OpenVINO model of the same FP32 ONNX,
  validation function = top-1 agreement with the FP32 model's predictions, `max_drop = 1 - GATE`
  (absolute; the FP32 model scores 1.0 on it).
Per artifact: the layers kept float (enginekit: the fallback's units, each a layer and its
quantized readers; both: the compute layers OpenVINO executes in float, read from the compiled
model the same way), top-1 agreement, batch-1 latency (product harness, interleaved rounds) and the
wall time of the search. Prints the table and writes JSON (default artifacts/benchmarks/accuracy_control.json).
`--only` runs one side (with OpenVINO FP32 beside it): each search can take the better part of an
hour at a high gate, and the two sides do not share state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

MODEL = "efficientnet_lite0"


def _nncf_accuracy_control(fp32_onnx: Path, calibration: np.ndarray, batches: list, agreed: np.ndarray, max_drop: float,
                           folder: Path) -> tuple[Path, float, int]:
    """NNCF's search; returns the IR folder, its wall seconds and how many validations it ran."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(fp32_onnx))
    calibration_set = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    items = [(batch["image"], agreed[start : start + len(batch["image"])])
             for batch, start in zip(batches, np.cumsum([0] + [len(b["image"]) for b in batches[:-1]]))]
    validation_set = nncf.Dataset(items, lambda item: item[0])
    calls = [0]

    def top1_agreement(compiled, data) -> float:
        calls[0] += 1
        output = compiled.outputs[0]
        hits = total = 0
        for images, labels in data:
            predicted = compiled(images)[output].argmax(axis=1)
            hits += int((predicted == labels).sum())
            total += len(labels)
        return hits / total

    started = time.perf_counter()
    quantized = nncf.quantize_with_accuracy_control(model, calibration_set, validation_set, validation_fn=top1_agreement,
                                                    max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration))
    seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(folder / "model.xml"), compress_to_fp16=False)
    return folder, seconds, calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", type=float, default=0.98)
    parser.add_argument("--eval-samples", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-float-layers", type=int, default=16, help="enginekit's bound (its build default: 16)")
    parser.add_argument("--weight-rounding", default="gptq", choices=["gptq", "gptaq", "nearest"], help="enginekit's (build --weight-rounding)")
    parser.add_argument("--only", choices=["enginekit", "nncf"], help="run one side only (the other's row is left out)")
    parser.add_argument("--json", default="artifacts/benchmarks/accuracy_control.json")
    args = parser.parse_args()

    import enginekit as ek
    from enginekit.accuracy import collect_outputs
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.core.artifacts import read_manifest
    from enginekit.core.console import markdown_table
    from enginekit.exporter.reference import load_fp32
    from enginekit.models.spec import iter_batches
    from enginekit.onnx.session import Session
    from enginekit.targets import openvino as ov_target
    from studies.common import latency_by_name, score, wrap_artifact, work_folder, write_json

    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    fp32 = load_fp32(MODEL)
    work = work_folder("ek-accuracy-control-")
    batches = list(iter_batches(fp32.spec.dataset(), "evaluation", args.eval_samples, 32))
    reference = collect_outputs(Session(fp32.path).run, batches)
    agreed = reference["logits"].argmax(axis=1)
    gate = f"top1_agreement>={args.gate}"

    folders: dict[str, Path] = {}
    failures: dict[str, str | None] = {}
    search_seconds: dict[str, float] = {}
    if args.only != "nncf":
        log(f"enginekit: build --auto-fallback --min-accuracy '{gate}' for onnxruntime, openvino, tflite...")
        options = ek.BuildOptions(num_samples=256, eval_samples=args.eval_samples, min_accuracy=gate, auto_fallback=True,
                                  max_float_layers=args.max_float_layers,
                                  quantize=ek.QuantizeSettings(weight_rounding=args.weight_rounding))
        started = time.perf_counter()
        cells = ek.build_many(MODEL, ["onnxruntime", "openvino", "tflite"], ["int8"], work / "enginekit", options)
        search_seconds["enginekit (3 targets, one search)"] = time.perf_counter() - started
        folders.update({f"enginekit {c.target}": c.folder for c in cells if c.result is not None})
        failures.update({f"enginekit {c.target}": c.failed or c.skipped for c in cells if c.result is None})
        log(f"enginekit: {search_seconds['enginekit (3 targets, one search)']:.0f} s; failed: {failures or 'none'}")

    validations = None
    if args.only != "enginekit":
        log(f"NNCF: quantize_with_accuracy_control, max_drop {1 - args.gate:.3f} (absolute)...")
        calibration = fp32.spec.dataset().samples("calibration", 256)["image"]
        nncf_raw, nncf_s, validations = _nncf_accuracy_control(fp32.path, calibration, batches, agreed, 1 - args.gate,
                                                               work / "nncf-raw")
        search_seconds["NNCF (OpenVINO)"] = nncf_s
        log(f"NNCF: {nncf_s:.0f} s, {validations} validations")
    ov_fp32 = ek.build(MODEL, "openvino", "fp32", work / "openvino-fp32", ek.BuildOptions(eval_samples=args.eval_samples)).folder
    if args.only != "enginekit":
        manifest = read_manifest(ov_fp32)
        folders["NNCF openvino"] = wrap_artifact(work / "nncf", {"model.xml": nncf_raw / "model.xml", "model.bin": nncf_raw / "model.bin"},
                                                 MODEL, "openvino", "int8", manifest["inputs"], manifest["outputs"],
                                                 "nncf.quantize_with_accuracy_control")
    folders["openvino fp32"] = ov_fp32

    rows, results = [], {"model": MODEL, "gate": gate, "eval_samples": args.eval_samples, "device": ov_target.device_info(),
                         "weight_rounding": args.weight_rounding,
                         "search_seconds": search_seconds,
                         "nncf_validations": validations, "failed": failures, "rows": {}}
    names = [n for n in ("enginekit onnxruntime", "enginekit openvino", "enginekit tflite", "NNCF openvino", "openvino fp32") if n in folders]
    log("measuring latency with the product harness (interleaved rounds)...")
    report = ek.bench([folders[n] for n in names], settings=BenchSettings(rounds=args.rounds, min_seconds=2.0 * args.rounds / 5))
    entries = latency_by_name(report, names)
    for name in names:
        accuracy = score(reference, ek.load(folders[name]), batches)
        fallback = read_manifest(folders[name]).get("fallback") or {}
        executed = None
        if "openvino" in name:
            executed = ov_target.executed_precisions(ek.load(folders[name]).compiled)
        float_units = len(fallback.get("float_layers") or []) if name.startswith("enginekit") else None
        entry = {"top1_agreement": accuracy.get("top1_agreement"), "latency_p50_ms": entries[name]["latency_ms"]["p50_ms"],
                 "float_units": float_units, "executed": executed["by_precision"] if executed else None,
                 "float_compute_layers": (executed or {}).get("by_precision", {}).get("f32") if executed else None}
        results["rows"][name] = entry
        rows.append([name, "-" if float_units is None else float_units, entry["float_compute_layers"] if executed else "-",
                     entry["top1_agreement"], entry["latency_p50_ms"], str(entry["executed"] or "-")])
    searches = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in search_seconds.items())
    print(f"\n{MODEL}, gate {gate} on {args.eval_samples} held-out crops; searches: {searches}"
          f"{f' (NNCF: {validations} validations)' if validations is not None else ''}; {ov_target.device_info()['full_name']}\n")
    print(markdown_table(["artifact", "float units (enginekit)", "compute layers OpenVINO runs in f32", "top-1 agreement",
                          "latency p50 ms", "executed compute layers"], rows))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
