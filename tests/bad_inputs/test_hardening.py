"""What a hostile or careless user found (the hardening issue), each now a test: scripts in reports,
gates that passed on garbage, small files that asked for huge memory, hangs, tracebacks, wrong
exit codes, leftovers, tampering, and network access."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from enginekit.core.console import cell_text
from tests.conftest import assert_nothing_written

ROOT = Path(__file__).parents[2]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
            "ENGINEKIT_CACHE": os.environ.get("ENGINEKIT_CACHE", str(Path.home() / ".cache" / "enginekit")), **extra}


def _cli(tmp_path: Path, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enginekit", *map(str, args)], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(tmp_path, **env), timeout=timeout)


def _one_line(result, code: int = 2) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1 and "Traceback" not in result.stderr, (result.returncode, result.stderr)
    return lines[0]


# ---------------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def digits_fp32(tmp_path_factory):
    from enginekit.builder import build

    return build("digits_cnn", "onnxruntime", "fp32", tmp_path_factory.mktemp("hard") / "fp32").folder


def test_a_script_in_a_manifest_never_reaches_the_html_or_markdown(run_cli, digits_fp32, tmp_path):
    import shutil

    folder = tmp_path / "artifact"
    shutil.copytree(digits_fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["precision"] = "<script>alert(1)</script>"
    manifest["model"] = "m|<img src=x onerror=alert(2)>"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("bench", folder, "-o", tmp_path / "r.json", "--min-seconds", "0.05", "--min-iterations", "5", "--batch-sizes", "1", "--rounds", "1")
    assert result.code == 0, result.err
    page, text = (tmp_path / "r.html").read_text(), (tmp_path / "r.md").read_text()
    assert "<script" not in page.lower() and "<img" not in page and "&lt;script&gt;" in page
    assert "<script" not in text and "<img" not in text and "&lt;script>" in text
    assert "needs >=0.9" in cell_text("top1_agreement=0.8 (needs >=0.9)", escape=True)  # ">" opens nothing: a gate reads as written


def _report(tmp_path: Path, name: str, samples, accuracy: float = 0.9) -> Path:
    entry = {"model": "m", "target": "onnxruntime", "precision": "int8", "latency_samples_ms": samples,
             "latency_ms": {"p50_ms": 1.0, "p99_ms": 2.0}, "accuracy": {"top1_agreement": accuracy}, "size_mb": 1.0,
             "best_throughput_per_s": 10.0}
    path = tmp_path / name
    path.write_text(json.dumps({"schema": "enginekit.report/1", "artifacts": [entry], "machine": {}, "created": "now"}))
    return path


@pytest.mark.parametrize("samples, accuracy", [
    ([1.0] * 50, float("nan")), ([float("nan")] * 50, 0.9), ([], 0.9), ([-1.0] * 50, 0.9), ([1e308] * 50, 0.9),
    ("fast", 0.9), ([float("inf")] * 50, 0.9),
])
def test_compare_never_passes_garbage(run_cli, tmp_path, samples, accuracy):
    old = _report(tmp_path, "old.json", [1.0 + 0.01 * i for i in range(50)])
    new = _report(tmp_path, "new.json", samples, accuracy)
    result = run_cli("compare", old, new)
    assert result.code in (1, 2) and "Traceback" not in result.err
    if result.code == 2:
        assert "new.json" in result.error_line


@pytest.mark.parametrize("mutate", [
    lambda r: r["artifacts"][0].pop("latency_samples_ms"), lambda r: r["artifacts"][0].update(latency_ms="x"),
    lambda r: r.update(artifacts={"a": 1}), lambda r: r["artifacts"][0].update(model=["list"]),
])
def test_compare_refuses_malformed_reports_in_one_line(run_cli, tmp_path, mutate):
    old = _report(tmp_path, "old.json", [1.0] * 20)
    report = json.loads(old.read_text())
    mutate(report)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(report))
    result = run_cli("compare", old, bad)
    assert result.code == 2 and "bad.json" in result.error_line


def test_deeply_nested_json_is_one_line(run_cli, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"schema": "enginekit.report/1", "artifacts": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = run_cli("compare", deep, deep)
    assert result.code == 2 and "deep.json" in result.error_line


# ------------------------------------------------------------------------ memory bombs


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


# VmHWM is the peak of this process's own address space; ru_maxrss is not, since Linux carries
# it across exec from the forked copy of the (large) pytest process.
MEASURED = """
import sys
from enginekit.cli import main
try:
    main(sys.argv[2:])
finally:
    status = open("/proc/self/status").read()
    peak_kb = int(status.split("VmHWM:")[1].split()[0])
    open(sys.argv[1], "w").write(str(peak_kb / 1024))
"""


def _cli_peak_rss(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The command's result and the peak RSS (MiB) of its own process."""
    record = tmp_path / "peak-rss.txt"
    result = subprocess.run([sys.executable, "-c", MEASURED, str(record), *map(str, args)], capture_output=True, text=True,
                            cwd=tmp_path, env=_env(tmp_path, **env), timeout=300)
    return result, float(record.read_text())


def test_an_npz_bomb_is_refused_before_it_inflates(tmp_path):
    """A member that inflates far past the data budget (lowered here so the bomb stays small to
    make): refused from the archive's directory, in one line, the process staying small."""
    bomb = tmp_path / "bomb.npz"
    header = _npy_header((75_000_000,))
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header)
            zeros = bytes(1 << 24)
            for _ in range(300_000_000 // len(zeros)):
                member.write(zeros)
    assert bomb.stat().st_size < 2_000_000
    from tests.architecture.test_lean_core import _small_onnx

    _small_onnx(tmp_path / "small.onnx")  # an ONNX file: the measured process loads no framework, only what reading takes
    result, peak_mb = _cli_peak_rss(tmp_path, "calibrate", "-m", tmp_path / "small.onnx", "--data", bomb, "-o", tmp_path / "r.json",
                                    ENGINEKIT_MAX_DATA_BYTES=str(128 << 20))
    line = _one_line(result)
    assert "bomb.npz" in line and "limit" in line and not (tmp_path / "r.json").exists()
    assert peak_mb < 1024, peak_mb


def test_an_npy_header_asking_for_terabytes_is_refused(run_cli, tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_header((1_000_000, 1, 1_000_000)))
    result = run_cli("calibrate", "-m", "digits_cnn", "--data", path, "-o", tmp_path / "r.json")
    assert result.code == 2 and "huge.npy" in result.error_line and "TiB" in result.error_line


def test_a_yaml_alias_bomb_is_refused(run_cli, tmp_path):
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    config = tmp_path / "build.yaml"
    config.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    result = run_cli("build", "-c", config, "-m", "digits_cnn", "--target", "onnxruntime", "-o", tmp_path / "out")
    assert result.code == 2 and "aliases are not allowed" in result.error_line and time.perf_counter() - started < 10


def test_a_keras_config_bomb_is_refused(run_cli, tmp_path):
    pytest.importorskip("keras", reason="the keras extra is not installed")
    path = tmp_path / "bomb.keras"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", "{" + " " * (80 << 20) + "}")
        archive.writestr("metadata.json", "{}")
    result = run_cli("export", "--model", path, "-o", tmp_path / "out")
    assert result.code == 2 and "bomb.keras" in result.error_line and "limit" in result.error_line
    assert_nothing_written(tmp_path / "out")


def test_a_pt_zip_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            zeros = bytes(1 << 24)
            for _ in range(200_000_000 // len(zeros)):
                member.write(zeros)
    result = _cli(tmp_path, "export", "--model", "digits_cnn", "--weights", path, "-o", tmp_path / "out",
                  ENGINEKIT_MAX_DATA_BYTES=str(64 << 20))
    assert "bomb.pt" in _one_line(result) and not (tmp_path / "out").exists()


def test_huge_declared_dims_are_refused_before_allocation(run_cli, tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 100000, 100000, 100])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100000, 100000, 100])])
    path = tmp_path / "huge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = run_cli("export", "--model", path, "-o", tmp_path / "out")
    assert result.code == 2 and "TiB" in result.error_line and "'x'" in result.error_line


# --------------------------------------------------------------------------------- hangs


def _endless_loop(path: Path) -> Path:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph = helper.make_graph([helper.make_node("Loop", ["", "cond", "x"], ["y"], body=body)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor("cond", TensorProto.BOOL, [], [True])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_endless_loop_stops_at_the_timeout(tmp_path):
    model = _endless_loop(tmp_path / "loop.onnx")
    started = time.perf_counter()
    result = _cli(tmp_path, "export", "--model", model, "-o", tmp_path / "out", "--timeout", "2", timeout=120)
    assert "longer than the 2 s limit" in _one_line(result) and time.perf_counter() - started < 60
    assert_nothing_written(tmp_path / "out")


def test_an_endless_loop_stops_on_ctrl_c(tmp_path):
    model = _endless_loop(tmp_path / "loop.onnx")
    process = subprocess.Popen([sys.executable, "-m", "enginekit", "export", "--model", str(model), "-o", str(tmp_path / "out")],
                               cwd=tmp_path, env=_env(tmp_path), stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(6)  # well inside the endless run
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 130
    assert process.stderr.read().strip() == "enginekit: interrupted"
    assert_nothing_written(tmp_path / "out")


def test_a_100k_node_chain_exports_without_quadratic_blowup(tmp_path):
    """A 100k-node chain exports (about 40 s on an idle 2-core machine). The bound is loose on
    purpose: it is not a speed goal (those are benchmarks), it catches per-node work that grows with
    the graph (100k x 100k steps would take hours), and a loaded CI machine must not fail it."""
    count = 100_000
    nodes = [helper.make_node("Relu", [f"t{i}" if i else "x"], [f"t{i + 1}" if i + 1 < count else "y"]) for i in range(count)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    started = time.perf_counter()
    result = _cli(tmp_path, "export", "--model", path, "-o", tmp_path / "out", timeout=600)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - started < 300


def test_stale_staging_folders_of_dead_processes_are_cleaned(run_cli, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.staging-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    alive = tmp_path / f".out.staging-{os.getpid()}-def456"  # ours, still running: kept
    alive.mkdir()
    assert run_cli("export", "--model", "digits_cnn", "-o", out).code == 0
    assert not stale.exists() and alive.exists()


# ------------------------------------------------------------------ one line, never a traceback


def _model(tmp_path: Path, name: str, graph) -> Path:
    path = tmp_path / name
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path


def _external(tmp_path: Path, offset: str) -> Path:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", offset), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    (tmp_path / "w.bin").write_bytes(bytes(16))
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    return _model(tmp_path, "ext.onnx", graph)


CASES = {
    "offset as text": lambda t: _external(t, "sixteen"),
    "negative offset": lambda t: _external(t, "-8"),
    "NUL in location": lambda t: _nul_location(t),
    "no inputs": lambda t: _model(t, "none.onnx", helper.make_graph([helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))],
                                                                    "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])),
    "output is the input": lambda t: _model(t, "echo.onnx", helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])),
    "undefined element type": lambda t: _model(t, "untyped.onnx", helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                                                   [helper.make_tensor_value_info("x", 0, [1])],
                                                                                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])),
}


def _nul_location(tmp_path: Path) -> Path:
    path = _external(tmp_path, "0")
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "w\x00.bin"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_graphs_are_one_line(run_cli, tmp_path, case):
    path = CASES[case](tmp_path)
    result = run_cli("export", "--model", path, "-o", tmp_path / "out")
    assert result.code == 2 and str(path) in result.error_line and "Traceback" not in result.err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("gate", ["0.9.1", "top1_agreement>=0.9.1", "cosine>=-", "accuracy>=nan"])
def test_unreadable_gates_are_one_line(run_cli, tmp_path, gate):
    result = run_cli("build", "-m", "digits_cnn", "--target", "onnxruntime", "--min-accuracy", gate, "-o", tmp_path / "out")
    assert result.code == 2 and "accuracy condition" in result.error_line and "--min-accuracy" in result.error_line
    assert_nothing_written(tmp_path / "out")


def test_an_output_or_cache_that_cannot_be_created_is_one_line(tmp_path):
    """What a read-only or full disk looks like to enginekit: an OSError from the file system."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_line(_cli(tmp_path, "export", "--model", "digits_cnn", "-o", blocker / "out"))
    assert str(blocker) in line
    line = _one_line(_cli(tmp_path, "export", "--model", "digits_cnn", "-o", tmp_path / "out", ENGINEKIT_CACHE=str(blocker / "cache")))
    assert "a-file" in line


def test_an_unexpected_error_is_one_line_with_a_debug_hint(run_cli, monkeypatch, tmp_path):
    import enginekit.api

    monkeypatch.setattr(enginekit.api, "export", lambda *a, **k: 1 / 0)
    result = run_cli("export", "--model", "digits_cnn", "-o", tmp_path / "out")
    assert result.code == 2 and "ZeroDivisionError" in result.error_line and "--debug" in result.error_line


# ------------------------------------------------------------------ exit codes and leftovers


def test_a_build_whose_precisions_are_all_unknown_exits_2(run_cli, tmp_path):
    result = run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime,openvino", "--precisions", "int4,fp64", "-o", tmp_path / "out")
    assert result.code == 2 and "nothing to build" in result.error_line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("amax", [float("nan"), -1.0, "big"])
def test_a_table_with_impossible_ranges_is_refused(run_cli, tmp_path, amax):
    table = tmp_path / "r.json"
    assert run_cli("calibrate", "-m", "digits_cnn", "-n", "16", "-o", table).code == 0
    document = json.loads(table.read_text())
    first = next(iter(document["tensors"]))
    document["tensors"][first]["amax"] = amax
    table.write_text(json.dumps(document))
    result = run_cli("quantize", "-m", "digits_cnn", "-t", table, "-o", tmp_path / "q")
    assert result.code == 2 and "r.json" in result.error_line
    assert_nothing_written(tmp_path / "q")


def test_a_multi_target_build_refuses_a_bad_gate_before_writing_anything(run_cli, tmp_path):
    result = run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime", "--precisions", "fp32,int8", "--min-accuracy", "x>>1", "-o", tmp_path / "out")
    assert result.code == 2 and not (tmp_path / "out").exists()


def test_an_onnx_file_with_external_data_builds_for_onnxruntime(run_cli, tmp_path):
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="m.bin", size_threshold=0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((16, 4)).astype(np.float32))
    result = run_cli("build", "-m", folder / "m.onnx", "--target", "onnxruntime", "--precision", "fp32", "--eval-data", tmp_path / "d.npz", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["accuracy"]["metrics"]["cosine"] > 0.9999


# ------------------------------------------------------------------------------ tampering


@pytest.mark.parametrize("tamper", ["empty list", "outside path", "parent path", "lost hash", "extra file"])
def test_a_tampered_manifest_is_unusable(digits_fp32, tmp_path, tamper):
    import shutil

    import enginekit as ek
    from enginekit.core.errors import InputError

    folder = tmp_path / "artifact"
    shutil.copytree(digits_fp32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    if tamper == "empty list":
        manifest["files"] = []
    elif tamper == "outside path":
        manifest["files"].append({"path": "/etc/hostname", "bytes": 1, "sha256": "0" * 64})
    elif tamper == "parent path":
        manifest["files"].append({"path": "../etc/os-release", "bytes": 1, "sha256": "0" * 64})
    elif tamper == "lost hash":
        del manifest["files"][0]["sha256"]
    else:
        (folder / "extra.bin").write_bytes(b"smuggled")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError):
        ek.load(folder)


def test_a_cached_artifact_that_lost_a_hash_is_rebuilt(tmp_path):
    from enginekit.builder import build

    out = tmp_path / "fp32"
    build("digits_cnn", "onnxruntime", "fp32", out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="rebuilding"):
        assert not build("digits_cnn", "onnxruntime", "fp32", out).cache_hit


def test_a_warning_reaches_the_cli_user_as_one_line_without_a_path(run_cli, tmp_path):
    """A cached artifact the CLI rebuilds says so in one `enginekit: warning:` line, not with the
    file path and source line of the `warnings.warn` call (DETR's build printed qdq.py:50: ...)."""
    out = tmp_path / "fp32"
    assert run_cli("build", "-m", "digits_cnn", "--target", "onnxruntime", "-o", out).code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("build", "-m", "digits_cnn", "--target", "onnxruntime", "-o", out)
    assert result.code == 0
    lines = [line for line in result.err.splitlines() if "rebuilding" in line]
    assert len(lines) == 1 and lines[0].startswith("enginekit: warning: artifact at ") and ".py:" not in result.err


def test_a_library_warning_names_its_package():
    import io
    import warnings

    from enginekit.core.console import print_warnings_on_one_line, prints_warnings_on_one_line

    stream = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        print_warnings_on_one_line()
        assert prints_warnings_on_one_line()
        warnings.showwarning("old opset\n  converted", DeprecationWarning, "/x/lib/python3.11/site-packages/torch/onnx/utils.py", 12, stream)
        warnings.showwarning("dead tensor", UserWarning, str(ROOT / "enginekit" / "quantization" / "encoding.py"), 63, stream)
    assert not prints_warnings_on_one_line()
    assert stream.getvalue() == "enginekit: warning: (torch) old opset converted\nenginekit: warning: dead tensor\n"


# -------------------------------------------------------------------------------- network


SOCKET_GUARD = """
import os, socket
_log = os.environ["ENGINEKIT_TEST_NETLOG"]
def _record(*args, **kwargs):
    with open(_log, "a") as fh:
        fh.write(repr(args[:2]) + "\\n")
    raise OSError("network blocked by the test")
_connect = socket.socket.connect
def connect(self, address, *a):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        return _record(address)
    return _connect(self, address, *a)
socket.socket.connect = connect
socket.socket.connect_ex = lambda self, address: _record(address)
socket.getaddrinfo = _record
"""


def test_a_build_makes_no_connection_attempt(tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SOCKET_GUARD)
    log = tmp_path / "net.log"
    env = _env(tmp_path, ENGINEKIT_TEST_NETLOG=str(log))
    env["PYTHONPATH"] = f"{guard}:{ROOT}"
    result = subprocess.run([sys.executable, "-m", "enginekit", "build", "-m", "digits_cnn", "--targets", "onnxruntime,openvino",
                             "--precisions", "fp32,int8", "-n", "32", "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert not log.exists(), log.read_text()
    assert not (tmp_path / "intel").exists()  # OpenVINO's telemetry writes ~/intel when it runs


def test_a_full_disk_during_calibrate_all_leaves_no_table(run_cli, monkeypatch, tmp_path):
    import errno

    from enginekit.calibration.table import CalibrationTable

    real, calls = CalibrationTable.save, []

    def save(self, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(self, path)

    monkeypatch.setattr(CalibrationTable, "save", save)
    result = run_cli("calibrate", "-m", "digits_cnn", "--method", "all", "-n", "16", "-o", tmp_path / "r.json")
    assert result.code == 2 and "No space left" in result.error_line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", [".", ".."])
def test_dot_outputs_are_refused(tmp_path, output):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    line = _one_line(_cli(work, "export", "--model", "digits_cnn", "-o", output))
    assert "enginekit did not write" in line and (work / "notes.txt").read_text() == "mine"


def test_calibration_data_that_overflows_the_model_is_one_line(run_cli, tmp_path):
    data = tmp_path / "huge.npy"
    np.save(data, np.full((8, 1, 8, 8), 3e38, np.float32))
    result = run_cli("calibrate", "-m", "digits_cnn", "--data", data, "-o", tmp_path / "r.json")
    assert result.code == 2 and "NaN" in result.error_line and "out of the range" in result.error_line
    assert not (tmp_path / "r.json").exists()


def test_an_infinite_model_output_is_refused_though_infinities_inside_the_model_are_not(run_cli, tmp_path):
    """-inf inside the model (an attention mask) is left out of the ranges; in a graph output it
    means the data overflowed, and the calibration says so in one line."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Mul", ["x", "big"], ["scaled"]), helper.make_node("MatMul", ["scaled", "w"], ["y"])]
    graph = helper.make_graph(nodes, "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(np.array(1e30, np.float32), "big"),
                               numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "d.npy", np.full((8, 4), 1e10, np.float32))
    result = run_cli("calibrate", "-m", tmp_path / "m.onnx", "--data", tmp_path / "d.npy", "-o", tmp_path / "r.json")
    assert result.code == 2 and "output 'y' of the model holds 32 infinite value(s)" in result.error_line
    assert not (tmp_path / "r.json").exists()


def test_an_external_data_location_that_is_too_long_is_one_line(run_cli, tmp_path):
    path = _external(tmp_path, "0")
    model = onnx.load(str(path), load_external_data=False)
    model.graph.initializer[0].external_data[0].value = "x" * 5000
    path.write_bytes(model.SerializeToString())
    result = run_cli("export", "--model", path, "-o", tmp_path / "out")
    assert result.code == 2 and str(path) in result.error_line
