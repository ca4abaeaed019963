"""enginekit: trained model -> checked ONNX -> calibrated INT8 -> inference engines, with benchmarks."""

__version__ = "0.1.0"
