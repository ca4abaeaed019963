"""Benchmark: how long an INT8 build takes against the peers' single-purpose quantizers, in one run.

    python -m studies.build_speed [--samples 256] [--rounds 1] [--jobs JOB,...] [--json out.json]

On efficientnet_lite0's FP32 ONNX (exported once beforehand, not timed) with the same calibration
crops, each job in a process of its own, the jobs interleaved round by round (this machine's
speed drifts by tens of percent over minutes):
- enginekit build --precisions int8 --no-bench for onnxruntime,openvino and for
  onnxruntime,openvino,tflite (an empty output folder: nothing reused), with its --profile;
- enginekit's calibration alone (all four methods from one pass);
- nncf.quantize (its default: min-max statistics and fast bias correction) on the ONNX model;
- onnxruntime.quantization.quantize_static, MinMax, QDQ.
Prints the table (wall seconds, ratio to nncf.quantize and to quantize_static) and writes JSON
(default artifacts/benchmarks/build_speed.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "efficientnet_lite0"
JOBS = ("enginekit ort+ov", "enginekit ort+ov+tflite", "enginekit calibrate (4 methods)", "nncf.quantize", "ort quantize_static MinMax")


def _crops(samples: int):
    from enginekit.models import get_spec

    return get_spec(MODEL).dataset().samples("calibration", samples)["image"]


def _worker(job: str, samples: int, out: Path) -> dict:
    """One job in this (fresh) process; returns its wall seconds and, for builds, the profile."""
    from enginekit.exporter.reference import load_fp32

    fp32 = load_fp32(MODEL)
    start = time.perf_counter()
    profile = None
    if job.startswith("enginekit ort"):
        import enginekit as ek

        targets = ["onnxruntime", "openvino"] + (["tflite"] if "tflite" in job else [])
        options = ek.BuildOptions(num_samples=samples)
        cells = ek.build_many(MODEL, targets, ["int8"], out / "build", options)
        failed = [c for c in cells if c.result is None]
        if failed:
            raise SystemExit(f"{job}: {failed[0].target} {failed[0].failed or failed[0].skipped}")
        profile = cells[0].profile
    elif job.startswith("enginekit calibrate"):
        import enginekit as ek

        ek.calibrate(MODEL, None, methods=["minmax", "percentile", "entropy", "mse"], num_samples=samples)
    elif job == "nncf.quantize":
        import nncf
        import onnx

        crops = _crops(samples)
        dataset = nncf.Dataset([crops[i : i + 1] for i in range(len(crops))], lambda x: {"image": x})
        quantized = nncf.quantize(onnx.load(str(fp32.path)), dataset, subset_size=samples)
        onnx.save(quantized, str(out / "nncf.onnx"))
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from studies.common import ort_calibration_reader

        quantize_static(str(fp32.path), str(out / "ort.onnx"), ort_calibration_reader("image", _crops(samples)), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return {"seconds": time.perf_counter() - start, "profile": profile}


def _run(job: str, samples: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="build-speed-") as out:
        done = subprocess.run([sys.executable, "-m", "studies.build_speed", "--worker", job, "--samples", str(samples), "--out", out],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{job} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default="artifacts/benchmarks/build_speed.json")
    parser.add_argument("--jobs", default=",".join(JOBS), help="comma-separated subset of the jobs (nncf.quantize and quantize_static are always run: the ratios need them)")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.samples, Path(args.out))))
        return
    from enginekit.exporter.reference import load_fp32

    load_fp32(MODEL)  # the export, once, outside the timings
    wanted = set(args.jobs.split(",")) | set(JOBS[-2:])
    unknown = wanted - set(JOBS)
    if unknown:
        raise SystemExit(f"unknown job(s) {sorted(unknown)}; known: {', '.join(JOBS)}")
    jobs = [job for job in JOBS if job in wanted]
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    for round_index in range(args.rounds):
        for job in jobs:
            runs[job].append(_run(job, args.samples))
            print(f"round {round_index + 1}: {job}: {runs[job][-1]['seconds']:.1f} s", file=sys.stderr)
    seconds = {job: statistics.median(r["seconds"] for r in results) for job, results in runs.items()}
    nncf_s, ort_s = seconds["nncf.quantize"], seconds["ort quantize_static MinMax"]
    print(f"\n{MODEL}, {args.samples} calibration samples, median of {args.rounds} round(s), each job in its own process\n")
    print("| job | wall s | x nncf.quantize | x quantize_static MinMax |")
    print("|---|---:|---:|---:|")
    for job in jobs:
        print(f"| {job} | {seconds[job]:.1f} | {seconds[job] / nncf_s:.1f} | {seconds[job] / ort_s:.1f} |")
    for job in [j for j in jobs if j.startswith("enginekit ort")]:
        profile = runs[job][-1]["profile"] or {}
        stages = ", ".join(f"{name} {value:.1f} s" for name, value in (profile.get("stages") or {}).items())
        print(f"\nprofile of {job} (last round): {stages}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": MODEL, "samples": args.samples, "rounds": args.rounds, "seconds": seconds, "runs": runs}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
