"""OpenVINO Model Server repositories: `<name>/<version>/` per artifact (IR, ONNX or TFLite, as
OVMS reads each by its file extension) and one `config.json` whose `model_config_list` names
them all. OVMS compiles every format with OpenVINO, so the plugin config carries the hints the
artifact was measured with, and f32 inference precision for FP32 artifacts (OpenVINO would
otherwise run them in bf16 on CPUs with AMX)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enginekit.core.errors import InputError
from enginekit.deploy.artifact import DeployArtifact
from enginekit.targets.registry import artifact_threads

CONFIG = "config.json"
# keys and types of a model's "config" object: OVMS's schema (model_server src/schema.cpp,
# modelConfigSchema, additionalProperties false); "name" is required by the schema, "base_path" by its docs
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "base_path": (str,), "target_device": (str,), "batch_size": (str, int), "shape": (str, dict),
    "layout": (str, dict), "model_version_policy": (dict,), "nireq": (int,), "plugin_config": (dict,),
    "allow_cache": (bool,), "graph_path": (str,), "subconfig": (str,), "custom_loader_options": (dict,),
}
TOP_LEVEL = ("model_config_list", "custom_loader_config_list", "pipeline_config_list", "mediapipe_config_list",
             "custom_node_library_config_list", "monitoring")
VERSION_POLICIES = {"all": None, "specific": "versions", "latest": "num_versions"}
REQUIRED = ("name", "base_path")


def ovms_entry(artifact: DeployArtifact, name: str, threads: int | None = None) -> dict[str, Any]:
    """One `model_config_list` entry; `base_path` relative to config.json (OVMS resolves it so)."""
    compiled = (artifact.manifest.get("openvino") or {}).get("compile_config") or {}
    plugin = {"PERFORMANCE_HINT": compiled.get("PERFORMANCE_HINT", "LATENCY")}
    if threads := artifact_threads(artifact.manifest, threads):  # the caller's, else the count its build measured fastest
        plugin["INFERENCE_NUM_THREADS"] = str(threads)
    if artifact.manifest.precision == "fp32":
        plugin["INFERENCE_PRECISION_HINT"] = "f32"
    if not artifact.serving.ovms:
        raise InputError(f"OpenVINO Model Server does not load {artifact.target.name} artifacts", artifact.folder)
    if (artifact.manifest.get("integer_ops") or {}).get("channels_last_max_pools"):
        raise InputError("its graph runs max pools as ONNX Runtime's own NhwcMaxPool, which OpenVINO Model Server cannot read; "
                         "serve this model's openvino artifact", artifact.folder)
    return {"config": {"name": name, "base_path": name, "target_device": "CPU", "plugin_config": plugin}}


def merged_config(existing: Mapping[str, Any] | None, entries: list[dict[str, Any]]) -> str:
    """config.json text: the existing model list with these entries added or replaced by name."""
    models = [dict(e) for e in (existing or {}).get("model_config_list") or []]
    names = {entry["config"]["name"] for entry in entries}
    kept = [e for e in models if not (isinstance(e.get("config"), dict) and e["config"].get("name") in names)]
    document = {**(existing or {}), "model_config_list": kept + entries}
    return json.dumps(document, indent=2) + "\n"


def read_config(repo: Path) -> dict[str, Any] | None:
    from enginekit.core.loaders import load_json_file

    path = repo / CONFIG
    if not path.exists():
        return None
    document = load_json_file(path, "OVMS config")
    if not isinstance(document, dict):
        raise InputError("OVMS config is not a JSON object", path)
    return document
