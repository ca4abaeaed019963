"""Build matrices and sharded calibration on executors: local worker processes and a real local Ray
cluster. The artifacts must be the ones a plain one-process build makes (build keys and files),
sharded tables byte-identical to one pass, failures isolated and resumable."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from enginekit import api
from enginekit.builder import BuildOptions, build_many
from enginekit.builder.matrix import MatrixModel, build_matrix
from enginekit.calibration.methods import METHODS
from enginekit.core.executor import FAULTS_ENV, Executor, LocalExecutor, Outcome, Task, get_executor

MATRIX_MODELS = ["digits_cnn", "minilm_l6"]
TARGETS = ["onnxruntime", "openvino"]
PRECISIONS = ["fp32", "int8"]
OPTIONS = BuildOptions(num_samples=32, eval_samples=64)


def _artifacts(root: Path) -> dict[str, tuple[str, list, bytes]]:
    """Every artifact under `root`: its build key, its files (name, sha256) and its manifest's bytes."""
    found = {}
    for manifest in sorted(root.rglob("manifest.json")):
        document = json.loads(manifest.read_text())
        found[str(manifest.parent.relative_to(root))] = (document["build_key"], [(f["path"], f["sha256"]) for f in document["files"]],
                                                          manifest.read_bytes())
    return found


class ShuffledInline(Executor):
    """Runs the tasks in this process and hands the outcomes back in a shuffled order: the driver
    must not depend on which shard finishes first."""

    name = "inline"

    def __init__(self, seed: int):
        self.seed = seed

    def run(self, tasks: Sequence[Task]) -> Iterator[Outcome]:
        outcomes = [Outcome(t.key, t.function(*t.args), attempts=1) for t in tasks]
        random.Random(self.seed).shuffle(outcomes)
        yield from outcomes


def _tables(folder: Path) -> dict[str, bytes]:
    return {m: (folder / f"ranges.{m}.json").read_bytes() for m in METHODS}


def test_sharded_calibration_gives_byte_identical_tables_for_every_method_and_shard_order(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    api.calibrate("digits_cnn", methods=["all"], num_samples=200, output=one / "ranges.json")
    reference = _tables(one)
    assert len(set(reference.values())) == 4
    for seed in range(3):  # four shards merged in three different orders, in this process
        out = tmp_path / f"inline{seed}"
        out.mkdir()
        from enginekit.builder.calibration import calibrate_model
        from enginekit.calibration.pipeline import write_tables
        from enginekit.exporter.reference import load_fp32

        fp32 = load_fp32("digits_cnn")
        run = calibrate_model(fp32, None, list(METHODS), num_samples=200, shards=4, executor=ShuffledInline(seed))
        assert run.shards == 4
        write_tables(run.tables, out / "ranges.json")
        assert _tables(out) == reference
    pooled = tmp_path / "pool"
    pooled.mkdir()  # and in worker processes, 4 shards over 2 workers
    api.calibrate("digits_cnn", methods=["all"], num_samples=200, output=pooled / "ranges.json", shards=4, workers=2)
    assert _tables(pooled) == reference


def test_sharding_needs_data_every_worker_can_open(tmp_path):
    import numpy as np

    from enginekit.core.errors import InputError

    feeds = [{"image": np.zeros((4, 1, 8, 8), np.float32)}]
    with pytest.raises(InputError, match="data every worker can open"):
        api.calibrate("digits_cnn", feeds, num_samples=4, shards=2)


def test_local_matrix_is_the_sequential_build_and_a_rerun_reuses_every_cell(tmp_path):
    sequential = tmp_path / "sequential"
    for name in MATRIX_MODELS:
        build_many(name, TARGETS, PRECISIONS, sequential / name, OPTIONS)
    result = build_matrix([MatrixModel(n, n, OPTIONS) for n in MATRIX_MODELS], TARGETS, PRECISIONS, tmp_path / "local", LocalExecutor(2))
    assert [c.status for c in result.cells] == ["built"] * 8
    expected = _artifacts(sequential)
    assert len(expected) == 8 and _artifacts(tmp_path / "local") == expected
    report = json.loads((tmp_path / "local" / "matrix.json").read_text())
    assert report["counts"] == {"built": 8, "reused": 0, "skipped": 0, "failed": 0}
    again = build_matrix([MatrixModel(n, n, OPTIONS) for n in MATRIX_MODELS], TARGETS, PRECISIONS, tmp_path / "local", LocalExecutor(2))
    assert [c.status for c in again.cells] == ["reused"] * 8


def _kill_marker(folder: Path, cell: str, always: bool = False) -> Path:
    marker = folder / (cell.replace("/", "__") + (".kill-always" if always else ".kill"))
    marker.write_text("")
    return marker


def test_a_killed_local_worker_is_retried_then_reported_and_a_rerun_builds_only_what_is_missing(tmp_path, monkeypatch):
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULTS_ENV, str(faults))
    out = tmp_path / "out"
    once = _kill_marker(faults, "digits_cnn/onnxruntime-int8")
    result = build_matrix([MatrixModel("digits_cnn", "digits_cnn", OPTIONS)], ["onnxruntime"], PRECISIONS, out, LocalExecutor(1))
    int8 = next(c for c in result.cells if c.precision == "int8")
    assert not once.exists() and int8.status == "built" and int8.attempts == 2 and int8.infrastructure
    always = _kill_marker(faults, "digits_cnn/onnxruntime-fp32", always=True)
    out2 = tmp_path / "out2"
    result = build_matrix([MatrixModel("digits_cnn", "digits_cnn", OPTIONS)], ["onnxruntime"], PRECISIONS, out2, LocalExecutor(1))
    statuses = {c.precision: c for c in result.cells}
    assert statuses["fp32"].status == "failed" and "died" in statuses["fp32"].cell.failed and statuses["fp32"].attempts == 2
    assert statuses["int8"].status == "built"  # the other cell finished
    assert not (out2 / "digits_cnn" / "onnxruntime-fp32").exists()  # nothing partial published
    always.unlink()
    rerun = build_matrix([MatrixModel("digits_cnn", "digits_cnn", OPTIONS)], ["onnxruntime"], PRECISIONS, out2, LocalExecutor(1))
    assert {c.precision: c.status for c in rerun.cells} == {"fp32": "built", "int8": "reused"}
    assert not [p for p in (out2 / "digits_cnn").iterdir() if ".staging-" in p.name]  # the killed worker's leftovers are gone


def test_a_cell_pinned_to_an_accelerator_nobody_has_is_skipped_with_the_reason(tmp_path):
    result = build_matrix([MatrixModel("digits_cnn", "digits_cnn", OPTIONS)], TARGETS, ["fp32"], tmp_path / "out", LocalExecutor(1),
                          machines={"openvino": "H100"})
    cells = {c.target: c for c in result.cells}
    assert cells["onnxruntime"].status == "built"
    assert cells["openvino"].status == "skipped" and "H100" in cells["openvino"].cell.skipped and cells["openvino"].machine == "H100"
    markdown = (tmp_path / "out" / "matrix.md").read_text()
    assert "## CPU cells" in markdown and "## cells on H100 GPUs" in markdown


def test_the_cli_builds_a_matrix_file_and_refuses_a_broken_one_in_one_line(tmp_path, run_cli):
    (tmp_path / "m.yaml").write_text("models:\n  - digits_cnn\n  - {model: digits_cnn, name: few, eval_samples: 32}\n"
                                     "targets: [onnxruntime]\nprecisions: [fp32]\nnum_samples: 16\n")
    result = run_cli("build", "-c", tmp_path / "m.yaml", "-o", tmp_path / "out", "--workers", "1")
    assert result.code == 0, result.err
    assert "2 built" in result.out and (tmp_path / "out" / "few" / "onnxruntime-fp32" / "manifest.json").is_file()
    (tmp_path / "bad.yaml").write_text("models:\n  - {model: digits_cnn, colour: red}\ntargets: [onnxruntime]\n")
    result = run_cli("build", "-c", tmp_path / "bad.yaml", "-o", tmp_path / "out2")
    assert result.code == 2 and "unknown key(s) colour" in result.error_line and "bad.yaml" in result.error_line
    assert not (tmp_path / "out2").exists()


def test_an_unknown_executor_is_one_line():
    from enginekit.core.errors import InputError

    with pytest.raises(InputError, match="unknown executor 'slurm'"):
        get_executor("slurm")


# --- a real Ray cluster, started here (two CPUs) and stopped after the module ---

@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'enginekit[ray]')")
    faults = tmp_path_factory.mktemp("ray-faults")
    previous = __import__("os").environ.get(FAULTS_ENV)
    __import__("os").environ[FAULTS_ENV] = str(faults)  # the cluster's workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield faults
    finally:
        ray.shutdown()
        if previous is None:
            __import__("os").environ.pop(FAULTS_ENV, None)
        else:
            __import__("os").environ[FAULTS_ENV] = previous


def test_ray_matrix_is_the_sequential_and_local_build(ray_cluster, tmp_path):
    sequential = tmp_path / "sequential"
    for name in MATRIX_MODELS:
        build_many(name, TARGETS, PRECISIONS, sequential / name, OPTIONS)
    local = build_matrix([MatrixModel(n, n, OPTIONS) for n in MATRIX_MODELS], TARGETS, PRECISIONS, tmp_path / "local", LocalExecutor(2))
    result = api.build_matrix([MatrixModel(n, n, OPTIONS) for n in MATRIX_MODELS], TARGETS, PRECISIONS, tmp_path / "ray", executor="ray")
    assert result.executor.startswith("ray") and [c.status for c in result.cells] == ["built"] * 8
    assert [c.status for c in local.cells] == ["built"] * 8
    expected = _artifacts(sequential)
    assert len(expected) == 8 and _artifacts(tmp_path / "ray") == expected == _artifacts(tmp_path / "local")


def test_ray_sharded_calibration_is_byte_identical(ray_cluster, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    one.mkdir()
    four.mkdir()
    api.calibrate("digits_cnn", methods=["all"], num_samples=200, output=one / "ranges.json")
    api.calibrate("digits_cnn", methods=["all"], num_samples=200, output=four / "ranges.json", shards=4, executor="ray")
    assert _tables(four) == _tables(one)


def test_ray_retries_a_killed_worker_skips_a_missing_accelerator_and_resumes(ray_cluster, tmp_path):
    once = _kill_marker(ray_cluster, "digits_cnn/onnxruntime-int8")
    always = _kill_marker(ray_cluster, "digits_cnn/openvino-int8", always=True)
    out = tmp_path / "out"
    models = [MatrixModel("digits_cnn", "digits_cnn", OPTIONS)]
    result = build_matrix(models, TARGETS + ["tensorrt"], PRECISIONS, out, get_executor("ray"), machines={"tensorrt": "H100"})
    cells = {(c.target, c.precision): c for c in result.cells}
    assert not once.exists() and cells[("onnxruntime", "int8")].status == "built"  # killed once, retried by Ray
    failed = cells[("openvino", "int8")]
    assert failed.status == "failed" and "died" in failed.cell.failed
    assert not (out / "digits_cnn" / "openvino-int8").exists()
    assert cells[("tensorrt", "fp32")].status == "skipped" and "no node of the cluster" in cells[("tensorrt", "fp32")].cell.skipped
    assert {cells[k].status for k in [("onnxruntime", "fp32"), ("openvino", "fp32")]} == {"built"}
    always.unlink()
    rerun = build_matrix(models, TARGETS, PRECISIONS, out, get_executor("ray"))
    assert {(c.target, c.precision): c.status for c in rerun.cells} == {
        ("onnxruntime", "fp32"): "reused", ("onnxruntime", "int8"): "reused", ("openvino", "fp32"): "reused", ("openvino", "int8"): "built"}
