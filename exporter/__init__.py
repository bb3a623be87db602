"""Checkpoint -> ONNX model repository: export, parity, latency, calibration."""
