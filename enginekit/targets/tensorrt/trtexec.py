"""`--builder trtexec`: build the same engine with NVIDIA's trtexec (where it is on PATH) with
equivalent flags, and read its JSON timing export for comparison with enginekit's runner."""

from __future__ import annotations

import json
import re
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


_RUNNING = re.compile(r"TensorRT\.trtexec \[TensorRT v(\d+)\]")
_VERSION_LINE = re.compile(r"TensorRT version: (\d+\.\d+\.\d+)")


def parse_trtexec_version(log: str) -> str | None:
    """trtexec's own TensorRT version from its log: the `&&&& RUNNING TensorRT.trtexec [TensorRT
    v110100]` line (major*10000 + minor*100 + patch) or `TensorRT version: 11.1.0`."""
    match = _VERSION_LINE.search(log)
    if match:
        return match.group(1)
    match = _RUNNING.search(log)
    if match:
        number = int(match.group(1))
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return None


def summarize_times(times: list[dict[str, Any]]) -> dict[str, float]:
    """Mean GPU compute and H2D + compute + D2H latency (ms) from trtexec's --exportTimes records.
    trtexec's `latencyMs` is that sum (its "ideal latency"; TensorRT 11's trtexec leaves transfers
    out by default), measured at the profile's opt shape: neither number is the harness's batch-1
    end-to-end latency, so they are recorded under trtexec's name, with the shape."""
    if not times:
        return {}
    compute = [t["computeMs"] for t in times if "computeMs" in t]
    latency = [t["latencyMs"] for t in times if "latencyMs" in t]
    return {"iterations": len(times), "gpu_compute_ms": sum(compute) / len(compute) if compute else float("nan"),
            "h2d_compute_d2h_ms": sum(latency) / len(latency) if latency else float("nan")}


def trtexec_version(executable: str) -> str:
    """Ask trtexec which TensorRT it is (it prints its version as it starts)."""
    try:
        result = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120, preexec_fn=die_with_parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MissingDependencyError(f"trtexec at {executable} does not run ({exc})", option="builder") from None
    version = parse_trtexec_version(result.stdout + result.stderr)
    if version is None:
        raise MissingDependencyError(f"trtexec at {executable} does not say which TensorRT it is", option="builder")
    return version


def build_with_trtexec(onnx_path: Path, settings: BuildSettings, plan_path: Path, work: Path, python_version: str) -> dict[str, Any]:
    """The engine built by trtexec. Its TensorRT must be the Python package's (enginekit loads
    the plan with the Python runtime to evaluate it; a plan from another version does not
    deserialize, and the two must not share one timing cache)."""
    executable = shutil.which("trtexec")
    if executable is None:
        raise MissingDependencyError("the trtexec builder needs trtexec on PATH (it ships with TensorRT)", option="builder")
    version = trtexec_version(executable)
    if version != python_version:
        raise MissingDependencyError(f"trtexec is TensorRT {version} but the tensorrt Python package is {python_version}; "
                                     "their plans and timing caches do not mix: put the matching trtexec on PATH", option="builder")
    times_path = work / "trtexec-times.json"
    command = trtexec_command(onnx_path, settings, plan_path, times_path, executable)
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=die_with_parent)
    if result.returncode != 0:
        tail = " ".join(result.stdout.strip().splitlines()[-3:])
        raise EnginekitError(f"trtexec failed (exit {result.returncode}): {tail[:300]}")
    opt_shapes = {name: list(shapes[1]) for name, shapes in settings.profile.items()}
    return {"command": command, "trtexec_version": version,
            "trtexec_timing": {**summarize_times(json.loads(times_path.read_text())), "shapes": opt_shapes,
                               "note": "trtexec's own timing at the profile's opt shapes, H2D + compute + D2H; "
                                       "not comparable to the benchmark's batch-1 end-to-end latency"}}
