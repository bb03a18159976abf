"""ONNX exporters for both frameworks, the shared metadata and the contract checks.

The two exporters have mirrored signatures, `export_onnx(checkpoint, path, opset)`,
so the framework is the only difference between them.
"""

# Highest opset that every part of the chain supports: tf2onnx 1.17 stops at 18
# (tf2onnx.constants.OPSET_TO_IR_VERSION), while torch.onnx 2.14 (dynamo, 18 and up),
# onnx 1.23 and onnxruntime 1.31 all go further.
DEFAULT_OPSET = 18
