"""What a result was measured on: CPU, ISA, GPU and library versions, recorded in every manifest."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import shutil
import subprocess
from typing import Any

# ISA flags that decide which kernels run (VNNI and AMX for INT8, AVX-512 BF16/AMX for bf16).
_INTERESTING_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16", "neon", "asimd", "sve",
)


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def gpu_info() -> dict[str, Any] | None:
    """Name, driver and compute capability of the first NVIDIA GPU, or None when there is none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, driver, capability, memory = (part.strip() for part in out[0].split(","))
    return {"name": name, "driver": driver, "compute_capability": capability, "memory": memory, "count": len(out)}


def int8_pairs_saturate() -> bool:
    """Whether this CPU's u8 x s8 dot products can saturate: an x86 CPU without VNNI (AVX2, or
    AVX-512 without VNNI) runs ONNX Runtime's and OpenVINO's u8 x s8 kernels with vpmaddubsw,
    which adds each pair of products in int16 and saturates past 32767 (255 x 127 x 2 = 64770).
    VNNI (vpdpbusd) and AMX accumulate in int32; Arm and GPUs have no such step. Unknown flags
    (no /proc/cpuinfo) count as not saturating."""
    if platform.machine().lower() not in ("x86_64", "amd64", "x86", "i686"):
        return False
    flags = cpu_flags()
    return bool(flags) and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "isa": sorted(f for f in _INTERESTING_FLAGS if f in cpu_flags()),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": gpu_info(),
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def toolchain(*packages: str) -> dict[str, str]:
    """Versions of enginekit and the named distributions that are installed."""
    from enginekit import __version__

    versions = {"enginekit": __version__}
    for name in packages:
        version = package_version(name)
        if version is not None:
            versions[name] = version
    return versions


def process_memory_mb(field: str = "VmRSS") -> float:
    """A memory figure of this process from /proc/self/status in MB (VmRSS now, VmHWM = peak); NaN off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
