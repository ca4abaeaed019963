"""enginekit: trained model -> checked ONNX -> calibrated INT8 -> inference engines, with benchmarks."""

import os

# TensorFlow's C++ start-up chatter (oneDNN notices, CPU-feature lines) would bury enginekit's own
# one-line messages; a user who wants it back sets TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"
