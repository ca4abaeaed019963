"""Bad calibration data: one line naming the file and the problem, exit 2, no table written."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def calibrate_cli(run_cli, tmp_path):
    def run(data, *extra):
        out = tmp_path / "ranges.json"
        result = run_cli("calibrate", "-m", "digits_cnn", "--data", data, "-o", out, *extra)
        return result, out

    return run


def _digits(n: int = 32) -> np.ndarray:
    return np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)


def _refused(result, out, needle: str, names: str | None = None) -> None:
    assert result.code == 2, (result.code, result.err)
    assert needle in result.error_line, result.error_line
    if names:
        assert names in result.error_line
    assert not out.exists()


def test_wrong_input_name(calibrate_cli, tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, pixels=_digits())
    _refused(*calibrate_cli(data), "data has inputs ['pixels'] but the model expects ['image']", str(data))


@pytest.mark.parametrize(("array", "needle"), [
    (np.zeros((4, 1, 16, 16), np.float32), "sample shape [1, 16, 16]"),
    (np.zeros((4, 1, 8, 8), np.int32), "dtype int32"),
    (np.zeros((0, 1, 8, 8), np.float32), "empty"),
], ids=["wrong_shape", "wrong_dtype", "empty_set"])
def test_unusable_array(calibrate_cli, tmp_path, array, needle):
    data = tmp_path / "d.npy"
    np.save(data, array)
    _refused(*calibrate_cli(data), needle, str(data))


def test_nan_names_the_sample(calibrate_cli, tmp_path):
    values = _digits()
    values[5, 0, 3, 3] = np.nan
    data = tmp_path / "d.npz"
    np.savez(data, image=values)
    _refused(*calibrate_cli(data), "sample 5 of input 'image' contains NaN or Inf", str(data))


def test_an_npz_of_one_unnamed_array_feeds_a_single_input_model(calibrate_cli, tmp_path):
    """np.savez(file, x) names its array arr_0: for a one-input model that is unambiguous (a new
    user's file was refused as "data has inputs ['arr_0']"); a named array must still match."""
    data = tmp_path / "d.npz"
    np.savez(data, _digits())
    result, out = calibrate_cli(data)
    assert result.code == 0, result.err
    assert __import__("json").loads(out.read_text())["num_samples"] == 32


def test_nan_in_build_data_points_at_no_flag_build_does_not_take(calibrate_cli, run_cli, tmp_path):
    """calibrate's NaN line ends "(see --skip-nonfinite)"; build has no such flag, so its line must
    not send the user to it (a new user got "No such option")."""
    values = _digits()
    values[5, 0, 3, 3] = np.nan
    data = tmp_path / "d.npz"
    np.savez(data, image=values)
    calibrated, _ = calibrate_cli(data)
    assert calibrated.error_line.endswith("(see --skip-nonfinite)")
    built = run_cli("build", "-m", "digits_cnn", "--target", "onnxruntime", "--precision", "int8", "--calib-data", data,
                    "--no-bench", "-o", tmp_path / "out")
    assert built.code == 2 and "sample 5 of input 'image' contains NaN or Inf" in built.error_line
    assert "--skip-nonfinite" not in built.error_line and not (tmp_path / "out").exists()


def test_skip_nonfinite_drops_and_counts(calibrate_cli, tmp_path):
    values = _digits()
    values[[2, 7], 0, 0, 0] = np.inf
    data = tmp_path / "d.npy"
    np.save(data, values)
    result, out = calibrate_cli(data, "--skip-nonfinite")
    assert result.code == 0, result.err
    assert "skipped 2 sample(s)" in result.err
    assert __import__("json").loads(out.read_text())["num_samples"] == 30


def test_fewer_samples_than_asked_warns_and_uses_them(calibrate_cli, tmp_path):
    data = tmp_path / "d.npy"
    np.save(data, _digits(20))
    result, out = calibrate_cli(data, "-n", "100")
    assert result.code == 0, result.err
    assert "asked for 100 samples" in result.err
    assert __import__("json").loads(out.read_text())["num_samples"] == 20


def test_pickled_npy_is_refused(calibrate_cli, tmp_path):
    data = tmp_path / "d.npy"
    np.save(data, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _refused(*calibrate_cli(data), "pickled Python objects", str(data))


def test_missing_data_path(calibrate_cli, tmp_path):
    _refused(*calibrate_cli(tmp_path / "nope.npz"), "data not found")


def test_a_non_zoo_model_needs_data(run_cli, exported, tmp_path):
    folder, _ = exported("efficientnet_lite0")
    out = tmp_path / "r.json"
    result = run_cli("calibrate", "-m", folder / "model.onnx", "-o", out)
    assert result.code == 2 and "data is required" in result.error_line and "--data" in result.error_line and not out.exists()


def test_image_folder_with_a_truncated_image(run_cli, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes((folder / "a.jpg").read_bytes()[:40])
    out = tmp_path / "r.json"
    result = run_cli("calibrate", "-m", "efficientnet_lite0", "--data", folder, "-o", out)
    assert result.code == 2 and "b.jpg" in result.error_line and "truncated" in result.error_line
    assert not out.exists()


def test_empty_image_folder(run_cli, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    out = tmp_path / "r.json"
    result = run_cli("calibrate", "-m", "efficientnet_lite0", "--data", folder, "-o", out)
    assert result.code == 2 and "no images" in result.error_line and not out.exists()
