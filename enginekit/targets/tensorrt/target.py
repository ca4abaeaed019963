"""The TensorRT target: engines from the FP32 ONNX, the FP16 mixed-precision ONNX or the Q/DQ
INT8 ONNX, built as strongly typed networks (precision from the graph, never builder flags)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from enginekit.core.errors import InputError
from enginekit.core.machine import toolchain
from enginekit.targets.base import Built, BuildInputs, Runner, Serving, Target
from enginekit.targets.tensorrt.runner import PLAN_FILE
from enginekit.targets.tensorrt.support import PRECISIONS, require_tensorrt, unavailable_reason


class TensorRTTarget(Target):
    name = "tensorrt"
    precisions = PRECISIONS
    serving = Serving((PLAN_FILE,), triton_platform="tensorrt_plan", triton_default_file=PLAN_FILE, device="GPU")
    encoding = "int8"  # symmetric int8, zero point 0: the only Q/DQ TensorRT accepts
    cpu_threads = False  # an engine runs on the GPU
    # profile: {dim: (min, opt, max)} overrides; builder: "api" or "trtexec" (same flags, its timings kept)
    option_defaults = {"profile": {}, "workspace_mb": 4096, "builder": "api"}

    def unavailable(self, precision: str) -> str | None:
        return unavailable_reason()

    def key_material(self, options: Mapping[str, Any]) -> dict[str, Any]:
        profile = {k: list(v) for k, v in sorted(dict(options["profile"]).items())}
        return {"options": {**options, "profile": profile}, "toolchain": toolchain("tensorrt")}

    def build(self, inputs: BuildInputs) -> Built:
        import onnx

        from enginekit.targets.tensorrt.builder import BuildSettings, build_plan, default_timing_cache, describe_build, profile_shapes
        from enginekit.targets.tensorrt.runner import PLAN_FILE, TensorRTRunner

        source = inputs.fp32.path
        if inputs.precision == "int8":
            from enginekit.targets.tensorrt.graphs import tensorrt_qdq_problems

            qdq = inputs.qdq(inputs.encoding).model
            source = inputs.stage / "model.int8.onnx"
            problems = tensorrt_qdq_problems(qdq)
            if problems:
                raise InputError(f"the Q/DQ graph breaks TensorRT's rules: {'; '.join(problems[:3])}", inputs.fp32.origin)
            onnx.save(qdq, str(source))
        elif inputs.precision == "fp16":
            from enginekit.targets.tensorrt.graphs import to_fp16

            source = inputs.stage / "model.fp16.onnx"
            onnx.save(to_fp16(inputs.fp32.proto), str(source))
        options = inputs.options
        dim_max = inputs.fp32.spec.dim_max if inputs.fp32.spec else {}
        settings = BuildSettings(profile=profile_shapes(inputs.fp32.inputs, options["profile"], dim_max), workspace_mb=options["workspace_mb"],
                                 timing_cache=default_timing_cache(require_tensorrt().__version__))
        if options["builder"] == "trtexec":
            from enginekit.targets.tensorrt.trtexec import build_with_trtexec

            trt_version = require_tensorrt().__version__
            info = {**describe_build(settings), **build_with_trtexec(source, settings, inputs.stage / PLAN_FILE, inputs.stage, trt_version)}
        else:
            info = build_plan(source, settings, inputs.stage / PLAN_FILE)
        return Built(TensorRTRunner(inputs.stage, built=info), {"tensorrt": info})

    def open(self, folder: Path, manifest: Mapping[str, Any], threads: int | None = None, **runtime: Any) -> Runner:
        from enginekit.targets.tensorrt.runner import TensorRTRunner

        return TensorRTRunner(folder, built=manifest.get("tensorrt", {}))


TARGET = TensorRTTarget()
