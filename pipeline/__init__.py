"""Training side of cifar-onnx: data, architectures, the two builds, transfer, verify.

torch and tensorflow are imported inside the functions that need them.
"""
