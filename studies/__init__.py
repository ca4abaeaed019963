"""Peer studies: enginekit against the tools users would otherwise reach for (ONNX Runtime's
quantize_static, NNCF, the TFLite converter, the runtimes' own benchmark tools), each run with
`python -m studies.<name>` from a checkout. They are not part of the installed package; they
time and score through the product's own harness (enginekit.benchmark) and accuracy metrics."""
