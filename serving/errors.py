"""Exception types of cifar-onnx; the pipeline's own errors derive from these."""


class CifarOnnxError(Exception):
    """Base class: a failure the user can act on, reported as one line."""


class ImageError(CifarOnnxError):
    """An image file that cannot be read, with the path and the reason in the message."""


class ModelContractError(CifarOnnxError):
    """An ONNX file or an input that does not match the contract in `serving.contract`."""


class ProviderError(CifarOnnxError):
    """An execution provider that was requested explicitly but that onnxruntime could not use."""
