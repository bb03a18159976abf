"""ONNX exporters for both frameworks, the shared metadata and the contract checks."""
