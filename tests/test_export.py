"""`enginekit export`: zoo, factory and ONNX sources; the parity gate; the manifest."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from enginekit.core.artifacts import read_manifest, verify_files
from enginekit.targets.onnxruntime import OrtRunner
from tests.conftest import assert_nothing_written


def test_efficientnet_export_has_dynamic_batch_and_tight_parity(exported):
    folder, manifest = exported("efficientnet_lite0")
    assert (folder / "model.onnx").is_file()
    assert manifest["parity"]["cosine"] >= 0.99999
    assert manifest["parity"]["max_abs"] <= 1e-3
    assert [c["dims"]["batch"] for c in manifest["parity"]["cases"]] == [1, 4]
    assert manifest["inputs"] == [{"name": "image", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]
    model = onnx.load(str(folder / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert manifest["opset"] == 20
    runner = OrtRunner(folder / "model.onnx")
    for batch in (1, 3):
        assert runner.infer({"image": np.zeros((batch, 3, 224, 224), np.float32)})["logits"].shape == (batch, 1000)


def test_manifest_follows_the_schema_and_hashes_match(exported):
    folder, manifest = exported("efficientnet_lite0")
    assert read_manifest(folder) == manifest
    for key in ("schema", "model", "target", "precision", "files", "inputs", "outputs", "parity", "toolchain", "machine"):
        assert key in manifest
    assert manifest["target"] == "onnx" and manifest["precision"] == "fp32"
    assert [f["path"] for f in manifest["files"]] == ["model.onnx"]
    verify_files(folder, manifest)
    assert manifest["toolchain"]["torch"].startswith("2.") and manifest["machine"]["cores"] >= 1


def test_minilm_parity_at_batch_1_and_4_sequence_8_and_128(exported):
    _, manifest = exported("minilm_l6")
    cases = {(c["dims"]["batch"], c["dims"]["sequence"]) for c in manifest["parity"]["cases"]}
    assert cases == {(1, 8), (4, 8), (1, 128), (4, 128)}
    assert manifest["parity"]["passed"] and manifest["parity"]["cosine"] >= 0.99999
    assert manifest["parity"]["data"] == "minilm_l6 evaluation split"
    assert [i["shape"] for i in manifest["inputs"]] == [["batch", "sequence"], ["batch", "sequence"]]


def test_export_cli_writes_the_artifact(run_cli, tmp_path):
    out = tmp_path / "digits"
    result = run_cli("export", "--model", "digits_cnn", "-o", out)
    assert result.code == 0, result.err
    assert "parity vs torch" in result.out and (out / "model.onnx").is_file()
    assert oct((out).stat().st_mode & 0o777) != oct(0o700)


def test_static_batch_fixes_the_batch_dim(run_cli, tmp_path):
    out = tmp_path / "static"
    assert run_cli("export", "--model", "digits_cnn", "--static-batch", "-o", out).code == 0
    manifest = read_manifest(out)
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert [c["dims"] for c in manifest["parity"]["cases"]] == [{}]


def test_parity_gate_failure_exits_1_and_publishes_nothing(run_cli, tmp_path):
    out = tmp_path / "gated"
    result = run_cli("export", "--model", "digits_cnn", "--atol", "0", "--rtol", "0", "-o", out)
    assert result.code == 1
    assert "parity failed" in result.error_line and "max_abs" in result.error_line
    assert_nothing_written(out)


def test_failed_reexport_leaves_the_previous_artifact_intact(run_cli, tmp_path):
    out = tmp_path / "digits"
    assert run_cli("export", "--model", "digits_cnn", "-o", out).code == 0
    before = (out / "manifest.json").read_text()
    assert run_cli("export", "--model", "digits_cnn", "--atol", "0", "--rtol", "0", "-o", out).code == 1
    assert (out / "manifest.json").read_text() == before
    verify_files(out, json.loads(before))


def _write_user_package(root: Path) -> None:
    package = root / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 8, 3, padding=1)
                self.head = nn.Linear(8, 5)

            def forward(self, x):
                return self.head(torch.relu(self.conv(x)).mean((2, 3)))

        def build():
            return Net()
    """))


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    _write_user_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    import sys

    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


def _trained_state(root: Path):
    import importlib

    torch.manual_seed(3)
    return importlib.import_module("userpkg.nets").build().state_dict()


def test_factory_with_safetensors_weights(run_cli, user_package):
    from safetensors.torch import save_file

    state = _trained_state(user_package)
    save_file(state, str(user_package / "w.safetensors"))
    out = user_package / "out"
    result = run_cli("export", "--model", "userpkg.nets:build", "--weights", "w.safetensors", "--input-shape", "x=batchx3x16x16", "-o", out)
    assert result.code == 0, result.err
    manifest = read_manifest(out)
    assert manifest["source"]["kind"] == "factory" and manifest["parity"]["passed"]
    assert manifest["inputs"][0] == {"name": "x", "shape": ["batch", 3, 16, 16], "dtype": "float32"}
    # the exported graph carries the given weights, not the factory's random init
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}
    module = __import__("userpkg.nets", fromlist=["build"]).build()
    module.load_state_dict(state)
    with torch.no_grad():
        expected = module.eval()(torch.from_numpy(feeds["x"])).numpy()
    np.testing.assert_allclose(next(iter(OrtRunner(out / "model.onnx").infer(feeds).values())), expected, atol=1e-5)


def test_a_factory_given_as_a_python_file_path(run_cli, tmp_path, monkeypatch):
    """`path/to/file.py:function`, as a new user first writes it (it failed: "No module named
    'models.py'"): the file's folder goes on the path, so its own helper imports resolve."""
    import sys

    folder = tmp_path / "my models"
    folder.mkdir()
    (folder / "ek_file_helpers.py").write_text("import torch\n\ndef layer():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    (folder / "ek_file_net.py").write_text(textwrap.dedent("""
        import torch
        from ek_file_helpers import layer

        def build():
            torch.manual_seed(0)
            return torch.nn.Sequential(layer(), torch.nn.ReLU())
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        result = run_cli("export", "--model", "my models/ek_file_net.py:build", "--input-shape", "x=batchx3x8x8", "-o", tmp_path / "out")
        assert result.code == 0, result.err
        manifest = read_manifest(tmp_path / "out")
        assert manifest["source"]["kind"] == "factory" and manifest["parity"]["passed"] and manifest["model"] == "ek_file_net_build"
        missing = run_cli("export", "--model", "nowhere/absent.py:build", "--input-shape", "x=batchx3x8x8", "-o", tmp_path / "out2")
        assert missing.code == 2 and "no such Python file 'nowhere/absent.py'" in missing.error_line
        assert not (tmp_path / "out2").exists()
    finally:
        for name in ("ek_file_net", "ek_file_helpers"):
            sys.modules.pop(name, None)


def test_factory_with_state_dict_pt(run_cli, user_package):
    torch.save(_trained_state(user_package), user_package / "w.pt")
    result = run_cli("export", "--model", "userpkg.nets:build", "--weights", "w.pt", "--input-shape", "1x3x16x16", "-o", user_package / "out")
    assert result.code == 0, result.err


def test_parity_failure_on_generated_inputs_says_what_they_were_and_which_flag_declares_them(run_cli, user_package, tmp_path):
    """Random inputs are not always inputs the model is defined on (a causal model's 0/1 mask with
    holes): the failure names what was drawn and the flag that declares real ranges; a failure on
    the model's own data names that data instead."""
    out = user_package / "out"
    result = run_cli("export", "--model", "userpkg.nets:build", "--input-shape", "x=batchx3x16x16:float32:-1..1", "--atol", "0", "--rtol", "0", "-o", out)
    assert result.code == 1
    assert "seeded random inputs drawn from x float32 uniform -1..1" in result.error_line and "--input-shape" in result.error_line
    assert_nothing_written(out)
    zoo = run_cli("export", "--model", "digits_cnn", "--atol", "0", "--rtol", "0", "-o", tmp_path / "zoo")
    assert zoo.code == 1 and "parity failed on digits_cnn evaluation split" in zoo.error_line
    assert "seeded random" not in zoo.error_line and "--input-shape" not in zoo.error_line


def test_a_module_the_dynamo_exporter_refuses_is_exported_by_torchscript_with_a_note(run_cli, tmp_path, monkeypatch):
    """torch.export cannot guard on a tensor's value (a data-dependent `if`); the TorchScript
    exporter traces the branch taken, the manifest says so (and where), and parity checks it."""
    (tmp_path / "branchy.py").write_text(textwrap.dedent("""
        import torch

        class Branchy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(4, 3)

            def forward(self, x):
                if x.abs().sum() >= 0:
                    return self.lin(x)
                return -self.lin(x)

        def build():
            torch.manual_seed(0)
            return Branchy()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_cli("export", "--model", "branchy:build", "--input-shape", "x=batchx4", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["parity"]["passed"]
    assert manifest["outputs"] == [{"name": "output", "shape": ["batch", 3], "dtype": "float32"}]
    note = next(n for n in manifest["notes"] if "TorchScript exporter" in n)
    assert "data-dependent" in note and "branchy.py:10" in note  # the `if` line


def test_a_forward_of_star_args_exports_through_the_dynamo_exporter(run_cli, tmp_path, monkeypatch):
    """torch.export matches dynamic shapes to forward's parameters: `*args` takes one entry, the
    tuple of its inputs' specs. The flat tuple sent every such wrapper to TorchScript (and a
    transformers DETR wrapped so failed the checker there)."""
    (tmp_path / "varargs.py").write_text(textwrap.dedent("""
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(4, 3)

            def forward(self, scale, *args):
                return self.lin(args[0] * scale + args[1])

        def build():
            torch.manual_seed(0)
            return Wrapper()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    shapes = ["scale=batchx4", "x=batchx4", "bias=batchx4"]
    result = run_cli("export", "--model", "varargs:build", *[f for s in shapes for f in ("--input-shape", s)], "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["parity"]["passed"] and not any("TorchScript" in n for n in manifest.get("notes", []))
    assert [i["shape"] for i in manifest["inputs"]] == [["batch", 4]] * 3

def test_a_module_neither_exporter_takes_fails_in_one_line_with_both_reasons(run_cli, tmp_path, monkeypatch):
    (tmp_path / "broken_net.py").write_text(textwrap.dedent("""
        import torch

        class Broken(torch.nn.Module):
            def forward(self, x):
                raise RuntimeError("this module cannot run")

        def build():
            return Broken()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run_cli("export", "--model", "broken_net:build", "--input-shape", "x=batchx4", "-o", tmp_path / "out")
    assert result.code == 2 and "torch.onnx.export failed" in result.error_line
    assert "the TorchScript exporter too (RuntimeError: this module cannot run)" in result.error_line
    assert_nothing_written(tmp_path / "out")


def test_factory_without_input_shape_is_refused(run_cli, user_package):
    result = run_cli("export", "--model", "userpkg.nets:build", "-o", user_package / "out")
    assert result.code == 2 and "--input-shape" in result.error_line
    assert_nothing_written(user_package / "out")


def _fixed_batch_onnx(path: Path, batch: int = 1) -> Path:
    """A fixed-batch Conv -> Relu -> GlobalAveragePool -> Flatten graph (it would run at any batch)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])],
        "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_existing_onnx_is_normalized_and_batch_made_dynamic(run_cli, tmp_path):
    source = _fixed_batch_onnx(tmp_path / "fixed.onnx")
    out = tmp_path / "normalized"
    result = run_cli("export", "--model", source, "-o", out)
    assert result.code == 0, result.err
    manifest = read_manifest(out)
    assert manifest["source"]["kind"] == "onnx" and manifest["opset"] == 17
    assert manifest["inputs"][0]["shape"] == ["batch", 3, 8, 8]
    assert manifest["parity"]["reference"].startswith("onnxruntime") and manifest["parity"]["passed"]
    assert [c["dims"] for c in manifest["parity"]["cases"]] == [{"batch": 1}, {"batch": 4}]
    assert any("made dynamic" in note for note in manifest["notes"])


def test_a_file_fixed_at_batch_4_is_made_dynamic_and_checked_at_batch_1_against_itself(run_cli, tmp_path):
    """The original runs chunk by chunk at its own batch; a batch-1 parity case was a chunk of one
    sample, which the original refused ("Got: 1 Expected: 4"), and the export failed."""
    source = _fixed_batch_onnx(tmp_path / "fixed4.onnx", batch=4)
    result = run_cli("export", "--model", source, "-o", tmp_path / "normalized")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "normalized")
    assert manifest["inputs"][0]["shape"] == ["batch", 3, 8, 8] and manifest["parity"]["passed"]
    assert [c["dims"] for c in manifest["parity"]["cases"]] == [{"batch": 1}, {"batch": 4}]


def test_existing_onnx_that_cannot_change_batch_keeps_it(run_cli, tmp_path):
    fixed = tmp_path / "src"
    assert run_cli("export", "--model", "digits_cnn", "--static-batch", "-o", fixed).code == 0
    out = tmp_path / "normalized"
    assert run_cli("export", "--model", fixed / "model.onnx", "-o", out).code == 0
    manifest = read_manifest(out)
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert any("stays fixed" in note for note in manifest["notes"])


def test_existing_onnx_whose_samples_mix_keeps_its_fixed_batch(run_cli, tmp_path):
    """x [2, 4] -> x - mean over every axis: it runs at any batch, but each sample's output
    depends on the others, so the batch stays fixed (the export had failed parity at batch 4)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=1), helper.make_node("Sub", ["x", "mean"], ["y"])]
    graph = helper.make_graph(nodes, "mixing", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mixing.onnx"))
    result = run_cli("export", "--model", tmp_path / "mixing.onnx", "-o", tmp_path / "out")
    assert result.code == 0, result.err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["inputs"][0]["shape"] == [2, 4]
    assert any("stays fixed" in note for note in manifest["notes"])


def test_existing_onnx_opset_conversion(run_cli, tmp_path):
    source = _fixed_batch_onnx(tmp_path / "fixed.onnx")
    out = tmp_path / "opset20"
    result = run_cli("export", "--model", source, "--opset", "20", "-o", out)
    assert result.code == 0, result.err
    assert read_manifest(out)["opset"] == 20


def test_opset_older_than_the_torch_exporter_is_refused(run_cli, tmp_path):
    result = run_cli("export", "--model", "digits_cnn", "--opset", "17", "-o", tmp_path / "out")
    assert result.code == 2 and "opset 18 or newer" in result.error_line


def test_reexport_replaces_the_artifact_whole(run_cli, tmp_path):
    out = tmp_path / "digits"
    assert run_cli("export", "--model", "digits_cnn", "-o", out).code == 0
    assert run_cli("export", "--model", "digits_cnn", "--static-batch", "-o", out).code == 0
    manifest = read_manifest(out)
    verify_files(out, manifest)
    assert manifest["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_parity_judges_an_all_but_zero_output_by_its_difference_alone():
    """A detector's probability map on random input is ~1e-7 everywhere: its cosine is noise
    (0.707 seen), while the difference says the export is exact."""
    from enginekit.exporter.parity import compare_outputs

    rng = np.random.default_rng(0)
    reference = rng.uniform(0, 2e-7, (1, 1, 8, 8)).astype(np.float32)
    candidate = np.flip(reference).copy()
    worst_abs, worst_cos, _ = compare_outputs([reference], [candidate], negligible=1e-3)
    assert worst_abs < 1e-6 and worst_cos == 1.0
    assert compare_outputs([reference], [candidate])[1] < 0.99  # without the tolerance the cosine would fail it
    # an output with real values still needs its direction: a flipped map is caught
    big = rng.uniform(0, 1, (1, 1, 8, 8)).astype(np.float32)
    assert compare_outputs([big], [np.flip(big).copy()], negligible=1e-3)[1] < 0.99


def test_parity_allows_a_difference_that_grows_with_the_outputs_scale():
    """A re-initialised LeViT's logits reach ~629 and its export differs by 0.0088 with cosine
    1.00000000: float32 rounding is relative. The limit is atol + rtol x the output's largest
    magnitude, per output, so a small output keeps the tight absolute limit."""
    from enginekit.exporter.parity import check_parity

    rng = np.random.default_rng(1)
    logits = rng.normal(0, 200, (2, 1000)).astype(np.float32)
    logits[0, 0] = 629.0
    small = rng.normal(0, 1, (2, 10)).astype(np.float32)
    rounded = logits + np.float32(0.0088) * np.sign(rng.normal(size=logits.shape)).astype(np.float32)

    def judge(outputs: list[np.ndarray], **limits: float):
        return check_parity(lambda feeds: [logits, small], lambda feeds: outputs, [({}, {})], "torch", "test", **limits)

    passed = judge([rounded, small])
    assert passed.passed and passed.max_abs == pytest.approx(0.0088, rel=1e-3) and passed.cosine > 0.9999999
    assert not judge([rounded, small], rtol=0.0).passed  # the absolute limit alone refused it
    assert not judge([logits, small + np.float32(0.0088)]).passed  # the same difference on a small output fails
    wrong = logits.copy()
    wrong[1, 5] += 1.0  # one wrong logit of a large output: beyond 1e-3 + 1e-4 x 629
    failed = judge([wrong, small])
    assert not failed.passed and "the output's largest magnitude" in failed.summary()
    assert failed.to_json()["tolerance"]["rtol"] == 1e-4


def test_parity_fails_a_nan_output():
    from enginekit.exporter.parity import compare_outputs

    reference = np.ones((1, 4), np.float32)
    broken = reference.copy()
    broken[0, 2] = np.nan
    assert compare_outputs([reference], [broken], negligible=1e-3, rtol=1e-4) == (float("inf"), 0.0, float("inf"))


@pytest.mark.parametrize("flag", ["--atol", "--rtol"])
def test_a_negative_parity_tolerance_is_refused_before_any_work(run_cli, tmp_path, flag):
    out = tmp_path / "out"
    result = run_cli("export", "--model", "digits_cnn", flag, "-1", "-o", out)
    assert result.code == 2 and "must be 0 or more" in result.error_line and f"(see {flag})" in result.error_line
    assert_nothing_written(out)
