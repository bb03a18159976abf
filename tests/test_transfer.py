"""Weight transfer between the PyTorch and Keras builds, in both directions.

The numpy layout conversions are tested here directly; the round trips through
real models run each framework in its own subprocess (pipeline.worker), as verify does.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from pipeline import transfer
from pipeline.architectures import ARCHITECTURES, get_architecture
from serving.contract import CIFAR10_CLASSES


def _random_neutral(spec, seed=0):
    rng = np.random.default_rng(seed)
    weights = {}
    channels = 3
    for layer in spec.parametrised_layers():
        if layer.kind == "conv":
            weights[f"{layer.name}/kernel"] = rng.normal(size=(layer.filters, channels, 3, 3)).astype(np.float32)
            weights[f"{layer.name}/bias"] = rng.normal(size=layer.filters).astype(np.float32)
            channels = layer.filters
        elif layer.kind == "dense":
            weights[f"{layer.name}/kernel"] = rng.normal(size=(layer.units, channels)).astype(np.float32)
            weights[f"{layer.name}/bias"] = rng.normal(size=layer.units).astype(np.float32)
            channels = layer.units
        else:
            for parameter in ("scale", "shift", "mean"):
                weights[f"{layer.name}/{parameter}"] = rng.normal(size=channels).astype(np.float32)
            weights[f"{layer.name}/variance"] = rng.uniform(0.5, 2.0, size=channels).astype(np.float32)
    return weights


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_keras_layout_round_trip_is_identity(architecture):
    spec = get_architecture(architecture)
    weights = _random_neutral(spec)

    back = transfer.from_keras(spec, transfer.to_keras(spec, weights))

    assert sorted(back) == sorted(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(back[key], value)


def test_keras_layouts_are_hwio_and_in_out():
    spec = get_architecture("cnn-3block")
    weights = _random_neutral(spec)

    keras_weights = transfer.to_keras(spec, weights)

    assert keras_weights["conv1"][0].shape == (3, 3, 3, 32)
    assert keras_weights["conv3"][0].shape == (3, 3, 32, 64)
    assert keras_weights["dense2"][0].shape == (128, 10)
    np.testing.assert_array_equal(keras_weights["conv2"][0][1, 2, 5, 7], weights["conv2/kernel"][7, 5, 1, 2])
    np.testing.assert_array_equal(keras_weights["dense1"][0][3, 9], weights["dense1/kernel"][9, 3])
    assert [w.shape for w in keras_weights["bn1"]] == [(32,)] * 4


def test_torch_names_round_trip():
    spec = get_architecture("cnn-2block")
    weights = _random_neutral(spec)

    state = transfer.to_torch(spec, weights)

    assert state["bn1.running_var"] is weights["bn1/variance"]
    assert state["dense1.weight"].shape == (128, 64)
    back = transfer.from_torch(spec, state)
    assert all(np.array_equal(back[key], weights[key]) for key in weights)


def test_transfer_rejects_missing_weight():
    spec = get_architecture("cnn-3block")
    weights = _random_neutral(spec)
    del weights["bn5/variance"]

    with pytest.raises(ValueError, match=r"missing \['bn5/variance'\]"):
        transfer.to_keras(spec, weights)


def test_epsilon_mismatch_is_rejected():
    spec = get_architecture("cnn-3block")
    epsilons = {layer.name: spec.bn_epsilon for layer in spec.parametrised_layers() if layer.kind == "batchnorm"}
    epsilons["bn2"] = 1e-3

    with pytest.raises(ValueError, match="bn2 uses epsilon 0.001"):
        transfer.check_epsilon(spec, epsilons)


def test_neutral_file_round_trip(tmp_path):
    weights = _random_neutral(get_architecture("cnn-2block"))

    transfer.save_weights(tmp_path / "weights.npz", weights)
    loaded = transfer.load_weights(tmp_path / "weights.npz")

    assert sorted(loaded) == sorted(weights)
    assert all(np.array_equal(loaded[key], weights[key]) for key in weights)


# Builds a model of the given framework with random weights and BatchNorm statistics,
# saves it as a checkpoint, and writes its logits on fixed images.
_MAKE_SOURCE = """
import json, sys
import numpy as np
framework, architecture, checkpoint, images_path, logits_path = sys.argv[1:]
from pipeline import transfer, worker
from pipeline.architectures import get_architecture
spec = get_architecture(architecture)
weights = {key: np.asarray(value) for key, value in json.loads(sys.stdin.read()).items()}
weights = {key: value.astype(np.float32) for key, value in weights.items()}
transfer.save_weights(checkpoint + ".npz", weights)
with open(checkpoint + ".json", "w") as stream:
    json.dump({"architecture": architecture, "class_names": %s, "dataset_fingerprint": "0" * 64,
               "test_accuracy": None}, stream)
worker.load_weights(framework, checkpoint + ".npz", checkpoint + ".json", checkpoint)
worker.infer(framework, checkpoint, [images_path], [logits_path])
""" % (list(CIFAR10_CLASSES),)


def _worker(*arguments):
    result = subprocess.run([sys.executable, "-m", "pipeline.worker", *map(str, arguments)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("source,target", [("torch", "keras"), ("keras", "torch")])
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_transfer_preserves_logits(tmp_path, source, target, architecture):
    spec = get_architecture(architecture)
    weights = {key: value.tolist() for key, value in _random_neutral(spec, seed=3).items()}
    images = np.random.default_rng(4).integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    extension = {"torch": "pt", "keras": "keras"}
    source_checkpoint = tmp_path / f"source.{extension[source]}"

    made = subprocess.run(
        [sys.executable, "-c", _MAKE_SOURCE, source, architecture, source_checkpoint,
         tmp_path / "images.npy", tmp_path / "source-logits.npz"],
        input=json.dumps(weights), capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    target_checkpoint = tmp_path / f"target.{extension[target]}"
    _worker("dump-weights", "--framework", source, "--checkpoint", source_checkpoint,
            "--weights", tmp_path / "moved.npz", "--info", tmp_path / "moved.json")
    _worker("load-weights", "--framework", target, "--checkpoint", target_checkpoint,
            "--weights", tmp_path / "moved.npz", "--info", tmp_path / "moved.json")
    _worker("infer", "--framework", target, "--checkpoint", target_checkpoint,
            "--images", tmp_path / "images.npy", "--output", tmp_path / "target-logits.npz")

    expected = np.load(tmp_path / "source-logits.npz")["logits"]
    actual = np.load(tmp_path / "target-logits.npz")["logits"]
    assert np.abs(expected).max() > 1.0  # the random weights give logits far from zero
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))
    assert np.array_equal(actual.argmax(axis=1), expected.argmax(axis=1))
