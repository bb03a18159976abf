"""Export a Keras checkpoint to the ONNX contract with tf2onnx.

Mirrors exporters/torch_onnx.py: same function names, same parameters.
"""

import logging
from pathlib import Path

from exporters import DEFAULT_OPSET
from exporters.metadata import build_metadata
from exporters.onnx_files import validate_opset, write_export
from pipeline.errors import ExportError
from serving.contract import (
    CHANNELS, IMAGE_SIZE, INPUT_NAME, LOGITS_NAME, OUTPUT_NAMES, PROBABILITIES_NAME,
)

logger = logging.getLogger(__name__)

EXPORTER = "tf2onnx"


def opset_range():
    """Return the (lowest, highest) opset this exporter writes."""
    from tf2onnx import constants

    return min(constants.OPSET_TO_IR_VERSION), max(constants.OPSET_TO_IR_VERSION)


def convert_model(model, opset, training=False):
    """Convert a Keras model (normalised NHWC -> logits) to an onnx.ModelProto.

    tf2onnx 1.17's `from_keras` fails on Keras 3 Sequential models with a
    KeyError, so the conversion goes through a tf.function with an explicit
    uint8 input signature that runs preprocessing, the model and softmax.
    """
    import tensorflow as tf
    import tf2onnx

    from pipeline import keras_model

    signature = [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, CHANNELS], tf.uint8, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def serve(images):
        if training:
            logits = model(keras_model.preprocess(images), training=True)
            probabilities = tf.nn.softmax(logits, axis=-1)
        else:
            logits, probabilities = keras_model.inference(model, images)
        return {LOGITS_NAME: logits, PROBABILITIES_NAME: probabilities}

    try:
        proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=opset,
                                                 output_path=None)
    except Exception as error:  # tf2onnx raises ValueError, KeyError and TF errors alike
        raise ExportError(f"tf2onnx conversion failed: {str(error).splitlines()[0]}") from error
    names = [output.name for output in proto.graph.output]
    if sorted(names) != sorted(OUTPUT_NAMES):
        raise ExportError(f"tf2onnx named the outputs {names}, expected {list(OUTPUT_NAMES)}")
    return proto


def export_onnx(checkpoint, path, opset=DEFAULT_OPSET, *, training=False, check=True):
    """Export the Keras checkpoint `checkpoint` (model.keras) to the ONNX file `path`.

    `training=True` and `check=False` exist only to plant faults in tests: they
    export dropout and batch statistics as in training and skip the contract check.
    Returns the contract checks. Raises ExportError (and TrainError for a bad
    checkpoint) with the fix in the message.
    """
    from pipeline import keras_model
    from pipeline.frameworks import import_tensorflow

    tf = import_tensorflow()
    import tf2onnx

    validate_opset(opset, EXPORTER, opset_range())
    model, info = keras_model.load_checkpoint(checkpoint)

    logger.info("exporting %s with %s %s (opset %d)", checkpoint, EXPORTER, tf2onnx.__version__, opset)
    proto = convert_model(model, opset, training=training)
    metadata = build_metadata(
        info=info, framework="keras", framework_version=f"tensorflow {tf.__version__}",
        exporter=EXPORTER, exporter_version=tf2onnx.__version__, opset=opset,
        checkpoint_path=checkpoint,
    )
    return write_export(proto, Path(path), metadata, check=check)
