"""The architecture specifications, the recipe's schedule and split, and the two builds' agreement.

Framework builds run in subprocesses, so torch and tensorflow never share the pytest process.
"""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import architectures as arch
from pipeline.errors import TrainError
from pipeline.recipe import AUGMENTATIONS, Recipe, learning_rate_at, split_indices, subset_indices

REPOSITORY = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = """
import json, sys
import numpy as np
framework, name = sys.argv[1], sys.argv[2]
kernels = {}  # layer name -> (kernel, bias, fan_in) of every conv and dense layer, freshly initialised
if framework == "torch":
    from pipeline.torch_model import build_model, count_parameters
    net = build_model(name)
    names = sorted({key.split(".")[0] for key in net.state_dict()})
    for key, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() in (2, 4):  # dense [out, in], conv [out, in, kh, kw]
            kernel = weight.detach().numpy()
            kernels[key.split(".")[-1]] = (kernel, module.bias.detach().numpy(), int(np.prod(kernel.shape[1:])))
else:
    from pipeline.keras_model import build_model, count_parameters
    net = build_model(name)
    names = sorted(layer.name for layer in net.layers if layer.weights)
    for layer in net.layers:
        if hasattr(layer, "kernel"):  # dense [in, out], conv [kh, kw, in, out]
            kernel = layer.kernel.numpy()
            kernels[layer.name] = (kernel, layer.bias.numpy(), int(np.prod(kernel.shape[:-1])))
init = {layer: {"fan_in": fan_in, "max_over_bound": float(np.abs(kernel).max() * np.sqrt(fan_in)),
                "std_over_bound": float(kernel.std() * np.sqrt(fan_in)), "bias_max": float(np.abs(bias).max())}
        for layer, (kernel, bias, fan_in) in kernels.items()}
print(json.dumps({"parameters": count_parameters(net), "names": names, "init": init}))
"""


def _build_in_subprocess(framework, name):
    result = subprocess.run(
        [sys.executable, "-c", BUILD_SCRIPT, framework, name],
        capture_output=True, text=True, cwd=REPOSITORY, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(arch.ARCHITECTURES))
def test_builds_have_equal_parameter_counts(name):
    spec = arch.get_architecture(name)
    torch_build = _build_in_subprocess("torch", name)
    keras_build = _build_in_subprocess("keras", name)
    assert torch_build["parameters"] == arch.count_parameters(spec)
    assert keras_build["parameters"] == arch.count_parameters(spec)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_builds_name_parameters_by_spec(framework):
    spec = arch.get_architecture(arch.DEFAULT_ARCHITECTURE)
    build = _build_in_subprocess(framework, spec.name)
    assert build["names"] == sorted(layer.name for layer in spec.parametrised_layers())


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_kernels_follow_pinned_distribution(framework):
    # Every kernel uniform on [-b, b], b = 1 / sqrt(fan_in): its largest value is near b and
    # its standard deviation b / sqrt(3). He normal (std sqrt(2) b) or Glorot would fail here.
    spec = arch.get_architecture(arch.DEFAULT_ARCHITECTURE)
    init = _build_in_subprocess(framework, spec.name)["init"]
    kernel_layers = [layer.name for layer in spec.layers if layer.kind in (arch.CONV, arch.DENSE)]
    assert sorted(init) == sorted(kernel_layers)
    for name, stats in init.items():
        assert 0.9 < stats["max_over_bound"] <= 1.0 + 1e-6, name
        assert stats["std_over_bound"] == pytest.approx(1 / math.sqrt(3), rel=0.1), name
        assert stats["bias_max"] == 0.0, name


def test_parameter_count_of_cnn_3block():
    # conv 896 + 9,248 + 18,496 + 36,928 + 73,856; BN 2 x (32 + 32 + 64 + 64 + 128);
    # dense 16,512 + 1,290.
    assert arch.count_parameters(arch.get_architecture("cnn-3block")) == 157_866


def test_layer_names_unique():
    for spec in arch.ARCHITECTURES.values():
        names = [layer.name for layer in spec.layers]
        assert len(names) == len(set(names)), spec.name
        assert all(layer.kind in arch.LAYER_KINDS for layer in spec.layers)


def test_block_orders_follow_tutorial():
    three = [layer.kind for layer in arch.get_architecture("cnn-3block").layers]
    two = [layer.kind for layer in arch.get_architecture("cnn-2block").layers]
    assert three[:3] == [arch.CONV, arch.RELU, arch.BATCHNORM]
    assert two[:3] == [arch.CONV, arch.BATCHNORM, arch.RELU]
    assert three.count(arch.CONV) == 5
    assert two.count(arch.CONV) == 4


def test_dropout_kinds():
    three = arch.get_architecture("cnn-3block")
    two = arch.get_architecture("cnn-2block")
    assert three.layer("drop1").kind == arch.DROPOUT
    assert two.layer("drop1").kind == arch.SPATIAL_DROPOUT
    assert two.layer("drop2").kind == arch.SPATIAL_DROPOUT
    assert two.layer("drop3").kind == arch.DROPOUT  # after the dense layer, no channels to drop


def test_default_architecture_is_cnn_3block():
    assert arch.DEFAULT_ARCHITECTURE == "cnn-3block"


def test_unknown_architecture_lists_choices():
    with pytest.raises(TrainError, match="cnn-3block, cnn-2block"):
        arch.get_architecture("resnet")


def test_split_is_disjoint_and_balanced():
    labels = np.repeat(np.arange(10), 5000)
    train, validation = split_indices(len(labels), labels, 5000, seed=0)
    assert len(validation) == 5000
    assert len(train) == 45000
    assert len(np.intersect1d(train, validation)) == 0
    assert np.all(np.diff(validation) > 0)
    assert np.bincount(labels[validation]).tolist() == [500] * 10


def test_split_depends_on_seed_only():
    labels = np.random.default_rng(1).integers(0, 10, 2000)
    first = split_indices(len(labels), labels, 150, seed=3)
    again = split_indices(len(labels), labels, 150, seed=3)
    other = split_indices(len(labels), labels, 150, seed=4)
    assert np.array_equal(first[1], again[1])
    assert np.array_equal(first[0], again[0])
    assert not np.array_equal(first[1], other[1])


def test_split_with_limit():
    labels = np.repeat(np.arange(10), 600)
    train, validation = split_indices(len(labels), labels, 5000, seed=0, limit=512)
    assert len(train) + len(validation) == 512
    assert len(validation) == 51  # capped at a tenth of the 512 images
    counts = np.bincount(labels[np.concatenate([train, validation])], minlength=10)
    assert counts.max() - counts.min() <= 1


def test_split_rejects_oversized_limit():
    labels = np.repeat(np.arange(10), 10)
    with pytest.raises(TrainError, match="--limit"):
        split_indices(len(labels), labels, 5000, seed=0, limit=101)


def test_subset_is_balanced():
    labels = np.repeat(np.arange(10), 100)
    subset = subset_indices(labels, 200, seed=0)
    assert np.bincount(labels[subset]).tolist() == [20] * 10


@pytest.mark.parametrize("module", ["torch_train.py", "keras_train.py"])
def test_train_modules_call_split_indices(module):
    tree = ast.parse((REPOSITORY / "pipeline" / module).read_text())
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "split_indices" in called


def test_one_cycle_schedule_shape():
    recipe = Recipe(epochs=10)
    total = 1000
    peak = recipe.lr * recipe.peak_factor
    assert math.isclose(learning_rate_at(0, total, recipe), peak / recipe.start_divisor)
    assert math.isclose(learning_rate_at(300, total, recipe), peak)
    assert learning_rate_at(total, total, recipe) < peak / 1e4
    rising = [learning_rate_at(step, total, recipe) for step in range(0, 301, 50)]
    falling = [learning_rate_at(step, total, recipe) for step in range(300, 1001, 50)]
    assert rising == sorted(rising)
    assert falling == sorted(falling, reverse=True)


def test_cosine_schedule_ends_at_zero():
    recipe = Recipe(schedule="cosine")
    assert math.isclose(learning_rate_at(0, 100, recipe), recipe.lr)
    assert learning_rate_at(100, 100, recipe) == pytest.approx(0.0, abs=1e-12)


def test_recipe_round_trips_through_dict():
    recipe = Recipe(epochs=7, limit=512, augment="flip-affine")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe().augment in AUGMENTATIONS
