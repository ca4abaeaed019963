"""Quantize: write the Q/DQ ONNX (the hub every target consumes) from an FP32 graph and a
CalibrationTable, in the integer encoding each target runs fastest, then correct biases and
gate on accuracy."""
