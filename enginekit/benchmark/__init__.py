"""Measurement: latency statistics now; the full harness (throughput sweeps, reports) builds on it."""
