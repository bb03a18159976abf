"""Writing ONNX files: batch dimension naming, opset validation and atomic saves."""

import logging
import os
from pathlib import Path

from pipeline.errors import ExportError
from serving.contract import BATCH_DIM

logger = logging.getLogger(__name__)


def name_batch_dimension(model):
    """Give dimension 0 of every graph input and output the symbolic name `batch`.

    tf2onnx names unknown dimensions `unk__N`; one shared name states that inputs
    and outputs share the batch size and keeps the two exports' signatures identical.
    """
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def runtime_supports_opset(opset):
    """Return True when the installed onnxruntime loads a model of this opset.

    onnxruntime has no API for its highest opset, so this loads a one-node model.
    """
    import onnx
    import onnxruntime

    tensor = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    output = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [tensor], [output])
    opset_imports = [onnx.helper.make_opsetid("", opset)]
    model = onnx.helper.make_model(graph, opset_imports=opset_imports)
    # The lowest IR version that can state this opset, as exporters write it: the
    # onnx package's own default IR version may be newer than onnxruntime reads.
    model.ir_version = onnx.helper.find_min_ir_version_for(opset_imports)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4
    try:
        onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime's load errors share no public base class
        return False
    return True


def validate_opset(opset, exporter, exporter_range):
    """Raise ExportError unless `exporter` and onnxruntime both support `opset`.

    `exporter_range` is the (lowest, highest) opset the exporter writes.
    """
    import onnxruntime

    lowest, highest = exporter_range
    if not lowest <= opset <= highest:
        raise ExportError(
            f"invalid --opset {opset}: {exporter} writes opsets {lowest} to {highest}; "
            f"pass one in that range (the default is the highest the whole chain supports)"
        )
    if not runtime_supports_opset(opset):
        raise ExportError(
            f"invalid --opset {opset}: onnxruntime {onnxruntime.__version__} cannot load it; "
            f"pass a lower --opset or upgrade onnxruntime"
        )


def temporary_path(path):
    """Return the hidden sibling that a file is written to before it is renamed to `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_export(model, path, metadata, *, check=True):
    """Name the batch dimension, attach `metadata`, check the contract and save to `path`.

    The file is checked under a temporary name and renamed only when every contract
    check passed, so a failed export leaves no `path` behind. `check=False` exists
    for tests that plant faults a checked export would reject. Returns the checks.
    """
    import onnx

    from exporters.checks import require_contract
    from exporters.metadata import attach_metadata

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name_batch_dimension(model)
    attach_metadata(model, metadata)
    temporary = temporary_path(path)
    try:
        onnx.save(model, str(temporary))
        checks = require_contract(temporary) if check else []
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return checks
