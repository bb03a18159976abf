"""Small contract-conforming ONNX models built with onnx.helper, for tests.

The colour probe maps the mean red, green and blue of an image to 10 logits with a
fixed linear map, so tests know the label of a generated image without training.
Pure red is class 0, pure green class 1, pure blue class 2, white class 3 and black class 4.
"""

import json

import numpy as np

from serving import contract

# logits = (mean RGB / 255) @ COLOR_WEIGHTS + COLOR_BIAS, shapes [3] @ [3, 10] + [10].
# Classes 0-2 reward one channel over the other two; class 3 rewards brightness and
# class 4 darkness. Classes 5-9 keep a constant, lower logit.
COLOR_WEIGHTS = np.array(
    [
        [8.0, -4.0, -4.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-4.0, 8.0, -4.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [-4.0, -4.0, 8.0, 2.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ],
    dtype=np.float32,
)
COLOR_BIAS = np.array([0.0, 0.0, 0.0, -1.0, 1.0, -1.0, -1.5, -2.0, -2.5, -3.0], dtype=np.float32)


def color_probe_metadata(class_names=contract.CIFAR10_CLASSES):
    """Return every metadata key the contract requires, with plausible values, plus the image keys."""
    import onnx

    metadata = {
        contract.META_CLASS_NAMES: json.dumps(list(class_names)),
        contract.META_ARCHITECTURE: "color-probe",
        contract.META_FRAMEWORK: "numpy",
        contract.META_FRAMEWORK_VERSION: np.__version__,
        contract.META_EXPORTER: "onnx.helper",
        contract.META_EXPORTER_VERSION: onnx.__version__,
        contract.META_OPSET: "18",
        contract.META_DATASET_FINGERPRINT: "0" * 64,
        contract.META_TEST_ACCURACY: "0.1",
        contract.META_CHECKPOINT_SHA256: "0" * 64,
        contract.META_CREATED: "2026-01-01T00:00:00Z",
    }
    metadata.update(contract.IMAGE_METADATA)
    return metadata


def build_color_probe(
    path,
    *,
    metadata=None,
    input_name=contract.INPUT_NAME,
    output_names=contract.OUTPUT_NAMES,
    input_dtype="uint8",
    batch_dim=contract.BATCH_DIM,
    opset=18,
):
    """Write the colour probe to `path` and return `path`.

    The keyword arguments exist to break the contract on purpose: `metadata` replaces
    the metadata (default: `color_probe_metadata()`), the names, the input dtype
    ("uint8" or "float32") and the batch dimension (a name or a fixed int) can differ.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    element_type = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}[input_dtype]
    logits_name, probabilities_name = output_names
    num_classes = COLOR_WEIGHTS.shape[1]

    # images NHWC -> float -> mean over H and W -> [batch, 3] in 0-1 -> linear -> softmax
    nodes = [
        helper.make_node("Cast", [input_name], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "spatial_axes"], ["channel_means"], keepdims=0),
        helper.make_node("Div", ["channel_means", "pixel_max"], ["channel_fractions"]),
        helper.make_node("MatMul", ["channel_fractions", "weights"], ["weighted"]),
        helper.make_node("Add", ["weighted", "bias"], [logits_name]),
        helper.make_node("Softmax", [logits_name], [probabilities_name], axis=-1),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "spatial_axes"),
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "pixel_max"),
        numpy_helper.from_array(COLOR_WEIGHTS, "weights"),
        numpy_helper.from_array(COLOR_BIAS, "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "color_probe",
        [helper.make_tensor_value_info(input_name, element_type, [batch_dim, *contract.INPUT_SHAPE])],
        [
            helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, [batch_dim, num_classes]),
            helper.make_tensor_value_info(probabilities_name, TensorProto.FLOAT, [batch_dim, num_classes]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # onnxruntime 1.31 loads IR version 13 at most, and onnx 1.23 writes 14 by default.
    model.ir_version = 10
    helper.set_model_props(model, color_probe_metadata() if metadata is None else metadata)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def color_probe_probabilities(images):
    """Return the probe's probabilities for uint8 NHWC `images`, computed with numpy (float64)."""
    means = np.asarray(images, dtype=np.float64).mean(axis=(1, 2)) / 255.0
    logits = means @ COLOR_WEIGHTS.astype(np.float64) + COLOR_BIAS
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
