"""`-o` never destroys what enginekit did not write: a user's folder keeps its files, an output
equal to (or containing) an input is refused before any work, and two outputs of one command
may not coincide. Each refusal is one line with exit 2."""

from __future__ import annotations

import json

import pytest

from enginekit.core.errors import InputError
from enginekit.core.outputs import ARTIFACT, BUILD_ROOT, TABLE, Output, check_outputs


@pytest.fixture
def user_folder(tmp_path):
    folder = tmp_path / "mywork"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious\n")
    return folder


def _refused(result, needle: str) -> str:
    assert result.code == 2, (result.code, result.err)
    line = result.error_line
    assert needle in line, line
    return line


def test_export_over_a_users_folder_keeps_its_files(run_cli, user_folder):
    result = run_cli("export", "--model", "digits_cnn", "-o", user_folder)
    _refused(result, "holds files enginekit did not write")
    assert (user_folder / "thesis.txt").read_text() == "precious\n"
    assert sorted(p.name for p in user_folder.iterdir()) == ["thesis.txt"]


def test_quantize_and_build_over_a_users_folder_keep_its_files(run_cli, user_folder, tmp_path):
    table = tmp_path / "r.json"
    assert run_cli("calibrate", "-m", "digits_cnn", "-n", "32", "-o", table).code == 0
    _refused(run_cli("quantize", "-m", "digits_cnn", "-t", table, "-o", user_folder), str(user_folder))
    _refused(run_cli("build", "-m", "digits_cnn", "--target", "onnxruntime", "-o", user_folder), str(user_folder))
    _refused(run_cli("build", "-m", "digits_cnn", "--targets", "onnxruntime", "--precisions", "fp32,int8", "-o", user_folder),
             str(user_folder))
    assert sorted(p.name for p in user_folder.iterdir()) == ["thesis.txt"]


def test_an_empty_folder_and_an_earlier_artifact_are_fine_outputs(run_cli, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("export", "--model", "digits_cnn", "-o", empty).code == 0
    assert run_cli("export", "--model", "digits_cnn", "-o", empty).code == 0  # replaces its own artifact
    assert (empty / "manifest.json").is_file()


def test_calibrate_output_equal_to_the_model_is_refused(run_cli, exported, tmp_path):
    folder, _ = exported("digits_cnn")
    model = tmp_path / "m.onnx"
    model.write_bytes((folder / "model.onnx").read_bytes())
    before = model.read_bytes()
    _refused(run_cli("calibrate", "-m", model, "-n", "16", "-o", model), "also an input")
    assert model.read_bytes() == before


def test_calibrate_table_and_trt_cache_on_one_path_are_refused(run_cli, tmp_path):
    out = tmp_path / "r.json"
    _refused(run_cli("calibrate", "-m", "digits_cnn", "-n", "16", "-o", out, "--trt-cache", out), "two outputs")
    assert not out.exists()


def test_calibrate_never_overwrites_a_file_it_did_not_write(run_cli, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    _refused(run_cli("calibrate", "-m", "digits_cnn", "-n", "16", "-o", notes), "not an enginekit calibration table")
    assert json.loads(notes.read_text()) == {"mine": True}


def test_quantize_and_build_into_the_model_export_folder_are_refused(run_cli, exported, tmp_path):
    folder, _ = exported("digits_cnn")
    before = (folder / "model.onnx").read_bytes()
    table = tmp_path / "r.json"
    assert run_cli("calibrate", "-m", folder, "-n", "16", "-o", table).code == 0
    _refused(run_cli("quantize", "-m", folder, "-t", table, "-o", folder), "also an input")
    _refused(run_cli("build", "-m", folder, "--target", "onnxruntime", "--precision", "int8", "--calib-data", "zoo", "-o", folder),
             "also an input")
    _refused(run_cli("build", "-m", folder, "--target", "onnxruntime", "-o", folder.parent), "contains the input")
    assert (folder / "model.onnx").read_bytes() == before


def test_a_symlink_to_a_users_folder_is_judged_as_that_folder(run_cli, user_folder, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(user_folder)
    _refused(run_cli("export", "--model", "digits_cnn", "-o", link), "holds files enginekit did not write")
    assert sorted(p.name for p in user_folder.iterdir()) == ["thesis.txt"] and link.is_symlink()


def test_a_dangling_symlink_output_is_written_where_it_points(run_cli, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    assert run_cli("export", "--model", "digits_cnn", "-o", link).code == 0
    assert link.is_symlink() and (tmp_path / "target" / "manifest.json").is_file()


def test_bench_report_inside_an_artifact_is_refused(run_cli, exported):
    folder, _ = exported("digits_cnn")
    _refused(run_cli("bench", folder, "-o", folder / "report.json"), "inside the input folder")


def test_build_root_accepts_only_its_own_outputs(tmp_path):
    root = tmp_path / "root"
    (root / "onnxruntime-fp32").mkdir(parents=True)
    (root / "onnxruntime-fp32" / "manifest.json").write_text(json.dumps({"schema": "enginekit.manifest/1"}))
    (root / "report.json").write_text(json.dumps({"schema": "enginekit.report/1"}))
    check_outputs([Output(root, BUILD_ROOT)])
    (root / "report.md").write_text("my own notes\n")
    with pytest.raises(InputError, match="holds files enginekit did not write"):
        check_outputs([Output(root, BUILD_ROOT)])


def test_one_output_inside_another_is_refused(tmp_path):
    with pytest.raises(InputError, match="inside another"):
        check_outputs([Output(tmp_path / "a", ARTIFACT), Output(tmp_path / "a" / "t.json", TABLE)])


def test_a_file_where_an_artifact_folder_belongs_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_outputs([Output(path, ARTIFACT)])
