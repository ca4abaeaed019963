"""The build stage: every target x precision from one model, sharing one calibration, one Q/DQ
graph per encoding and one FP32 reference, each artifact gated on accuracy before it is published."""

from enginekit.builder.options import BuildOptions
from enginekit.builder.pipeline import BuildResult, Cell, build, build_many, sensitivity

__all__ = ["BuildOptions", "BuildResult", "Cell", "build", "build_many", "sensitivity"]
