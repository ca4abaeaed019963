"""Fuzzing every command with mutations of good inputs: ONNX files, calibration data, tables,
manifests and reports (over 200 cases, seeded). Whatever the mutation, a command never prints a
traceback, never hangs, fails in exactly one line with exit 1 or 2, and leaves nothing behind;
a mutation known to break the input never exits 0, and one that happens to leave a valid input
produces a complete, verifiable result."""

from __future__ import annotations

import io
import json
import math
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

CASE_SECONDS = 120
RNG_SEED = 20261130


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, exported):
    """Good inputs to mutate: the digits export, calibration data, a table, an artifact, a report."""
    import enginekit as ek
    from enginekit.benchmark.harness import BenchSettings

    root = tmp_path_factory.mktemp("fuzz-seeds")
    folder, _ = exported("digits_cnn")
    data = root / "data.npz"
    from enginekit.models import get_spec

    np.savez(data, image=get_spec("digits_cnn").dataset().samples("calibration", 32)["image"])
    table = ek.calibrate(folder, str(data), methods=["minmax"], num_samples=32, output=root / "table.json").written[0]
    artifact = ek.build(folder, "onnxruntime", "fp32", root / "artifact").folder
    report = ek.bench([artifact], root / "report.json", BenchSettings(batch_sizes=(1,), min_iterations=20, min_seconds=0.05, rounds=1))
    return {"export": folder, "onnx": (folder / "model.onnx").read_bytes(), "data": data.read_bytes(), "table": json.loads(table.read_text()),
            "artifact": artifact, "report": report, "report_path": root / "report.json"}


def _byte_mutations(rng: np.random.Generator, good: bytes, count: int) -> list[tuple[str, bytes, bool]]:
    """(name, bytes, surely broken) mutations of a binary file."""
    cases = [("empty", b"", True), ("garbage", rng.bytes(len(good) // 3 + 1), True), ("text", b"not a model at all\n" * 40, True)]
    while len(cases) < count:
        kind = rng.integers(5)
        data = bytearray(good)
        if kind == 0:
            cut = int(rng.integers(1, len(data) - 1))
            cases.append((f"truncated at {cut}", bytes(data[:cut]), True))
        elif kind == 1:
            for _ in range(int(rng.integers(1, 20))):
                position = int(rng.integers(len(data)))
                data[position] = int(rng.integers(256))
            cases.append(("flipped bytes", bytes(data), False))
        elif kind == 2:
            start = int(rng.integers(len(data)))
            data[start:start + 64] = bytes(64)
            cases.append(("zeroed chunk", bytes(data), False))
        elif kind == 3:
            position = int(rng.integers(len(data)))
            cases.append(("inserted junk", bytes(data[:position]) + rng.bytes(int(rng.integers(1, 200))) + bytes(data[position:]), False))
        else:
            cases.append(("junk prefix", rng.bytes(16) + bytes(data), False))
    return cases[:count]


_WRONG_VALUES: list[object] = [None, "text", [], {}, -1, 0, 1e308, float("nan"), float("-inf"), True, "x" * 10_000, [[[]]]]


def _json_mutations(rng: np.random.Generator, good: dict, count: int) -> list[tuple[str, object, bool]]:
    """(name, document or raw text, surely broken) mutations of a JSON document."""
    def paths(node, prefix=()):
        if isinstance(node, dict):
            for key, value in node.items():
                yield prefix + (key,)
                yield from paths(value, prefix + (key,))
        elif isinstance(node, list) and node:
            yield prefix + (0,)
            yield from paths(node[0], prefix + (0,))

    all_paths = list(paths(good))
    cases: list[tuple[str, object, bool]] = [("invalid JSON", "{'schema': ", True), ("a list", "[1, 2, 3]", True),
                                             ("deep nesting", "[" * 50_000 + "]" * 50_000, True), ("no schema", {}, True)]
    while len(cases) < count:
        document = json.loads(json.dumps(good))
        path = all_paths[int(rng.integers(len(all_paths)))]
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.3:
            if isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent.clear()
            cases.append((f"dropped {'/'.join(map(str, path))}", document, False))
        else:
            value = _WRONG_VALUES[int(rng.integers(len(_WRONG_VALUES)))]
            parent[path[-1]] = value
            cases.append((f"{'/'.join(map(str, path))} = {str(value)[:20]}", document, False))
    return cases[:count]


def _write(path: Path, content: object) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return path


def _run_case(run_cli, args: list, out: Path | None, broken: bool, check_ok: Callable[[], None] | None = None):
    """One fuzz case under an alarm: no traceback, one-line failure, nothing left behind."""
    def hang(_signum, _frame):
        raise TimeoutError(f"enginekit {' '.join(map(str, args))} ran past {CASE_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(CASE_SECONDS)
    try:
        result = run_cli(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "Traceback" not in result.err, result.err
    assert result.code in (0, 1, 2), (result.code, result.err)
    if broken:
        assert result.code != 0, f"exit 0 on broken input: {args}"
    if result.code == 2 or (result.code == 1 and result.err.strip()):
        assert result.error_line.startswith("enginekit: error: "), result.err
    elif result.code == 1:  # compare's regression verdict: its table, then the failures
        assert "FAILED:" in result.out, result.out
        if out is not None:
            assert not out.exists(), f"{out} written on failure"
    elif check_ok is not None:
        check_ok()
    if out is not None:
        leftovers = [p.name for p in out.parent.iterdir() if ".staging-" in p.name or p.name.startswith(".tmp")]
        assert not leftovers, leftovers
    return result


def _verified(folder: Path) -> Callable[[], None]:
    def check() -> None:
        from enginekit.core.artifacts import read_manifest, verify_files

        verify_files(folder, read_manifest(folder))

    return check


def test_fuzz_onnx_files_into_export(run_cli, seeds, tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    for index, (name, content, broken) in enumerate(_byte_mutations(rng, seeds["onnx"], 60)):
        case = tmp_path / f"onnx{index}"
        case.mkdir()
        model = _write(case / "model.onnx", content)
        out = case / "out"
        _run_case(run_cli, ["export", "--model", model, "-o", out, "--timeout", "30"], out, broken, _verified(out))


def test_fuzz_calibration_data(run_cli, seeds, tmp_path):
    rng = np.random.default_rng(RNG_SEED + 1)
    cases = _byte_mutations(rng, seeds["data"], 30)
    good = np.load(io.BytesIO(seeds["data"]))["image"]
    arrays = {"wrong key": {"pixels": good}, "wrong dtype": {"image": good.astype(np.int32)}, "wrong shape": {"image": good[:, :, :4]},
              "NaN": {"image": np.full_like(good, np.nan)}, "no samples": {"image": good[:0]}, "scalar": {"image": np.float32(1)},
              "two inputs": {"image": good, "extra": good}, "ragged": {"image": good, "image2": good[:3]},
              "3e38": {"image": np.full_like(good, 3e38)}, "bool": {"image": good > 1}}
    for name, content in arrays.items():
        buffer = io.BytesIO()
        np.savez(buffer, **content)
        cases.append((name, buffer.getvalue(), name not in ("3e38",)))
    for index, (name, content, broken) in enumerate(cases):
        case = tmp_path / f"data{index}"
        case.mkdir()
        data = _write(case / "data.npz", content)
        out = case / "r.json"
        _run_case(run_cli, ["calibrate", "-m", seeds["export"], "--data", data, "-n", "16", "-o", out], out, broken)


def test_fuzz_tables_into_quantize(run_cli, seeds, tmp_path):
    rng = np.random.default_rng(RNG_SEED + 2)
    for index, (name, content, broken) in enumerate(_json_mutations(rng, seeds["table"], 45)):
        case = tmp_path / f"table{index}"
        case.mkdir()
        table = _write(case / "table.json", content)
        out = case / "q"
        _run_case(run_cli, ["quantize", "-m", seeds["export"], "-t", table, "--no-bias-correction", "--eval-samples", "32", "-o", out],
                  out, broken, _verified(out))


def test_fuzz_manifests_into_load(seeds, tmp_path):
    import enginekit as ek
    from enginekit.core.errors import EnginekitError

    rng = np.random.default_rng(RNG_SEED + 3)
    good = json.loads((seeds["artifact"] / "manifest.json").read_text())
    for index, (name, content, broken) in enumerate(_json_mutations(rng, good, 35)):
        folder = tmp_path / f"artifact{index}"
        shutil.copytree(seeds["artifact"], folder)
        _write(folder / "manifest.json", content)
        try:
            with ek.load(folder) as runner:
                outputs = runner.infer({"image": np.zeros((1, 1, 8, 8), np.float32)})
            assert not broken and all(np.isfinite(v).all() for v in outputs.values()), name
        except EnginekitError as exc:
            assert str(exc) and "\n" not in str(exc)


def test_fuzz_reports_into_compare(run_cli, seeds, tmp_path):
    rng = np.random.default_rng(RNG_SEED + 4)
    for index, (name, content, broken) in enumerate(_json_mutations(rng, seeds["report"], 45)):
        report = _write(tmp_path / f"report{index}.json", content)
        result = _run_case(run_cli, ["compare", seeds["report_path"], report], None, broken)
        if result.code == 0:  # a mutation compare accepts must still be a report it can trust
            entry = json.loads(report.read_text())["artifacts"][0]
            assert all(math.isfinite(v) and v > 0 for v in entry["latency_samples_ms"]), name
