"""Export a PyTorch checkpoint to the ONNX contract with torch.onnx (dynamo exporter).

Mirrors exporters/keras_onnx.py: same function names, same parameters.
"""

import logging
from pathlib import Path

from exporters import DEFAULT_OPSET
from exporters.metadata import build_metadata
from exporters.onnx_files import validate_opset, write_export
from pipeline.errors import ExportError
from serving.contract import BATCH_DIM, CHANNELS, IMAGE_SIZE, INPUT_NAME, OUTPUT_NAMES

logger = logging.getLogger(__name__)

EXPORTER = "torch.onnx"
# The dynamo exporter translates from opset 18 up; older opsets would need the
# TorchScript-based exporter, which torch 2.14 deprecates.
LOWEST_OPSET = 18


def opset_range():
    """Return the (lowest, highest) opset this exporter writes."""
    import onnx

    return LOWEST_OPSET, onnx.defs.onnx_opset_version()


def convert_module(module, opset):
    """Convert an InferenceModel (uint8 NHWC -> logits, probabilities) to an onnx.ModelProto."""
    import torch

    # Two samples in the example: a batch of one lets the exporter specialise the
    # batch dimension to a constant.
    example = torch.zeros((2, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=torch.uint8)
    batch = torch.export.Dim(BATCH_DIM, min=1)
    try:
        program = torch.onnx.export(
            module, (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    except Exception as error:  # torch.onnx raises many unrelated types from export and translation
        raise ExportError(f"torch.onnx.export failed: {str(error).splitlines()[0]}") from error
    return program.model_proto


def export_onnx(checkpoint, path, opset=DEFAULT_OPSET, *, training=False, check=True):
    """Export the PyTorch checkpoint `checkpoint` (model.pt) to the ONNX file `path`.

    `training=True` and `check=False` exist only to plant faults in tests: they
    export dropout and batch statistics as in training and skip the contract check.
    Returns the contract checks. Raises ExportError (and TrainError for a bad
    checkpoint) with the fix in the message.
    """
    import torch

    from pipeline import torch_model

    validate_opset(opset, EXPORTER, opset_range())
    net, info = torch_model.load_checkpoint(checkpoint)
    module = torch_model.InferenceModel(net)
    module.train(training)

    logger.info("exporting %s with %s %s (opset %d)", checkpoint, EXPORTER, torch.__version__, opset)
    model = convert_module(module, opset)
    metadata = build_metadata(
        info=info, framework="torch", framework_version=torch.__version__,
        exporter=EXPORTER, exporter_version=torch.__version__, opset=opset,
        checkpoint_path=checkpoint,
    )
    return write_export(model, Path(path), metadata, check=check)
