"""enginekit: trained model -> checked ONNX -> calibrated INT8 -> inference artifacts, with
benchmarks and accuracy gates.

    import enginekit as ek
    ek.export("efficientnet_lite0", "out/onnx")
    ek.build("out/onnx", "onnxruntime", "int8", "out/ort-int8")
    runner = ek.load("out/ort-int8"); runner.infer({"image": batch})

Importing enginekit loads nothing heavy and changes nothing in the process environment; each
function imports the stages it needs when it is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "export": "enginekit.api", "calibrate": "enginekit.api", "build": "enginekit.api", "build_many": "enginekit.api",
    "build_matrix": "enginekit.api", "load_matrix": "enginekit.api", "MatrixModel": "enginekit.builder.matrix",
    "MatrixResult": "enginekit.builder.matrix", "quantize": "enginekit.api", "sensitivity": "enginekit.api", "bench": "enginekit.api", "compare": "enginekit.api", "load": "enginekit.api",
    "deploy_triton": "enginekit.api", "deploy_ovms": "enginekit.api", "check_deployment": "enginekit.api", "TritonOptions": "enginekit.deploy.triton",
    "Calibration": "enginekit.api", "BuildOptions": "enginekit.builder.options", "BuildResult": "enginekit.builder.pipeline",
    "Cell": "enginekit.builder.pipeline", "QuantizeSettings": "enginekit.quantization.pipeline", "SourceOptions": "enginekit.exporter.reference", "Condition": "enginekit.accuracy.gate",
    "Manifest": "enginekit.core.artifacts", "TensorSpec": "enginekit.core.tensors", "Runner": "enginekit.targets.base",
    "Target": "enginekit.targets.base", "register_target": "enginekit.targets.registry", "BenchSettings": "enginekit.benchmark.harness",
    "EnginekitError": "enginekit.core.errors", "InputError": "enginekit.core.errors", "GateError": "enginekit.core.errors",
    "MissingDependencyError": "enginekit.core.errors", "progress": "enginekit.core.progress",
}
_RENAMED = {"register_target": "register"}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """The public names, imported on first use (so `import enginekit` stays light)."""
    if name not in _API:
        raise AttributeError(f"module 'enginekit' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    value = module if name == "progress" else getattr(module, _RENAMED.get(name, name))
    globals()[name] = value
    return value
