"""Build a serialized TensorRT engine (.plan) from an ONNX graph with the TensorRT 10/11 API.

Only APIs present in both 10.x and 11.x are used: a strongly typed network (precision comes
from the graph: FP32, the FP16 mixed-precision ONNX, or explicit Q/DQ for INT8), no precision
builder flags and no calibrator; one optimization profile from the input specs; a workspace
limit; a timing cache file reused across builds.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enginekit.core.artifacts import atomic_write
from enginekit.core.errors import EnginekitError, InputError
from enginekit.core.machine import gpu_info
from enginekit.core.tensors import TensorSpec

# (min, opt, max) sizes per symbolic dim; overridable per build.
DEFAULT_DIM_RANGES = {"batch": (1, 8, 32), "sequence": (1, 128, 512)}
_OTHER_DIM_RANGE = (1, 64, 256)


@dataclass
class BuildSettings:
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    workspace_mb: int = 4096
    timing_cache: Path | None = None
    optimization_level: int | None = None  # TensorRT's default (3) when None


def profile_shapes(inputs: Sequence[TensorSpec], dim_ranges: Mapping[str, tuple[int, int, int]] | None = None,
                   dim_max: Mapping[str, int] | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shape of every input from its symbolic dims; a dim_max (e.g. the position
    table of a transformer) caps the default range."""
    ranges = {**DEFAULT_DIM_RANGES, **(dim_ranges or {})}
    shapes = {}
    for spec in inputs:
        triple = []
        for which in range(3):
            dims = []
            for dim in spec.shape:
                if isinstance(dim, int):
                    dims.append(dim)
                else:
                    size = ranges.get(dim, _OTHER_DIM_RANGE)[which]
                    dims.append(min(size, (dim_max or {}).get(dim, size)))
            triple.append(tuple(dims))
        shapes[spec.name] = tuple(triple)
    return shapes


def parse_dim_ranges(values: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """`batch=1,8,32` -> {"batch": (1, 8, 32)}; min <= opt <= max."""
    ranges = {}
    for value in values:
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", value)
        if not match:
            raise InputError(f"profile '{value}' is not NAME=MIN,OPT,MAX (e.g. batch=1,8,32)", option="profiles")
        lo, opt, hi = (int(match.group(i)) for i in (2, 3, 4))
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"profile '{value}': needs 1 <= min <= opt <= max", option="profiles")
        ranges[match.group(1)] = (lo, opt, hi)
    return ranges


def default_timing_cache(trt_version: str) -> Path:
    """One timing cache per TensorRT version and GPU: caches are only valid for both."""
    from enginekit.core.cache import cache_dir

    gpu = (gpu_info() or {}).get("name", "unknown-gpu")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{trt_version}-{gpu}").strip("-")
    folder = cache_dir() / "tensorrt"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"timing-{slug}.cache"


def parser_errors(parser: Any) -> str:
    """All ONNX parser errors, each naming the node and its op."""
    messages = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        messages.append(f"node '{error.node_name()}' ({error.node_operator()}): {error.desc()}")
    return "; ".join(messages) or "the ONNX parser failed without saying why"


def network_flags(trt: Any) -> int:
    """The creation flags of a strongly typed network: STRONGLY_TYPED is 1 in TensorRT 10 (bit
    value 2) and 0 in TensorRT 11, where every network is strongly typed and the flag is only
    kept for compatibility; taken by name, never as a number, so one call is right on both."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_plan(onnx_path: Path, settings: BuildSettings, plan_path: Path) -> dict[str, Any]:
    from enginekit.targets.tensorrt.support import require_tensorrt

    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise InputError(f"TensorRT's ONNX parser failed: {parser_errors(parser)}", onnx_path)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in settings.profile.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    cache_path = settings.timing_cache or default_timing_cache(trt.__version__)
    if not config.set_timing_cache(_load_timing_cache(config, cache_path), False):
        # a cache from another driver or MIG slice has a header that does not match this device
        warnings.warn(f"timing cache {cache_path} does not match this device; starting a new one", stacklevel=2)
        if not config.set_timing_cache(config.create_timing_cache(b""), False):
            warnings.warn("TensorRT refused a fresh timing cache too; building without one", stacklevel=2)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EnginekitError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    plan_path.write_bytes(bytes(serialized))
    cache = config.get_timing_cache()
    if cache is None:
        warnings.warn(f"TensorRT returned no timing cache; {cache_path} is left as it was", stacklevel=2)
    else:
        cache_bytes = bytes(cache.serialize())
        atomic_write(cache_path, lambda p: p.write_bytes(cache_bytes))
    return {**describe_build(settings), "timing_cache": str(cache_path)}


def describe_build(settings: BuildSettings) -> dict[str, Any]:
    """What the manifest records of a TensorRT build: version, GPU, profile, workspace."""
    from enginekit.targets.tensorrt.support import require_tensorrt

    gpu = gpu_info() or {}
    return {
        "version": require_tensorrt().__version__,
        "gpu": gpu.get("name"),
        "compute_capability": gpu.get("compute_capability"),
        "strongly_typed": True,
        "profile": {name: [list(s) for s in shapes] for name, shapes in settings.profile.items()},
        "workspace_mb": settings.workspace_mb,
        "timing_cache": str(settings.timing_cache) if settings.timing_cache else None,
    }


def _load_timing_cache(config: Any, path: Path) -> Any:
    """The cache at `path`, or a fresh one when it is absent or corrupt (reported, then rebuilt)."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(data)
        if cache is None:
            raise ValueError("TensorRT rejected it")
        return cache
    except Exception as exc:  # TensorRT raises its own error types for a bad cache
        warnings.warn(f"timing cache {path} is unusable ({exc}); starting a new one", stacklevel=2)
        return config.create_timing_cache(b"")
