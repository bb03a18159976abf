"""The metadata_props every export carries, written as JSON-safe strings."""

import datetime
import hashlib
import json
import logging

from serving.contract import (
    IMAGE_METADATA, META_ARCHITECTURE, META_CHECKPOINT_SHA256, META_CLASS_NAMES, META_CREATED,
    META_DATASET_FINGERPRINT, META_EXPORTER, META_EXPORTER_VERSION, META_FRAMEWORK,
    META_FRAMEWORK_VERSION, META_OPSET, META_TEST_ACCURACY, META_TEST_ACCURACY_SCOPE,
)

FULL_TEST_SPLIT = "full test split"
logger = logging.getLogger(__name__)


def sha256_file(path):
    """Return the hex sha256 of the file at `path`."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_metadata(*, info, framework, framework_version, exporter, exporter_version, opset,
                   checkpoint_path):
    """Return the contract's metadata as a dict of strings.

    `info` is the checkpoint's information: class_names, architecture,
    dataset_fingerprint and test_accuracy (None when the model was never evaluated).
    """
    test_accuracy = info.get("test_accuracy")
    # A --limit run evaluates a seeded subset of the test split. Verify compares its own
    # full-split accuracy with the recorded one only when both cover the full split.
    limit = (info.get("recipe") or {}).get("limit")
    if test_accuracy is None:
        logger.warning("warning: %s has no test accuracy because its training run did not finish; "
                       "the export records test_accuracy as null", checkpoint_path)
    metadata = {
        META_CLASS_NAMES: json.dumps(list(info["class_names"])),
        META_ARCHITECTURE: str(info["architecture"]),
        META_FRAMEWORK: framework,
        META_FRAMEWORK_VERSION: framework_version,
        META_EXPORTER: exporter,
        META_EXPORTER_VERSION: exporter_version,
        META_OPSET: str(int(opset)),
        META_DATASET_FINGERPRINT: str(info.get("dataset_fingerprint", "")),
        META_TEST_ACCURACY: json.dumps(None if test_accuracy is None else float(test_accuracy)),
        META_TEST_ACCURACY_SCOPE: _accuracy_scope(test_accuracy, limit),
        META_CHECKPOINT_SHA256: sha256_file(checkpoint_path),
        META_CREATED: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    metadata.update(IMAGE_METADATA)
    return metadata


def _accuracy_scope(test_accuracy, limit):
    if test_accuracy is None:
        return "not evaluated"
    return FULL_TEST_SPLIT if not limit else f"subset of at most {int(limit)} test images"


def attach_metadata(model, metadata):
    """Replace the metadata_props of the onnx.ModelProto `model` with `metadata`."""
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value
