"""Faults planted into exported ONNX files, to prove that verify catches them.

Each function edits an ONNX file in place with the onnx package only.
"""

import numpy as np
import onnx
from onnx import numpy_helper

from serving.contract import INPUT_NAME, MEAN


def _initializers(model):
    return {initializer.name: initializer for initializer in model.graph.initializer}


def _constant_arrays(model):
    """Yield (name, array, setter) for every initializer and Constant node value."""
    for initializer in model.graph.initializer:
        def set_initializer(array, target=initializer):
            target.CopyFrom(numpy_helper.from_array(array, target.name))
        yield initializer.name, numpy_helper.to_array(initializer), set_initializer
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    def set_constant(array, target=attribute):
                        target.t.CopyFrom(numpy_helper.from_array(array))
                    yield node.output[0], numpy_helper.to_array(attribute.t), set_constant


def perturb_first_conv_weight(path, delta=1e-2):
    """Add `delta` to one weight of every output channel of the first Conv's kernel (OIHW).

    In a briefly trained model one channel may be dead after ReLU, so a change to it
    alone never reaches the logits. Every channel at once cannot be dead.
    """
    model = onnx.load(path)
    conv = next(node for node in model.graph.node if node.op_type == "Conv")
    initializer = _initializers(model)[conv.input[1]]
    kernel = numpy_helper.to_array(initializer).copy()
    kernel[:, 0, 0, 0] += delta
    initializer.CopyFrom(numpy_helper.from_array(kernel, initializer.name))
    onnx.save(model, path)


def change_normalisation_mean(path, new_mean=(0.5, 0.5, 0.5)):
    """Replace the per-channel mean constant (serving.contract.MEAN) in the graph."""
    model = onnx.load(path)
    changed = 0
    for _, array, set_value in list(_constant_arrays(model)):
        if array.size == 3 and np.allclose(array.ravel(), MEAN, atol=1e-6):
            set_value(np.asarray(new_mean, dtype=array.dtype).reshape(array.shape))
            changed += 1
    if changed == 0:
        raise AssertionError(f"no constant equal to MEAN {MEAN} found in {path}")
    onnx.save(model, path)


def swap_channels_to_bgr(path):
    """Insert a Gather that reverses the channel axis right after the `images` input."""
    model = onnx.load(path)
    swapped = f"{INPUT_NAME}_bgr"
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name == INPUT_NAME:
                node.input[index] = swapped
    order = numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), "bgr_order")
    model.graph.initializer.append(order)
    gather = onnx.helper.make_node("Gather", [INPUT_NAME, "bgr_order"], [swapped], axis=3, name="plant_bgr")
    model.graph.node.insert(0, gather)
    onnx.save(model, path)
