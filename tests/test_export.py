"""Export: both frameworks' files honour one ONNX contract, and bad input fails cleanly.

Training and exporting run as `cifar-onnx` subprocesses; this process loads the
files with onnx and onnxruntime only, the way a user of the export would.
"""

import json

import numpy as np
import onnx
import onnxruntime
import pytest

from conftest import run_cli
from exporters import DEFAULT_OPSET
from exporters.checks import check_contract, find_training_only_nodes
from pipeline.frameworks import FRAMEWORKS
from serving.contract import (
    CIFAR10_CLASSES, IMAGE_METADATA, INPUT_NAME, OUTPUT_NAMES, REQUIRED_METADATA,
)

ARCHITECTURES = ("cnn-3block", "cnn-2block")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_out):
    """Return a function (framework, architecture) -> (path of model.onnx, export stdout)."""
    exports = {}

    def export(framework, architecture):
        if (framework, architecture) not in exports:
            out = trained_out(framework, architecture)
            result = run_cli("export", "--framework", framework, "--out", out)
            assert result.returncode == 0, result.stderr[-3000:]
            exports[framework, architecture] = (out / framework / "model.onnx", result.stdout)
        return exports[framework, architecture]

    return export


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# The shared contract test: any exporter in FRAMEWORKS gets it for free.
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_export_passes_contract_checks(exported, framework, architecture):
    path, _ = exported(framework, architecture)

    checks = check_contract(path)

    failed = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    assert failed == []
    assert len(checks) >= 8


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_export_signature_and_metadata(exported, framework, architecture):
    path, _ = exported(framework, architecture)
    session = _session(path)

    (image_input,) = session.get_inputs()
    assert image_input.name == INPUT_NAME
    assert image_input.type == "tensor(uint8)"
    assert isinstance(image_input.shape[0], str)
    assert image_input.shape[1:] == [32, 32, 3]
    assert [o.name for o in session.get_outputs()] == list(OUTPUT_NAMES)
    for output in session.get_outputs():
        assert output.type == "tensor(float)"
        assert output.shape[0] == image_input.shape[0]
        assert output.shape[1] == 10

    metadata = session.get_modelmeta().custom_metadata_map
    assert set(REQUIRED_METADATA) <= set(metadata)
    assert json.loads(metadata["class_names"]) == list(CIFAR10_CLASSES)
    assert metadata["architecture"] == architecture
    assert metadata["framework"] == framework
    assert metadata["exporter"] == ("torch.onnx" if framework == "torch" else "tf2onnx")
    assert int(metadata["opset"]) == DEFAULT_OPSET
    assert 0.0 <= json.loads(metadata["test_accuracy"]) <= 1.0
    assert len(metadata["checkpoint_sha256"]) == 64
    assert len(metadata["dataset_fingerprint"]) == 64
    for key, value in IMAGE_METADATA.items():
        assert metadata[key] == value


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_export_batch_dimension_is_dynamic(exported, framework, architecture):
    path, _ = exported(framework, architecture)
    session = _session(path)
    images = np.random.default_rng(1).integers(0, 256, size=(64, 32, 32, 3), dtype=np.uint8)
    singles = np.concatenate([session.run(["logits"], {INPUT_NAME: images[i:i + 1]})[0] for i in range(64)])

    for batch_size in (1, 2, 7, 64):
        logits, probabilities = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images[:batch_size]})
        assert logits.shape == (batch_size, 10)
        np.testing.assert_allclose(logits, singles[:batch_size], rtol=0, atol=1e-5)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_export_has_no_training_only_ops(exported, framework):
    path, _ = exported(framework, "cnn-2block")
    model = onnx.load(str(path))

    assert find_training_only_nodes(model) == []
    assert "Dropout" not in {node.op_type for node in model.graph.node}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_export_prints_summary(exported, framework):
    path, stdout = exported(framework, "cnn-3block")

    assert f"export     {path}" in stdout
    assert f"ai.onnx {DEFAULT_OPSET}" in stdout
    assert "input      images: uint8 [batch, 32, 32, 3]" in stdout
    assert "output     logits: float32 [batch, 10]" in stdout
    assert "output     probabilities: float32 [batch, 10]" in stdout
    assert "Conv 5" in stdout
    assert "FAIL" not in stdout
    assert "cifar-onnx verify" in stdout
    assert "cifar-onnx classify" in stdout


def _assert_one_error(result, *fragments):
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_export_without_checkpoint_names_train(tmp_path, framework):
    result = run_cli("export", "--framework", framework, "--out", tmp_path)

    _assert_one_error(result, str(tmp_path / framework), f"cifar-onnx train --framework {framework}")
    assert not (tmp_path / framework / "model.onnx").exists()


@pytest.mark.parametrize("framework,name", [("torch", "model.pt"), ("keras", "model.keras")])
def test_export_of_unreadable_checkpoint_fails(tmp_path, framework, name):
    (tmp_path / framework).mkdir()
    (tmp_path / framework / name).write_bytes(b"not a checkpoint")
    if framework == "keras":
        (tmp_path / framework / "model.json").write_text('{"architecture": "cnn-3block"}')

    result = run_cli("export", "--framework", framework, "--out", tmp_path)

    _assert_one_error(result, str(tmp_path / framework / name))
    assert not (tmp_path / framework / "model.onnx").exists()


def test_export_of_foreign_torch_checkpoint_fails(tmp_path):
    import subprocess
    import sys

    (tmp_path / "torch").mkdir()
    foreign = tmp_path / "torch" / "model.pt"
    subprocess.run([sys.executable, "-c", f"import torch; torch.save({{'weights': [1, 2]}}, {str(foreign)!r})"],
                   check=True)

    result = run_cli("export", "--framework", "torch", "--out", tmp_path)

    _assert_one_error(result, str(foreign), "not a cifar-onnx PyTorch checkpoint")
    assert not (tmp_path / "torch" / "model.onnx").exists()


@pytest.mark.parametrize("framework,opset,reason", [
    ("torch", 17, "torch.onnx writes opsets 18 to"),
    ("keras", 19, "tf2onnx writes opsets"),
    ("torch", 28, "onnxruntime"),
])
def test_export_with_unsupported_opset_fails(trained_out, framework, opset, reason):
    out = trained_out(framework, "cnn-3block")
    target = out / framework / "model.onnx"
    before = target.read_bytes() if target.exists() else None

    result = run_cli("export", "--framework", framework, "--out", out, "--opset", opset)

    _assert_one_error(result, f"--opset {opset}", reason)
    assert (target.read_bytes() if target.exists() else None) == before
    assert not list((out / framework).glob(".model.onnx.*"))
