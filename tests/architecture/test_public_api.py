"""The public API: importing enginekit is light and side-effect free, and the README's Python
example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_import_enginekit_loads_nothing_heavy_and_leaves_the_environment_alone():
    code = ("import os, sys; before = dict(os.environ); import enginekit; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'onnx', 'onnxruntime', 'torch', 'tensorflow', 'openvino')); "
            "print(heavy, dict(os.environ) == before, callable(enginekit.load), callable(enginekit.build))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[] True True True"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_api_example_runs(tmp_path):
    result = subprocess.run([sys.executable, "-c", readme_example()], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("top1_agreement ") and lines[0].endswith("cache hit False")
    assert lines[1] == "{'logits': (4, 10)}" and lines[2].startswith("['minmax', 'mse']")


def test_load_opens_every_target_built_here_with_named_outputs(tmp_path):
    import numpy as np

    import enginekit as ek
    from enginekit.targets import get_target, target_names

    here = [name for name in target_names() if get_target(name).unavailable("fp32") is None]
    cells = ek.build_many("digits_cnn", here, ["fp32"], tmp_path, ek.BuildOptions())
    built = [cell for cell in cells if cell.result is not None]
    assert {cell.target for cell in built} == set(here) and "onnxruntime" in here
    for cell in built:
        with ek.load(cell.folder) as runner:
            outputs = runner.infer({"image": np.zeros((3, 1, 8, 8), np.float32)})
        assert list(outputs) == ["logits"] and outputs["logits"].shape == (3, 10), cell.target


def test_quantize_is_a_build_with_a_given_table(run_cli, tmp_path):
    table = tmp_path / "r.json"
    assert run_cli("calibrate", "-m", "digits_cnn", "-n", "64", "-o", table).code == 0
    assert run_cli("quantize", "-m", "digits_cnn", "-t", table, "-o", tmp_path / "q").code == 0
    assert run_cli("build", "-m", "digits_cnn", "--target", "onnxruntime", "--precision", "int8", "-t", table, "-o", tmp_path / "b").code == 0
    quantized, built = (__import__("json").loads((tmp_path / f / "manifest.json").read_text()) for f in ("q", "b"))
    assert quantized.keys() == built.keys() and quantized["build_key"] == built["build_key"]
    openvino = run_cli("quantize", "-m", "digits_cnn", "-t", table, "--target", "openvino", "-o", tmp_path / "ov")
    if openvino.code == 0:
        assert (tmp_path / "ov" / "model.xml").is_file() and (tmp_path / "ov" / "model.bin").is_file()
    else:
        assert openvino.code == 2 and "'openvino' extra" in openvino.error_line
