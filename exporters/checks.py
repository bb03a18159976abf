"""Contract checks that every export must pass, whichever exporter wrote it.

Each check is collected as a `Check` so a caller sees every failure at once;
`require_contract` then raises one ExportError that lists them all.
"""

import dataclasses
import json
import logging

import numpy as np

from pipeline.errors import ExportError
from serving.contract import (
    IMAGE_METADATA, IMAGE_SIZE, CHANNELS, INPUT_NAME, LOGITS_NAME, META_CLASS_NAMES,
    OUTPUT_NAMES, REQUIRED_METADATA,
)

logger = logging.getLogger(__name__)

# Ops that only make sense while training: any of them left in an export means the
# network was not put in inference form.
TRAINING_ONLY_OPS = frozenset({
    "Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Bernoulli", "Multinomial",
})
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
DYNAMIC_BATCH_SIZES = (1, 2, 7, 64)
DYNAMIC_BATCH_ATOL = 1e-5


@dataclasses.dataclass
class Check:
    """One named contract check: whether it passed and what was measured."""

    name: str
    passed: bool
    detail: str


def iter_nodes(graph):
    """Yield every node of `graph`, including those inside If/Loop/Scan subgraphs."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from iter_nodes(subgraph)


def find_training_only_nodes(model):
    """Return 'op (node name)' strings for every training-only node of `model`.

    Covers Dropout and random ops, BatchNormalization in training mode (the
    `training_mode` attribute set, or the running-statistics outputs requested),
    and ops outside the standard domain, which usually are unconverted framework ops.
    """
    found = []
    nodes = list(iter_nodes(model.graph))
    for function in model.functions:
        nodes.extend(function.node)
    for node in nodes:
        label = f"{node.op_type} ({node.name or 'unnamed'})"
        if node.domain not in STANDARD_DOMAINS:
            found.append(f"{node.domain}.{label}")
        elif node.op_type in TRAINING_ONLY_OPS:
            found.append(label)
        elif node.op_type == "BatchNormalization":
            training = any(a.name == "training_mode" and a.i for a in node.attribute)
            if training or len([o for o in node.output if o]) > 1:
                found.append(f"{label} in training mode")
    return found


def _tensor_signature(value_info):
    import onnx

    tensor = value_info.type.tensor_type
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tensor.shape.dim]
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type), dims


def describe_signature(value_info):
    """Return e.g. 'images: uint8 [batch, 32, 32, 3]' for a graph input or output."""
    dtype, dims = _tensor_signature(value_info)
    return f"{value_info.name}: {np.dtype(dtype).name} [{', '.join(str(d) for d in dims)}]"


def _check_structure(model):
    import onnx

    checks = []
    try:
        onnx.checker.check_model(model, full_check=True)
        checks.append(Check("onnx.checker (full_check)", True, "valid"))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        checks.append(Check("onnx.checker (full_check)", False, str(error).splitlines()[0]))
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
        checks.append(Check("shape inference", True, "strict mode passed"))
    except (onnx.shape_inference.InferenceError, RuntimeError) as error:
        checks.append(Check("shape inference", False, str(error).splitlines()[0]))
    return checks


def _check_signature(model, class_count):
    checks = []
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    expected_input = f"{INPUT_NAME}: uint8 [batch, {IMAGE_SIZE}, {IMAGE_SIZE}, {CHANNELS}]"
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        names = [i.name for i in inputs]
        checks.append(Check("input signature", False, f"expected one input {expected_input}, got {names}"))
    else:
        dtype, dims = _tensor_signature(inputs[0])
        ok = (np.dtype(dtype) == np.uint8 and len(dims) == 4 and isinstance(dims[0], str)
              and dims[0] != "?" and dims[1:] == [IMAGE_SIZE, IMAGE_SIZE, CHANNELS])
        detail = describe_signature(inputs[0])
        checks.append(Check("input signature", ok, detail if ok else f"expected {expected_input}, got {detail}"))

    outputs = {o.name: o for o in model.graph.output}
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        checks.append(Check("output signature", False,
                            f"expected outputs {list(OUTPUT_NAMES)}, got {list(outputs)}"))
        return checks
    details, ok = [], True
    for name in OUTPUT_NAMES:
        dtype, dims = _tensor_signature(outputs[name])
        ok &= (np.dtype(dtype) == np.float32 and len(dims) == 2 and isinstance(dims[0], str)
               and dims[0] != "?" and dims[1] == class_count)
        details.append(describe_signature(outputs[name]))
    detail = "; ".join(details)
    if not ok:
        detail = f"expected float32 [batch, {class_count}] for each output, got {detail}"
    checks.append(Check("output signature", ok, detail))
    return checks


def _check_metadata(metadata):
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    wrong = [f"{key}={metadata.get(key)!r}" for key, value in IMAGE_METADATA.items()
             if metadata.get(key) != value]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if wrong:
        problems.append(f"expected {IMAGE_METADATA}, got {', '.join(wrong)}")
    class_names = None
    try:
        class_names = json.loads(metadata.get(META_CLASS_NAMES, "null"))
    except json.JSONDecodeError:
        pass
    if not (isinstance(class_names, list) and class_names and all(isinstance(c, str) for c in class_names)):
        problems.append(f"{META_CLASS_NAMES} must be a JSON list of strings, got {metadata.get(META_CLASS_NAMES)!r}")
        class_names = None
    detail = "; ".join(problems) if problems else f"{len(metadata)} keys, {len(class_names)} classes"
    return Check("metadata", not problems, detail), class_names


def contract_test_images(batch_size, seed=0):
    """Return uint8 [batch_size, 32, 32, 3] images: extremes first, then seeded noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch_size, IMAGE_SIZE, IMAGE_SIZE, CHANNELS), dtype=np.uint8)
    images[0] = 0
    if batch_size > 1:
        images[1] = 255
    return images


def _check_runtime(model_bytes, class_count):
    import onnxruntime

    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
        return [Check("onnxruntime session", False, str(error).splitlines()[0])]
    checks = [Check("onnxruntime session", True, f"onnxruntime {onnxruntime.__version__}, CPU")]

    # Each sample of a batch must equal the same sample run alone: a batch dimension
    # that is only declared dynamic but baked into a Reshape fails here.
    images = contract_test_images(max(DYNAMIC_BATCH_SIZES))
    singles = [session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[i:i + 1]}) for i in range(len(images))]
    worst, failures = 0.0, []
    for batch_size in DYNAMIC_BATCH_SIZES:
        try:
            logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[:batch_size]})
        except Exception as error:  # as above: onnxruntime's errors have no common public base class
            failures.append(f"batch {batch_size}: {str(error).splitlines()[0]}")
            continue
        if logits.shape != (batch_size, class_count) or logits.dtype != np.float32:
            failures.append(f"batch {batch_size}: logits {logits.dtype} {list(logits.shape)}")
            continue
        expected = np.concatenate([s[0] for s in singles[:batch_size]])
        expected_probabilities = np.concatenate([s[1] for s in singles[:batch_size]])
        difference = max(float(np.max(np.abs(logits - expected))),
                         float(np.max(np.abs(probabilities - expected_probabilities))))
        worst = max(worst, difference)
        if not difference <= DYNAMIC_BATCH_ATOL:
            failures.append(f"batch {batch_size}: max |batched - single| {difference:.2e}")
        sums = probabilities.sum(axis=1)
        if not np.all(np.isfinite(logits)) or not np.allclose(sums, 1.0, atol=1e-5):
            failures.append(f"batch {batch_size}: probabilities do not sum to 1 or contain NaN/Inf")
    sizes = ", ".join(str(s) for s in DYNAMIC_BATCH_SIZES)
    detail = "; ".join(failures) if failures else (
        f"batches {sizes}: max |batched - single| {worst:.1e} <= {DYNAMIC_BATCH_ATOL:.0e}")
    checks.append(Check("dynamic batch", not failures, detail))
    return checks


def check_contract(model_path):
    """Run every contract check on the ONNX file at `model_path`; return the Check list."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(model_path))
    except (OSError, DecodeError) as error:
        return [Check("ONNX file readable", False, f"cannot load {model_path}: {error}")]
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    checks = _check_structure(model)
    metadata_check, class_names = _check_metadata(metadata)
    class_count = len(class_names) if class_names else 10
    checks += _check_signature(model, class_count)
    checks.append(metadata_check)
    training_nodes = find_training_only_nodes(model)
    checks.append(Check(
        "inference form", not training_nodes,
        f"training-only nodes left: {', '.join(training_nodes[:5])}" if training_nodes
        else "no Dropout, random ops or training-mode BatchNormalization",
    ))
    checks += _check_runtime(model.SerializeToString(), class_count)
    return checks


def require_contract(model_path):
    """Run `check_contract` and raise one ExportError listing every failed check."""
    checks = check_contract(model_path)
    failed = [c for c in checks if not c.passed]
    if failed:
        listing = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        raise ExportError(f"{model_path} breaks the ONNX contract ({len(failed)} failed): {listing}")
    return checks
