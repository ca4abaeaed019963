"""`--builder trtexec`: build the same engine with NVIDIA's trtexec (where it is on PATH) with
equivalent flags, and read its JSON timing export for comparison with enginekit's runner."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from enginekit.targets.tensorrt.builder import BuildSettings
from enginekit.core.errors import EnginekitError, MissingDependencyError
from enginekit.core.interrupt import die_with_parent


def _shape_flag(profile: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def trtexec_command(onnx_path: Path, settings: BuildSettings, plan_path: Path, times_path: Path, executable: str = "trtexec") -> list[str]:
    """The trtexec flags matching build_plan: strongly typed, the same profile, workspace and
    timing cache (no --fp16/--int8: precision comes from the graph, as TensorRT 11 requires)."""
    command = [executable, f"--onnx={onnx_path}", "--stronglyTyped", f"--saveEngine={plan_path}",
               f"--memPoolSize=workspace:{settings.workspace_mb}M", f"--exportTimes={times_path}"]
    if settings.profile:
        command += [f"--minShapes={_shape_flag(settings.profile, 0)}", f"--optShapes={_shape_flag(settings.profile, 1)}",
                    f"--maxShapes={_shape_flag(settings.profile, 2)}"]
    if settings.timing_cache:
        command.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.optimization_level is not None:
        command.append(f"--builderOptimizationLevel={settings.optimization_level}")
    return command


def summarize_times(times: list[dict[str, Any]]) -> dict[str, float]:
    """Mean GPU compute and end-to-end latency (ms) from trtexec's --exportTimes records."""
    if not times:
        return {}
    compute = [t["computeMs"] for t in times if "computeMs" in t]
    latency = [t["latencyMs"] for t in times if "latencyMs" in t]
    return {"iterations": len(times), "gpu_compute_ms": sum(compute) / len(compute) if compute else float("nan"),
            "end_to_end_ms": sum(latency) / len(latency) if latency else float("nan")}


def build_with_trtexec(onnx_path: Path, settings: BuildSettings, plan_path: Path, work: Path) -> dict[str, Any]:
    executable = shutil.which("trtexec")
    if executable is None:
        raise MissingDependencyError("the trtexec builder needs trtexec on PATH (it ships with TensorRT)", option="builder")
    times_path = work / "trtexec-times.json"
    command = trtexec_command(onnx_path, settings, plan_path, times_path, executable)
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=die_with_parent)
    if result.returncode != 0:
        tail = " ".join(result.stdout.strip().splitlines()[-3:])
        raise EnginekitError(f"trtexec failed (exit {result.returncode}): {tail[:300]}")
    return {"command": command, "timing": summarize_times(json.loads(times_path.read_text()))}
