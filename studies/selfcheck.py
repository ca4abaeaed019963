"""Harness self-check: does `enginekit bench` measure what the runtimes' own tools measure?

    python -m studies.selfcheck [--seconds 10] [--json out.json]

On efficientnet_lite0 FP32, batch 1, 2 threads, in one run:
- ONNX Runtime: our runner timed by the harness vs a bare `InferenceSession.run` loop timed with
  time.perf_counter_ns (goal: medians within 5 %);
- OpenVINO: our runner (LATENCY hint = one stream, 2 threads, f32) vs OpenVINO's own
  `benchmark_app` on the same IR (one stream, 2 threads, f32; goal: medians within 10 %).
Every measurement runs in a process of its own (runtimes' thread pools interfere when they share
one). On a shared VM the machine's speed drifts by tens of percent over minutes, far more than
the gap being measured, so the two sides run in many short interleaved rounds and the gap is the
median of the per-round ratios (each ratio compares runs seconds apart, under the same drift).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MODEL = "efficientnet_lite0"
THREADS = 2


def _bare_ort_p50(path: Path, feeds: dict, seconds: float) -> float:
    import onnxruntime as ort

    from enginekit.core.loaders import load_onnx

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(load_onnx(path).SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, feeds)
    samples, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter_ns()
        session.run(None, feeds)
        samples.append(time.perf_counter_ns() - start)
    del session
    return float(np.median(samples)) / 1e6


def _bare_ort_in_process(path: Path, feeds_path: Path, seconds: float) -> float:
    """The bare loop in a fresh process of its own, like benchmark_app and `enginekit bench`."""
    code = ("import sys, numpy as np; from studies.selfcheck import _bare_ort_p50; "
            "from enginekit.core.loaders import load_arrays; "
            "print(_bare_ort_p50(__import__('pathlib').Path(sys.argv[1]), load_arrays(sys.argv[2]), float(sys.argv[3])))")
    result = subprocess.run([sys.executable, "-c", code, str(path), str(feeds_path), str(seconds)], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _benchmark_app_median(xml: Path, seconds: float) -> float:
    executable = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    # benchmark_app accepts -nthreads only with -hint none; one stream and 2 threads is what the
    # LATENCY hint with INFERENCE_NUM_THREADS=2 configures on our side
    command = [executable, "-m", str(xml), "-d", "CPU", "-hint", "none", "-nstreams", "1", "-nthreads", str(THREADS), "-infer_precision", "f32",
               "-api", "sync", "-t", str(int(seconds)), "-shape", "[1,3,224,224]"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"Median:\s+([0-9.]+)\s*ms", output)
    if not match:
        raise RuntimeError("benchmark_app printed no median latency")
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--root", default="artifacts/selfcheck")
    parser.add_argument("--json", default="artifacts/benchmarks/selfcheck.json")
    args = parser.parse_args()

    import enginekit as ek
    from enginekit.benchmark.harness import bench_feeds
    from enginekit.core.artifacts import read_manifest
    from enginekit.core.console import markdown_table

    root = Path(args.root)
    folders = {}
    for target in ("onnxruntime", "openvino"):
        folders[target] = root / f"{target}-fp32"
        ek.build(MODEL, target, "fp32", folders[target])  # reused when unchanged (build cache)
    ours: dict[str, list[float]] = {"onnxruntime": [], "openvino": []}
    theirs: dict[str, list[float]] = {"onnxruntime": [], "openvino": []}
    feeds = bench_feeds(read_manifest(folders["onnxruntime"]), 1, 128)
    bare_feeds = root / "feeds.npz"
    np.savez(bare_feeds, **feeds)

    def ours_p50(target: str) -> float:
        """`enginekit bench` on the artifact, in its own process like the references."""
        out = root / f"selfcheck-{target}.json"
        subprocess.run([sys.executable, "-m", "enginekit", "bench", str(folders[target]), "-o", str(out), "--threads", str(THREADS),
                        "--batch-sizes", "1", "--min-seconds", str(args.seconds)], check=True, capture_output=True)
        return json.loads(out.read_text())["artifacts"][0]["latency_ms"]["p50_ms"]

    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}...", file=sys.stderr)
        ours["onnxruntime"].append(ours_p50("onnxruntime"))
        theirs["onnxruntime"].append(_bare_ort_in_process(folders["onnxruntime"] / "model.onnx", bare_feeds, args.seconds))
        ours["openvino"].append(ours_p50("openvino"))
        theirs["openvino"].append(_benchmark_app_median(folders["openvino"] / "model.xml", args.seconds))
    goals = {"onnxruntime": 0.05, "openvino": 0.10}
    reference = {"onnxruntime": "bare session.run loop", "openvino": "benchmark_app"}
    rows, results = [], {}
    for target in ("onnxruntime", "openvino"):
        ratios = np.array(ours[target]) / np.array(theirs[target])
        gap = float(np.median(ratios)) - 1
        resampled = np.random.default_rng(0).choice(ratios, (2000, ratios.size))
        low, high = np.percentile(np.median(resampled, axis=1), [5, 95]) - 1  # how sure the median is
        within = abs(gap) <= goals[target]
        results[target] = {"enginekit_p50_ms": ours[target], "reference_p50_ms": theirs[target], "reference": reference[target],
                           "round_ratios": ratios.round(4).tolist(), "gap": gap, "gap_90ci": [float(low), float(high)],
                           "goal": goals[target], "within_goal": within}
        rows.append([target, reference[target], float(np.median(ours[target])), float(np.median(theirs[target])),
                     f"{(ratios.min() - 1) * 100:+.1f}% .. {(ratios.max() - 1) * 100:+.1f}%",
                     f"{gap * 100:+.1f}%", f"{low * 100:+.1f}% .. {high * 100:+.1f}%", f"±{goals[target] * 100:.0f}%", "yes" if within else "NO"])
    print(f"\n{MODEL} FP32, batch 1, {THREADS} threads, {args.rounds} interleaved rounds of {args.seconds:g} s per side\n")
    print(markdown_table(["runtime", "reference", "enginekit p50 ms", "reference p50 ms", "per-round gaps", "gap (median ratio)", "90 % interval", "goal", "within"], rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
