"""Exception types of the training side, one per stage, so callers catch them precisely."""

from serving.errors import CifarOnnxError


class DataError(CifarOnnxError):
    """A dataset source that is missing, malformed, corrupt or unreachable."""


class TrainError(CifarOnnxError):
    """A training run that cannot start or continue (bad option, checkpoint, device)."""


class ExportError(CifarOnnxError):
    """An export that failed or produced a file that breaks the ONNX contract."""


class VerificationError(CifarOnnxError):
    """A verification with at least one failed check."""
