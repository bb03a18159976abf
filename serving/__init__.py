"""Framework-free serving: the ONNX contract, image decoding and the Predictor.

Imports only onnxruntime, numpy, Pillow and (for the command) click; onnxruntime is
imported when the first Predictor is built, not by `import serving`.
"""

from serving.contract import CIFAR10_CLASSES, INPUT_NAME, OUTPUT_NAMES
from serving.errors import CifarOnnxError, ImageError, ModelContractError, ProviderError
from serving.images import load_image
from serving.predictor import PROVIDER_CHOICES, Prediction, Predictor

__all__ = [
    "CIFAR10_CLASSES", "INPUT_NAME", "OUTPUT_NAMES",
    "CifarOnnxError", "ImageError", "ModelContractError", "ProviderError",
    "load_image",
    "PROVIDER_CHOICES", "Prediction", "Predictor",
]
