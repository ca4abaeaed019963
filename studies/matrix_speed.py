"""Benchmark: the wall time of one build matrix run in one process, on local worker processes and
on a local Ray cluster, interleaved round by round.

    python -m studies.matrix_speed [--models digits_cnn,minilm_l6] [--rounds 2] [--workers 1,2] [--json out.json]

The matrix: the models x onnxruntime,openvino x fp32,int8 (64 calibration, 128 evaluation
samples), each run into an empty folder (nothing reused), each variant in a process of its own:
- sequential: `build_many` per model in one process (what `enginekit build` without --executor does);
- local N: `--executor local --workers N`;
- ray: `--executor ray` on a Ray instance the process starts with every core of this machine.
Every variant must build the same artifacts (build keys and file hashes are compared). Prints the
table (wall seconds, ratio to sequential) and writes JSON (default artifacts/benchmarks/matrix_speed.json).

What scales with nodes: after each model's first wave (export, calibration, bias correction: one
task per model, so models prepare in parallel but one model's calibration does not split; use
`calibrate --shards` for that), every cell is an independent task, so the second wave's wall
time is about (cells / parallel workers) x the slowest cell, plus each worker's start (a fresh
Python importing the runtimes: a few seconds) and the model load per cell. On one machine the
workers share its cores with the runtimes' own threads, which is why the ratio there is near or
above 1; a cluster adds cores (and GPU kinds) per node.
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

TARGETS = ["onnxruntime", "openvino"]
PRECISIONS = ["fp32", "int8"]


def _worker(variant: str, models: list[str], out: Path) -> dict:
    import enginekit as ek
    from enginekit.builder.matrix import MatrixModel

    for name in models:  # exported beforehand (the export cache): not part of what is timed
        from enginekit.exporter.reference import load_fp32

        load_fp32(name)
    options = ek.BuildOptions(num_samples=64, eval_samples=128)
    start = time.perf_counter()
    if variant == "sequential":
        for name in models:
            cells = ek.build_many(name, TARGETS, PRECISIONS, out / name, options)
            failed = [c for c in cells if c.result is None]
            if failed:
                raise SystemExit(f"{variant}: {name} {failed[0].target} {failed[0].failed or failed[0].skipped}")
    else:
        executor, _, workers = variant.partition(" ")
        result = ek.build_matrix([MatrixModel(n, n, options) for n in models], TARGETS, PRECISIONS, out, options,
                                 executor=executor, workers=int(workers) if workers else None)
        if result.failed:
            raise SystemExit(f"{variant}: {result.failed[0].model} {result.failed[0].target} {result.failed[0].cell.failed}")
    seconds = time.perf_counter() - start
    artifacts = {}
    for manifest in sorted(out.rglob("manifest.json")):
        document = json.loads(manifest.read_text())
        artifacts[str(manifest.parent.relative_to(out))] = [document["build_key"], [f["sha256"] for f in document["files"]]]
    return {"seconds": seconds, "artifacts": artifacts}


def _run(variant: str, models: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([sys.executable, "-m", "studies.matrix_speed", "--worker", variant, "--models", ",".join(models),
                               "--out", str(Path(folder) / "out")], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,minilm_l6")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="local worker counts to run")
    parser.add_argument("--json", default="artifacts/benchmarks/matrix_speed.json")
    parser.add_argument("--worker", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.worker:
        print(json.dumps(_worker(args.worker, models, Path(args.out))))
        return
    variants = ["sequential", *(f"local {n}" for n in args.workers.split(",") if n), "ray"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            runs[variant].append(_run(variant, models))
            print(f"round {round_index + 1}: {variant}: {runs[variant][-1]['seconds']:.1f} s", file=sys.stderr)
    reference = runs["sequential"][0]["artifacts"]
    identical = {v: all(r["artifacts"] == reference for r in runs[v]) for v in variants}
    seconds = {v: statistics.median(r["seconds"] for r in runs[v]) for v in variants}
    cells = len(models) * len(TARGETS) * len(PRECISIONS)
    print(f"\n{len(models)} models ({', '.join(models)}) x {', '.join(TARGETS)} x {', '.join(PRECISIONS)} = {cells} cells, "
          f"median of {args.rounds} round(s), each variant in its own process\n")
    print("| variant | wall s | x sequential | same artifacts as sequential |")
    print("|---|---:|---:|---|")
    for variant in variants:
        print(f"| {variant} | {seconds[variant]:.1f} | {seconds[variant] / seconds['sequential']:.2f} | {'yes' if identical[variant] else 'NO'} |")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"models": models, "targets": TARGETS, "precisions": PRECISIONS, "rounds": args.rounds,
                                "seconds": seconds, "identical": identical,
                                "runs": {v: [r["seconds"] for r in rs] for v, rs in runs.items()}}, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
