"""The closed set of training frameworks and the check that one is installed."""

import importlib.util

from pipeline.errors import CifarOnnxError

# framework name -> (module that must import, extra that installs it)
FRAMEWORKS = {
    "torch": ("torch", "torch"),
    "keras": ("tensorflow", "keras"),
}


def require_framework(framework):
    """Raise CifarOnnxError naming the extra to install when `framework` is missing."""
    if framework not in FRAMEWORKS:
        choices = ", ".join(FRAMEWORKS)
        raise CifarOnnxError(f"unknown framework {framework!r}: expected one of {choices}")
    module, extra = FRAMEWORKS[framework]
    if importlib.util.find_spec(module) is None:
        raise CifarOnnxError(
            f"framework {framework!r} needs the {module!r} package, which is not installed: "
            f"run pip install 'cifar-onnx[{extra}]'"
        )


def import_tensorflow():
    """Import and return tensorflow with its C++ start-up logging quietened.

    TensorFlow writes oneDNN and CUDA-probe notices to stderr at import; level 2
    keeps warnings and errors. A value the user set in the environment wins.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow
