"""`python -m corpus`: every corpus model through export -> calibrate -> build for each target x
precision, the built artifacts benchmarked together, and the matrix written (JSON + Markdown)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = ("onnxruntime", "openvino", "tflite")
PRECISIONS = ("fp32", "int8")


def run_model(entry, out: Path, targets, precisions, samples: int, bench: bool, auto_fallback: bool = False,
              calib_method: str = "auto", equalize: bool = False, weight_rounding: str = "gptq") -> list[dict[str, Any]]:
    """One model's cells: built or the one-line reason, with accuracy, speed-up and integer share."""
    import enginekit as ek
    from enginekit.accuracy.metrics import headline
    from enginekit.benchmark.harness import BenchSettings
    from enginekit.benchmark.report import speedups
    from enginekit.core.errors import EnginekitError
    from enginekit.exporter.reference import SourceOptions, load_fp32
    from enginekit.quantization.pipeline import QuantizeSettings

    started = time.perf_counter()
    cells = [{"model": entry.name, "target": t, "precision": p, "status": "failed", "reason": None} for t in targets for p in precisions]
    try:
        model = entry.source()
        weights = entry.weights() if entry.weights else None
        fp32 = load_fp32(model, SourceOptions(weights, entry.input_shapes))
        folder = out / entry.name
        data_files = {}
        for split, count in (("calibration", samples), ("evaluation", samples)):
            arrays = entry.data(split, count)
            if set(arrays) == {"input"} and len(fp32.inputs) == 1:  # a single input, whatever the model calls it
                arrays = {fp32.inputs[0].name: arrays["input"]}
            data_files[split] = folder / "data" / f"{split}.npz"
            data_files[split].parent.mkdir(parents=True, exist_ok=True)
            np.savez(data_files[split], **arrays)
        options = ek.BuildOptions(calib_data=str(data_files["calibration"]), eval_data=str(data_files["evaluation"]), num_samples=samples,
                                  weights=weights, input_shapes=entry.input_shapes, output_kinds=entry.output_kinds, auto_fallback=auto_fallback,
                                  calib_method=calib_method, quantize=QuantizeSettings(equalize=equalize, weight_rounding=weight_rounding))
        built = ek.build_many(model, list(targets), list(precisions), folder / "artifacts", options)
    except EnginekitError as exc:
        for cell in cells:
            cell["reason"] = str(exc)
        return cells
    by_key = {(c["target"], c["precision"]): c for c in cells}
    folders = []
    for outcome in built:
        cell = by_key[(outcome.target, outcome.precision)]
        if outcome.result is None:
            cell.update(status="skipped" if outcome.skipped else "failed", reason=outcome.skipped or outcome.failed)
            continue
        manifest = outcome.manifest
        cell.update(status="built", accuracy=headline(manifest["accuracy"]["metrics"]), integer_share=manifest.get("integer_share"),
                    calibration=(manifest.get("calibration") or {}).get("method"),
                    float_layers=(manifest.get("fallback") or {}).get("float_layers", []), float_ops=float_ops(manifest),
                    outputs={name: {k: v for k, v in m.items()} for name, m in manifest["accuracy"]["metrics"].get("outputs", {}).items()})
        folders.append((cell, outcome.folder))
    if bench and folders:
        settings = BenchSettings(batch_sizes=(1,), min_iterations=20, min_seconds=1.5, rounds=10)
        try:
            report = ek.bench([f for _, f in folders], settings=settings)
        except EnginekitError as exc:
            report = None
            for cell, _ in folders:
                cell["bench_error"] = str(exc)
        if report is not None:
            ratio = speedups(report["artifacts"])
            for index, ((cell, _), entry_report) in enumerate(zip(folders, report["artifacts"])):
                cell.update(p50_ms=entry_report["latency_ms"]["p50_ms"], speedup=ratio[index], shapes=entry_report["latency_shapes"])
    for cell in cells:
        cell["model_seconds"] = round(time.perf_counter() - started, 1)
    return cells


def short_reason(cell: dict[str, Any], width: int = 230) -> str:
    """The one-line reason without what the row already says (the model's file or name, the cell)."""
    reason = cell["reason"] or ""
    head, _, rest = reason.partition(": ")
    if rest and (" " not in head or head.endswith(f"{cell['target']} {cell['precision']}")):
        reason = rest
    reason = reason.replace("accuracy gate failed by the task-aware default gate (which can be turned off)", "below the default gate")
    return reason if len(reason) <= width else reason[: width - 3] + "..."


def _counts(ops: dict[str, int], most: int = 4) -> str:
    listed = sorted(ops.items(), key=lambda item: -item[1])
    return ", ".join(f"{op} x{count}" for op, count in listed[:most]) + (" ..." if len(listed) > most else "")


def float_ops(manifest: dict[str, Any]) -> str:
    """What an INT8 cell computes in float, with the reason its build recorded: the matrix says
    why a cell is not all-integer instead of leaving a share below 100 % unexplained."""
    from collections import Counter

    if manifest.get("precision") != "int8":
        return ""
    tflite = manifest.get("tflite")
    if tflite:
        ops = Counter((tflite.get("types") or {}).get("float32_compute_ops") or [])
        delegate = (tflite.get("float_for_xnnpack") or {})
        for_xnnpack = Counter(delegate.get("ops") or {}) if delegate.get("chosen") else Counter()
        speed = (tflite.get("float_for_speed") or {})
        for_speed = Counter(speed.get("ops") or {}) if speed.get("chosen") else Counter()
        rest = ops - for_xnnpack - for_speed
        parts = [f"{_counts(for_xnnpack)} (XNNPACK runs only their float kernel)"] if for_xnnpack else []
        parts += [f"{_counts(for_speed)} (int8 kernel slower on this CPU)"] if for_speed else []
        if rest:
            hub = (tflite.get("hub_float_ops") or {}).get("chosen")
            parts.append(f"{_counts(rest)} ({'float as in the Q/DQ hub: more accurate on LiteRT' if hub else 'no int8 kernel'})")
        return "; ".join(parts)
    islands = (manifest.get("integer_ops") or {}).get("float_islands")
    if islands:
        return f"{_counts(islands)} (float between integer ops in ONNX Runtime)"
    executed = (manifest.get("openvino") or {}).get("executed") or {}
    f32 = {p: n for p, n in (executed.get("by_precision") or {}).items() if not p.startswith(("u8", "i8", "u4", "i4"))}
    return f"{_counts(f32)} layers (OpenVINO's executed precisions)" if f32 else ""


def markdown(cells: list[dict[str, Any]]) -> str:
    from enginekit.core.console import markdown_table

    rows = []
    for cell in cells:
        if cell["status"] != "built":
            rows.append([cell["model"], cell["target"], cell["precision"], cell["status"].upper(), short_reason(cell), "-", "-", "-"])
            continue
        share = cell.get("integer_share")
        share = f"{share:.0%}" if isinstance(share, (int, float)) else "-"
        if cell.get("float_layers"):  # kept float by --auto-fallback: say so and which
            share += f" ({len(cell['float_layers'])} float by fallback: {', '.join(cell['float_layers'][:3])}{' ...' if len(cell['float_layers']) > 3 else ''})"
        if cell.get("float_ops"):
            share += f"; float: {cell['float_ops']}"
        accuracy = cell["accuracy"] + (f" [{cell['calibration']}]" if cell.get("calibration") else "")  # INT8: the ranges' method
        rows.append([cell["model"], cell["target"], cell["precision"], "built", accuracy,
                     f"{cell['speedup']:.2f}x" if cell.get("speedup") else "-", share,
                     f"{cell['p50_ms']:.3f}" if cell.get("p50_ms") else "-"])
    return markdown_table(["model", "target", "precision", "result", "accuracy vs FP32 / reason", "speed-up vs FP32", "integer ops", "p50 ms"],
                          rows, escape=True)


def summary(cells: list[dict[str, Any]]) -> str:
    built = [c for c in cells if c["status"] == "built"]
    int8 = [c for c in built if c["precision"] == "int8"]
    faster = [c for c in int8 if (c.get("speedup") or 0) > 1.0]
    fallback = [c for c in int8 if c.get("float_layers")]
    return (f"{len(built)} of {len(cells)} cells built and passed their gates; INT8 faster than FP32 in {len(faster)} of "
            f"{len(int8)} built INT8 cells" + (f"; {len(fallback)} INT8 cells keep layers float by --auto-fallback" if fallback else ""))


def main(argv: list[str] | None = None) -> int:
    from corpus.models import BY_NAME, ENTRIES

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default=",".join(e.name for e in ENTRIES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--samples", type=int, default=128, help="calibration and evaluation samples each")
    parser.add_argument("--out", default="artifacts/corpus")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--calib-method", default="auto", help="calibration method for every model (default auto: chosen per model)")
    parser.add_argument("--auto-fallback", action="store_true", help="INT8 below its gate keeps the fewest float layers that pass (build --auto-fallback)")
    parser.add_argument("--equalize", action="store_true", help="cross-layer equalisation before calibrating (build --equalize)")
    parser.add_argument("--weight-rounding", default="gptq", choices=["gptq", "gptaq", "nearest"], help="INT8 weight integers (build --weight-rounding)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BY_NAME))
    if unknown:
        print(f"corpus: unknown model(s) {', '.join(unknown)} (known: {', '.join(BY_NAME)})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cells: list[dict[str, Any]] = []
    for name in names:
        print(f"[corpus] {name}: {BY_NAME[name].what}", file=sys.stderr, flush=True)
        cells += run_model(BY_NAME[name], out, args.targets.split(","), args.precisions.split(","), args.samples, not args.no_bench,
                           args.auto_fallback, args.calib_method, args.equalize, args.weight_rounding)
    result = {"models": names, "targets": args.targets.split(","), "precisions": args.precisions.split(","), "samples": args.samples,
              "auto_fallback": args.auto_fallback, "calib_method": args.calib_method, "equalize": args.equalize,
              "weight_rounding": args.weight_rounding,
              "seconds": round(time.perf_counter() - started, 1), "summary": summary(cells), "cells": cells}
    (out / "matrix.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = markdown(cells) + f"\n\n{result['summary']}; {result['seconds']:.0f} s in all.\n"
    (out / "matrix.md").write_text(text)
    print(text)
    print(f"wrote {out / 'matrix.json'} and {out / 'matrix.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
