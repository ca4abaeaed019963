"""The reference executor: ONNX graph chores (graph.py), ONNX Runtime sessions from checked bytes
(session.py) and activation probes (probe.py), shared by every stage after export."""
