"""The framework-free Predictor: an onnxruntime session over one contract-conforming export.

Serving's end of data -> train -> export -> verify -> serve. It checks the model's
metadata and signature against `serving.contract` when it loads, checks every input
before running it, and imports onnxruntime only when the first Predictor is built.
"""

import contextlib
import dataclasses
import io
import json
import logging
import os
import sys

import numpy as np
from PIL import Image

from serving import contract
from serving.errors import ModelContractError, ProviderError
from serving.images import load_image

logger = logging.getLogger(__name__)

# The provider requests a caller can make; `auto` takes CUDA when a session really gets it.
PROVIDER_CHOICES = ("auto", "cpu", "cuda")
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

DEFAULT_BATCH_SIZE = 256  # images per session.run call

# onnxruntime's default logger severity (0 verbose ... 4 fatal); there is no getter,
# so this is what the logger is set back to after a quiet CUDA attempt.
_ORT_DEFAULT_LOG_SEVERITY = 2
_ORT_FATAL_ONLY = 4

_onnxruntime_checked = False  # set once import_onnxruntime has run in this process


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The result for one image: the top-1 class and the `top_k` best classes, best first."""

    label: str  # class name from the model's metadata
    index: int  # class index, 0 <= index < len(class_names)
    probability: float  # softmax probability of `label`, 0-1
    top_k: tuple  # ((label, probability), ...), length top_k, the first entry is (label, probability)

    def as_dict(self):
        """Return a JSON-ready dict with the same fields; top_k as a list of {label, probability}."""
        return {
            "label": self.label,
            "index": self.index,
            "probability": self.probability,
            "top_k": [{"label": label, "probability": p} for label, p in self.top_k],
        }


class Predictor:
    """Classify images with one ONNX export of the contract.

    `model_path`: the .onnx file. `providers`: "auto" (CUDA when a session really gets
    it, else CPU), "cpu", or "cuda" (ProviderError when CUDA cannot be used, never a
    silent fallback). `threads`: onnxruntime's intra-op thread count, None for its
    default (one per physical core).

    Raises ModelContractError when the file cannot be loaded, lacks the contract's
    metadata, or has other input or output names, types or shapes.
    """

    def __init__(self, model_path, providers="auto", threads=None):
        if providers not in PROVIDER_CHOICES:
            raise ValueError(f"providers must be one of {', '.join(PROVIDER_CHOICES)}, got {providers!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        self.model_path = os.fspath(model_path)
        if not os.path.isfile(self.model_path):
            raise ModelContractError(f"model file not found: {self.model_path}")

        ort = import_onnxruntime()
        self._session = _create_session(ort, self.model_path, providers, threads)
        self.providers = list(self._session.get_providers())
        logger.info("onnxruntime %s on %s, model %s", ort.__version__, ", ".join(self.providers), self.model_path)

        self.metadata = parse_metadata(self._session.get_modelmeta().custom_metadata_map, self.model_path)
        self.class_names = tuple(self.metadata[contract.META_CLASS_NAMES])
        self._input_dtype, self._input_dims = _check_signature(self._session, len(self.class_names), self.model_path)

    def __repr__(self):
        return f"Predictor({self.model_path!r}, providers={self.providers})"

    @property
    def expected_input(self):
        """The session's declared input as text, e.g. 'uint8 [N,32,32,3]'."""
        dims = ",".join("N" if not isinstance(d, int) else str(d) for d in self._input_dims)
        return f"{self._input_dtype.name} [{dims}]"

    def predict(self, images, top_k=1, batch_size=DEFAULT_BATCH_SIZE):
        """Classify `images` and return one Prediction per image, in input order.

        `images` is one image or a list (any iterable) of images. An image is a path,
        a Pillow image (both decoded with `serving.load_image`) or a uint8 array
        [32, 32, 3]; a uint8 array [N, 32, 32, 3] counts as N images, alone or in a list.
        Images are decoded and run `batch_size` at a time.
        Raises ImageError for an unreadable file and ModelContractError for an array
        of another dtype or shape, before anything of that batch runs.
        """
        self._check_top_k(top_k)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        predictions = []
        for batch in _iter_batches(images, batch_size, self.check_batch):
            predictions.extend(self.to_predictions(self.predict_probabilities(batch), top_k))
        return predictions

    def predict_probabilities(self, batch):
        """Run uint8 [N, 32, 32, 3] `batch` and return the float32 [N, classes] probabilities."""
        batch = self.check_batch(batch)
        if len(batch) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        (probabilities,) = self._session.run([contract.PROBABILITIES_NAME], {contract.INPUT_NAME: batch})
        return probabilities

    def to_predictions(self, probabilities, top_k=1):
        """Turn [N, classes] probabilities into N Predictions; ties go to the lower class index."""
        self._check_top_k(top_k)
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
        predictions = []
        for row, order in zip(probabilities, ranked):
            best = [(self.class_names[i], float(row[i])) for i in order]
            predictions.append(Prediction(best[0][0], int(order[0]), best[0][1], tuple(best)))
        return predictions

    def check_batch(self, batch):
        """Return `batch` as a C-contiguous NHWC array if it matches the session's input.

        One HWC image is accepted too and comes back as a batch of one.

        Raises ModelContractError "expected uint8 [N,32,32,3], got float64 [32,32]" otherwise.
        """
        array = np.asarray(batch)
        batch = array[np.newaxis] if array.ndim == len(self._input_dims) - 1 else array
        matches = (
            batch.dtype == self._input_dtype
            and batch.ndim == len(self._input_dims)
            and all(not isinstance(d, int) or d == n for d, n in zip(self._input_dims, batch.shape))
        )
        if not matches:
            raise ModelContractError(
                f"expected {self.expected_input}, got {array.dtype.name} [{','.join(map(str, array.shape))}]; "
                "pass paths or Pillow images, or decode with serving.load_image"
            )
        return np.ascontiguousarray(batch)

    def _check_top_k(self, top_k):
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= len(self.class_names):
            raise ValueError(f"top_k must be between 1 and {len(self.class_names)} (the class count), got {top_k!r}")


def import_onnxruntime():
    """Import onnxruntime with its telemetry switched off and return the module.

    onnxruntime 1.31 starts its telemetry (a device id and an event store under
    ~/.cache/Microsoft/DeveloperTools/, queued uploads) while the module is imported,
    and only the environment variable ORT_DISABLE_TELEMETRY=1, set before that import,
    stops it (onnxruntime's Privacy.md; measured with a fresh HOME). The variable stays
    set, so child processes inherit it. When the caller imported onnxruntime earlier
    without it, this logs a warning and switches off what the API still can.
    """
    global _onnxruntime_checked
    imported_elsewhere = "onnxruntime" in sys.modules and not _onnxruntime_checked
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import onnxruntime

    _onnxruntime_checked = True
    if imported_elsewhere:
        logger.warning(
            "onnxruntime was imported before serving, so its telemetry may already be on; "
            "set ORT_DISABLE_TELEMETRY=1 before importing onnxruntime to switch it off"
        )
    onnxruntime.disable_telemetry_events()
    return onnxruntime


def _ort_errors(ort):
    # onnxruntime's exceptions (Fail, InvalidProtobuf, NoSuchFile, ...) share no base
    # class below Exception; these are the ones its Python binding defines.
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, name) for name in names if hasattr(state, name)) + (RuntimeError,)


def _create_session(ort, model_path, providers, threads):
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    # Idle intra-op threads spin by default and take CPU from the decoding threads. On a
    # shared 2-core machine, cnn-3block on 4,000 CIFAR-10 JPEGs went from about 1,140 to
    # 1,280 images/s with spinning off, and batches of 256 alone ran equally fast.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    errors = _ort_errors(ort)
    available = ort.get_available_providers()

    def open_session(provider_list):
        try:
            return ort.InferenceSession(model_path, sess_options=options, providers=provider_list)
        except errors as error:
            raise ModelContractError(f"cannot load model {model_path}: {str(error).splitlines()[0]}; "
                                     "pass an ONNX file written by `cifar-onnx export`") from error

    if providers == "cpu" or (providers == "auto" and CUDA_PROVIDER not in available):
        return open_session([CPU_PROVIDER])
    if CUDA_PROVIDER not in available:
        raise ProviderError(
            f"CUDA was requested but this onnxruntime build has no {CUDA_PROVIDER} "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (the [gpu] extra) or use the cpu provider"
        )

    # onnxruntime-gpu lists CUDA as available even without a GPU or CUDA libraries, and
    # then prints two error lines per session while it falls back to CPU. The attempt
    # runs with its default logger at fatal-only unless debug logging is on.
    _preload_cuda_libraries(ort)
    try:
        session = _with_quiet_onnxruntime(ort, lambda: open_session([CUDA_PROVIDER, CPU_PROVIDER]))
    except ModelContractError as error:
        if providers == "cuda":
            raise
        # A broken model fails on CPU too and raises there; otherwise CUDA was the problem.
        session = open_session([CPU_PROVIDER])
        logger.warning("the CUDA session failed (%s), so running on CPU", error)
        return session
    if CUDA_PROVIDER in session.get_providers():
        return session
    cuda_version = getattr(ort.capi.build_and_package_info, "cuda_version", "?")
    if providers == "cuda":
        raise ProviderError(
            f"CUDA was requested but onnxruntime could not initialise {CUDA_PROVIDER} (no usable GPU, or the "
            f"CUDA {cuda_version} / cuDNN libraries it needs are missing); use the auto or cpu provider, "
            "or turn on debug logging to see onnxruntime's own messages"
        )
    logger.info("CUDA is not usable here (no GPU or CUDA %s libraries missing), running on CPU", cuda_version)
    return session


def _preload_cuda_libraries(ort):
    """Load the CUDA and cuDNN libraries of the nvidia-* wheels, which the loader does not search.

    onnxruntime's preload_dlls() reports missing libraries with print(), so its stdout
    is captured here (it would otherwise land among the classification rows) and logged.
    """
    # NOTE: not yet run on a machine with a GPU; without one the session falls back to
    # CPU because libcuda.so.1 (the driver) is missing.
    if not hasattr(ort, "preload_dlls"):
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            ort.preload_dlls()
    except (OSError, RuntimeError) as error:
        logger.debug("onnxruntime.preload_dlls failed: %s", error)
    if printed.getvalue().strip():
        logger.debug("onnxruntime.preload_dlls: %s", printed.getvalue().strip())


def _with_quiet_onnxruntime(ort, action):
    if logger.isEnabledFor(logging.DEBUG):
        return action()
    ort.set_default_logger_severity(_ORT_FATAL_ONLY)
    try:
        return action()
    finally:
        # NOTE: restores onnxruntime's default (warning); a caller's own setting is lost.
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def parse_metadata(properties, model_path="model"):
    """Check and parse the contract's metadata_props into a dict.

    Every key of `contract.REQUIRED_METADATA` and `contract.IMAGE_METADATA` must be
    present, the image keys with their exact values. class_names becomes a list of
    str, opset an int, and test_accuracy a float, or None for a model never evaluated.
    Other values stay str, and keys outside the contract are kept.
    Raises ModelContractError naming every missing or malformed key.
    """
    properties = dict(properties)
    problems = []
    missing = [key for key in (*contract.REQUIRED_METADATA, *contract.IMAGE_METADATA) if key not in properties]
    if missing:
        problems.append(f"missing metadata keys: {', '.join(missing)}")
    for key, expected in contract.IMAGE_METADATA.items():
        if key in properties and properties[key] != expected:
            problems.append(f"expected {key}={expected}, got {properties[key]!r}")

    metadata = dict(properties)
    parsers = {
        contract.META_CLASS_NAMES: _parse_class_names,
        contract.META_OPSET: _parse_opset,
        contract.META_TEST_ACCURACY: _parse_test_accuracy,
    }
    for key, parse in parsers.items():
        if key in properties:
            try:
                metadata[key] = parse(properties[key])
            except ValueError as error:
                problems.append(f"invalid {key} {properties[key]!r}: {error}")
    if problems:
        raise ModelContractError(
            f"{model_path} does not follow the ONNX contract: {'; '.join(problems)}. "
            "Export it with `cifar-onnx export`, which writes this metadata"
        )
    return metadata


def _parse_class_names(text):
    names = json.loads(text)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("expected a JSON list of non-empty strings")
    if len(set(names)) != len(names):
        raise ValueError("expected unique class names")
    return names


def _parse_opset(text):
    return int(text)


def _parse_test_accuracy(text):
    value = json.loads(text)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError("expected a number between 0 and 1, or null")
    return float(value)


def _check_signature(session, class_count, model_path):
    """Return the input's numpy dtype and dims after checking names, types and shapes."""
    inputs = session.get_inputs()
    outputs = {output.name: output for output in session.get_outputs()}
    expected_input = f"{contract.INPUT_NAME}: uint8 [batch,{','.join(map(str, contract.INPUT_SHAPE))}]"
    problems = []

    if [i.name for i in inputs] != [contract.INPUT_NAME]:
        problems.append(f"expected one input {expected_input}, got inputs {[i.name for i in inputs]}")
    else:
        declared = inputs[0]
        dims = list(declared.shape)
        fixed_batch = isinstance(dims[0], int) if dims else False
        if declared.type != "tensor(uint8)" or dims[1:] != list(contract.INPUT_SHAPE) or len(dims) != 4 or fixed_batch:
            problems.append(f"expected input {expected_input}, got {declared.type} {dims}")
    if sorted(outputs) != sorted(contract.OUTPUT_NAMES):
        problems.append(f"expected outputs {', '.join(contract.OUTPUT_NAMES)}, got {', '.join(outputs) or 'none'}")
    else:
        for name in contract.OUTPUT_NAMES:
            dims = list(outputs[name].shape)
            width_ok = len(dims) == 2 and (not isinstance(dims[1], int) or dims[1] == class_count)
            if outputs[name].type != "tensor(float)" or not width_ok:
                problems.append(
                    f"expected output {name}: float [batch,{class_count}] (one column per class name), "
                    f"got {outputs[name].type} {dims}"
                )
    if problems:
        raise ModelContractError(f"{model_path} does not follow the ONNX contract: {'; '.join(problems)}")
    return np.dtype(np.uint8), list(inputs[0].shape)


def _iter_batches(images, batch_size, check_batch):
    """Yield uint8 NHWC batches of at most `batch_size` images, in input order."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        for start in range(0, len(images), batch_size):
            yield check_batch(images[start:start + batch_size])
        return
    if _is_single_image(images):
        images = [images]
    if isinstance(images, (bytes, bytearray)) or not hasattr(images, "__iter__"):
        raise TypeError(f"expected a path, a file object, a Pillow image, a uint8 array or a list of them, "
                        f"got {type(images).__name__}")

    pending = []
    for item in images:
        if isinstance(item, np.ndarray) and item.ndim == 4:
            pending.extend(check_batch(item))
        elif isinstance(item, np.ndarray):
            pending.append(check_batch(item)[0])
        elif isinstance(item, (str, os.PathLike, Image.Image)) or hasattr(item, "read"):
            pending.append(load_image(item))
        else:
            raise TypeError(f"expected a path, a file object, a Pillow image or a uint8 array, "
                            f"got {type(item).__name__}")
        while len(pending) >= batch_size:
            yield np.stack(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        yield np.stack(pending)


def _is_single_image(images):
    return isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) or hasattr(images, "read")
