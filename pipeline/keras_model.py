"""The Keras build of an architecture specification, its preprocessing and checkpoints.

Mirrors pipeline/torch_model.py function by function; the differences are the
framework's: NHWC layout, BatchNorm momentum convention, .keras files plus a JSON
sidecar. Only the training-side commands import this module (it imports tensorflow).
"""

import json
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TF's C++ start-up notices off stderr

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline import architectures as arch  # noqa: E402
from pipeline.errors import TrainError  # noqa: E402
from serving.contract import MEAN, STD  # noqa: E402

CHECKPOINT_NAME = "model.keras"
INFO_SUFFIX = ".json"  # the sidecar beside model.keras: model.json contains the checkpoint info


def build_model(architecture):
    """Build `architecture` (a name from ARCHITECTURES) as a freshly initialised keras.Model.

    Input: float32 [N, 32, 32, 3] (NHWC), normalised with MEAN/STD. Output: logits
    float32 [N, 10]. Every layer is named by its spec name ("conv1", "bn1", "dense2").
    The model is named after the architecture.
    """
    spec = arch.get_architecture(architecture)
    inputs = keras.Input(shape=spec.input_shape, name="inputs")
    x = inputs
    for layer in spec.layers:
        x = _build_layer(layer, spec)(x)
    return keras.Model(inputs, x, name=spec.name)


def _kernel_initializer():
    """Uniform, bound 1 / sqrt(fan_in) (KERNEL_INIT): sqrt(3 * scale / fan_in) with scale 1/3."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def _build_layer(layer, spec):
    """Return the keras layer for one LayerSpec."""
    if layer.kind == arch.CONV:
        return keras.layers.Conv2D(
            layer.filters,
            layer.kernel_size,
            padding=spec.padding,
            kernel_initializer=_kernel_initializer(),
            bias_initializer="zeros",
            name=layer.name,
        )
    if layer.kind == arch.BATCHNORM:
        # Keras' momentum weighs the old running statistic: 1 - the spec's (PyTorch) momentum.
        return keras.layers.BatchNormalization(
            momentum=1.0 - spec.bn_momentum, epsilon=spec.bn_epsilon, name=layer.name
        )
    if layer.kind == arch.RELU:
        return keras.layers.ReLU(name=layer.name)
    if layer.kind == arch.MAXPOOL:
        return keras.layers.MaxPooling2D(layer.pool_size, strides=layer.pool_size, name=layer.name)
    if layer.kind == arch.DROPOUT:
        return keras.layers.Dropout(layer.rate, name=layer.name)
    if layer.kind == arch.SPATIAL_DROPOUT:
        return keras.layers.SpatialDropout2D(layer.rate, name=layer.name)
    if layer.kind == arch.GLOBAL_AVG_POOL:
        return keras.layers.GlobalAveragePooling2D(name=layer.name)
    if layer.kind == arch.DENSE:
        return keras.layers.Dense(
            layer.units, kernel_initializer=_kernel_initializer(), bias_initializer="zeros", name=layer.name
        )
    raise TrainError(f"layer {layer.name!r} has unknown kind {layer.kind!r}: expected one of {arch.LAYER_KINDS}")


def preprocess(images):
    """Turn uint8 [N, 32, 32, 3] RGB images (NHWC) into the network input.

    Returns float32 [N, 32, 32, 3], still NHWC, scaled to 0-1 and normalised per
    channel with serving.contract.MEAN and STD.
    """
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(MEAN, tf.float32)) / tf.constant(STD, tf.float32)


def inference(model, images):
    """Run uint8 [N, 32, 32, 3] images through `model` in inference mode.

    Returns (logits, probabilities), both float32 [N, 10]: preprocessing, the network
    with training=False (no dropout, BatchNorm running statistics) and softmax. The
    exporter wraps this in a tf.function with a uint8 [None, 32, 32, 3] signature.
    """
    logits = model(preprocess(images), training=False)
    logits = tf.cast(logits, tf.float32)
    return logits, tf.nn.softmax(logits, axis=-1)


def save_checkpoint(path, model, info):
    """Write `model` to `path` (.keras) and `info` plus the architecture to the JSON sidecar, atomically.

    The sidecar is `path` with the suffix .json (model.keras -> model.json); `info`
    must hold JSON types only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    model.save(temporary)
    _write_json(info_path(path), {"architecture": model.name, **info})
    os.replace(temporary, path)


def info_path(path):
    """Return the JSON sidecar path of the checkpoint `path` (model.keras -> model.json)."""
    return Path(path).with_suffix(INFO_SUFFIX)


def load_checkpoint(path, architecture=None):
    """Read a checkpoint written by save_checkpoint; return (model, info dict).

    When `architecture` is given, a checkpoint of another architecture is rejected.
    Raises TrainError naming the path and the fix for a missing, unreadable or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"checkpoint {path} not found: train first with `cifar-onnx train --framework keras`")
    sidecar = info_path(path)
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:
        raise TrainError(f"cannot read the checkpoint info {sidecar}: {error}; train again to rewrite it") from error
    saved = info.get("architecture") if isinstance(info, dict) else None
    if saved not in arch.ARCHITECTURES:
        raise TrainError(
            f"{sidecar} names no known architecture (got {saved!r}, expected one of "
            f"{', '.join(arch.ARCHITECTURES)}): train again to rewrite it"
        )
    if architecture is not None and saved != architecture:
        raise TrainError(
            f"checkpoint {path} contains architecture {saved!r}, expected {architecture!r}: "
            f"pass --arch {saved} or train {architecture} from scratch"
        )

    try:
        model = keras.saving.load_model(path, compile=False)
    except (OSError, ValueError, TypeError) as error:
        raise TrainError(f"cannot read checkpoint {path}: {error}; train again to rewrite it") from error
    if model.name != saved:
        raise TrainError(f"checkpoint {path} contains a model named {model.name!r}, but {sidecar} says {saved!r}")
    return model, info


def count_parameters(model):
    """Return the number of trainable parameters of `model`."""
    return int(sum(int(tf.size(variable)) for variable in model.trainable_variables))


def _write_json(path, values):
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(temporary, path)
