"""Framework-free serving: the ONNX contract, image decoding and the Predictor.

Imports only onnxruntime, numpy, Pillow and (for the command) click.
"""

from serving.contract import CIFAR10_CLASSES, INPUT_NAME, OUTPUT_NAMES
from serving.errors import CifarOnnxError, ImageError, ModelContractError
from serving.images import load_image

__all__ = [
    "CIFAR10_CLASSES", "INPUT_NAME", "OUTPUT_NAMES",
    "CifarOnnxError", "ImageError", "ModelContractError",
    "load_image",
]
