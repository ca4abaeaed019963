"""What a model server needs to know about one artifact folder: its verified manifest, the file
the server loads, the batch dimension, and Triton's spelling of its I/O types.

Everything here is read from the manifest (written by enginekit at build time and checked
against the files' hashes), never from the model file itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from enginekit.core.artifacts import Manifest
from enginekit.core.errors import InputError
from enginekit.core.tensors import TensorSpec
from enginekit.targets.base import Serving, Target
from enginekit.targets.registry import verified_artifact

# numpy dtype name -> Triton's DataType enum name (model_config.proto)
TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
                "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                "bfloat16": "TYPE_BF16", "str": "TYPE_STRING", "object": "TYPE_STRING"}
BATCH = "batch"


@dataclass
class DeployArtifact:
    """One artifact folder, verified, as a server will load it."""

    folder: Path
    manifest: Manifest
    target: Target
    model_file: str  # relative to the folder

    @property
    def serving(self) -> Serving:
        return self.target.serving

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.manifest.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.manifest.outputs

    @property
    def batched(self) -> bool:
        """Every input and output leads with the symbolic batch dim: the server may batch requests."""
        specs = self.inputs + self.outputs
        return bool(specs) and all(spec.shape and spec.shape[0] == BATCH for spec in specs)

    def default_name(self) -> str:
        """`<model>-<target>-<precision>`, in the characters every server accepts in a model name."""
        text = f"{self.manifest.model or self.folder.name}-{self.target.name}-{self.manifest.precision}"
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-") or "model"

    def record(self) -> dict[str, Any]:
        """What the deploy record keeps of the artifact it came from."""
        return {"artifact": str(self.folder), "build_key": self.manifest.get("build_key"), "model": self.manifest.model,
                "target": self.target.name, "precision": self.manifest.precision}


def open_deploy_artifact(folder: str | Path) -> DeployArtifact:
    """Read and verify an artifact folder for deployment; an unverifiable one is an InputError."""
    folder = Path(folder)
    manifest, target = verified_artifact(folder)
    model_file = next((name for name in target.serving.model_files if (folder / name).is_file()), None)
    if model_file is None:
        raise InputError(f"the {target.name} target declares no model file a server can load", folder)
    for spec in manifest.inputs + manifest.outputs:
        if spec.dtype not in TRITON_TYPES:
            raise InputError(f"tensor '{spec.name}' has dtype {spec.dtype}, which model servers do not carry", folder)
    return DeployArtifact(folder, manifest, target, model_file)


def served_dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton's `dims`: the shape without the batch dim when the server batches, every symbolic
    dim as -1 (variable)."""
    shape = spec.shape[1:] if batched else spec.shape
    return [dim if isinstance(dim, int) else -1 for dim in shape]
