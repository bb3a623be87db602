"""Checkpoint -> ONNX model repository: export, parity, latency, calibration."""

__version__ = "0.1.0"
